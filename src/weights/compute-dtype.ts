// Numeric conversions of weights for GPU policies (transposing a Linear's weight for a plain MatMul, narrowing to
// fp16 with clamping) and the check that an fp16 output stayed finite.

/** The largest finite fp16 value. */
export const F16_MAX = 65504;

/** `[rows, cols]` row-major → `[cols, rows]` (into `out` when given), in 64×64 tiles so both sides stay in cache. */
export function transpose2d(src: Float32Array, rows: number, cols: number, out = new Float32Array(src.length)): Float32Array {
  if (src.length !== rows * cols || out.length !== src.length) throw new RangeError(`transpose2d: ${src.length} values for ${rows}×${cols} into ${out.length}`);
  const T = 64;
  for (let r0 = 0; r0 < rows; r0 += T) {
    const r1 = Math.min(rows, r0 + T);
    for (let c0 = 0; c0 < cols; c0 += T) {
      const c1 = Math.min(cols, c0 + T);
      for (let r = r0; r < r1; r++) for (let c = c0; c < c1; c++) out[c * rows + r] = src[r * cols + c];
    }
  }
  return out;
}

/**
 * fp32 → fp16 bits with round-to-nearest-even, values beyond ±65504 clamped to it (not rounded to ±Inf, which
 * would turn every product it touches into Inf/NaN). `overflows` counts the clamped values. Modifies nothing.
 * Works on the bit patterns (klein 4B has 3.9 G weights to convert at load): normal results by shifting the
 * exponent and mantissa, fp16 subnormals (|x| < 2⁻¹⁴) through float arithmetic, which is exact there.
 */
export function f32ToF16Clamped(src: Float32Array): { data: Uint16Array; overflows: number } {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  let overflows = 0;
  for (let i = 0; i < bits.length; i++) {
    const x = bits[i];
    const sign = (x >>> 16) & 0x8000;
    const abs = x & 0x7fffffff;
    if (abs >= 0x38800000) {
      if (abs > 0x477fe000) {
        // beyond 65504 (0x477fe000): clamp; NaN stays NaN
        if (abs > 0x7f800000) out[i] = sign | 0x7e00;
        else {
          out[i] = sign | 0x7bff;
          overflows++;
        }
        continue;
      }
      // rebias the exponent (127 → 15) and keep 10 mantissa bits; a carry out of the mantissa bumps the exponent
      let h = (abs >>> 13) - (112 << 10);
      const rem = abs & 0x1fff;
      if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++;
      out[i] = sign | h;
    } else {
      const q = Math.abs(src[i]) * 16777216; // in units of the smallest subnormal, 2⁻²⁴ (exact in float64)
      let h = Math.floor(q);
      const frac = q - h;
      if (frac > 0.5 || (frac === 0.5 && h & 1)) h++;
      out[i] = sign | h; // h = 1024 is the smallest normal, 2⁻¹⁴: the bit pattern is right as is
    }
  }
  return { data: out, overflows };
}


/**
 * fp16 products: an activation beyond ±65504 becomes ±Inf at its cast to fp16 (or in the product) and Inf/NaN
 * spreads from there. A model in fp16 checks its output with this and says so, rather than handing on Inf/NaN (a
 * black image). `what` names it, e.g. "qwen3: the fp16 text encoder". Returns `values`.
 */
export function throwIfOverflowed(values: Float32Array, what: string): Float32Array {
  for (let i = 0; i < values.length; i++) {
    if (!Number.isFinite(values[i])) throw new Error(`${what} overflowed (its output has non-finite values): run it in fp32 (--gpu-dtype fp32 or KLEIN_GPU_DTYPE=fp32)`);
  }
  return values;
}
