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
