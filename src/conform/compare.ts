// Tolerances of the golden conformance: `max|a−b| ≤ factor · max(1, max|ref|)` on float outputs.
export interface Comparison {
  maxAbsErr: number;
  maxAbsRef: number;
  tolerance: number;
  passed: boolean;
}

export function compareRelative(actual: ArrayLike<number>, expected: ArrayLike<number>, factor = 1e-4): Comparison {
  let maxRef = 0;
  for (let i = 0; i < expected.length; i++) maxRef = Math.max(maxRef, Math.abs(expected[i]));
  return compareAbsolute(actual, expected, factor * Math.max(1, maxRef), maxRef);
}

export function compareAbsolute(actual: ArrayLike<number>, expected: ArrayLike<number>, tolerance: number, maxAbsRef?: number): Comparison {
  if (actual.length !== expected.length) {
    return { maxAbsErr: Infinity, maxAbsRef: maxAbsRef ?? NaN, tolerance, passed: false };
  }
  let maxErr = 0;
  let maxRef = 0;
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    // NaN anywhere is a failure, never silently ignored by Math.max
    if (!(d <= maxErr)) maxErr = Number.isNaN(d) ? Infinity : d;
    maxRef = Math.max(maxRef, Math.abs(expected[i]));
  }
  return { maxAbsErr: maxErr, maxAbsRef: maxAbsRef ?? maxRef, tolerance, passed: maxErr <= tolerance };
}

/**
 * `rms(a − ref) / rms(ref)` and `max|a − ref| / max|ref|`: how far an approximate mode (int8, fp16) lands from its
 * reference. NaN anywhere comes out as NaN, so a bound check on it fails.
 */
export function relativeError(a: ArrayLike<number>, ref: ArrayLike<number>): { rms: number; max: number } {
  if (a.length !== ref.length) throw new RangeError(`relativeError: ${a.length} values against ${ref.length}`);
  let se = 0;
  let sr = 0;
  let md = 0;
  let mr = 0;
  for (let i = 0; i < ref.length; i++) {
    const d = a[i] - ref[i];
    se += d * d;
    sr += ref[i] * ref[i];
    md = Math.max(md, Math.abs(d));
    mr = Math.max(mr, Math.abs(ref[i]));
  }
  return { rms: Math.sqrt(se / sr), max: md / mr };
}

/** PSNR in dB (peak 255) of two 8-bit buffers of the same length; Infinity when they are equal. */
export function psnr8(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new RangeError(`psnr: ${a.length} values against ${b.length}`);
  let se = 0;
  for (let i = 0; i < a.length; i++) se += (a[i] - b[i]) ** 2;
  return se === 0 ? Infinity : 10 * Math.log10((255 * 255 * a.length) / se);
}
