// int8 weight quantization for the fast mode (issue 13): a PyTorch Linear weight `W [out, in]` becomes int8 values
// with one fp32 scale per output column, in the layout of ONNX Runtime's com.microsoft DynamicQuantizeMatMul (the int8 weight policy emits that op). The activations are quantized by the op itself at run time (uint8, one scale and
// zero point per tensor), so the product runs on the CPU's int8 dot-product units (AVX512-VNNI / AVX-VNNI): measured
// 3–4× the fp32 MatMul at klein's shapes, ~0.55 % relative rms error per product (docs/benchmarks.md, "Fast mode").
//
// Scheme (INT8_SCHEME): symmetric, per output column n: scale[n] = max_k |W[n, k]| / 127 (fp32),
// q[k, n] = round(W[n, k] · (1 / scale[n])) rounded half away from zero, in [-127, 127]; an all-zero column gets scale 1
// and q 0. Per-column scales keep a column with large weights from costing every other column its precision.

import { bf16ToF32 } from './safetensors.ts';
import { sourceIdentity, sourceShape, type WeightRef } from './weight-ref.ts';

/** Names the quantization scheme; part of every quantized-weight cache key. Bump when the numbers change. */
export const INT8_SCHEME = 'int8-sym-per-column-v1';

/**
 * INT8_SCHEME's `q` and `scale` plus the exact rows of `quantizeInt8(…, { rows: true })` as `rows` and `rows.scale`:
 * what the outlier-tolerant int8 Linear (graph/int8-linear.ts) reads.
 */
export const INT8_ROWS_SCHEME = 'int8-sym-per-column-rows16-v1';

/** A Linear weight quantized to int8: `W[n, k] ≈ q[k · outFeatures + n] · scale[n]`. */
export interface Int8Weight {
  /** int8 values `[inFeatures, outFeatures]` row-major (K × N): DynamicQuantizeMatMul's B, i.e. Wᵀ. */
  q: Int8Array;
  /** `[outFeatures]`: one scale per output column. */
  scale: Float32Array;
  inFeatures: number;
  outFeatures: number;
}

/** Rows of W handled together while transposing: 64 input streams, each written 64 bytes at a time. */
const BLOCK = 64;

/**
 * Steps of the exact rows per step of q: q's rounding error is at most half a step, so a residual of ±127 fine steps
 * spans it, and `q·254 + residual` fits int16 (|·| ≤ 32385).
 */
const FINE_STEPS = 254;

/** `W ≈ values · scale`: int16 `[in, out]` with one fp32 scale per output column. */
export interface Int16Rows {
  values: Int16Array;
  scale: Float32Array;
}

/**
 * A `[N, K]` weight as quantizeInt8 reads it: fp32 values, or a checkpoint's bf16 bits, widened one row at a time
 * (the conversion then never holds the whole weight in fp32: 4 bytes per parameter less to allocate and copy).
 */
export type WeightRows = Float32Array | { bf16: Uint16Array };

/** Row n of `w` as K fp32 values: a view, or bf16 widened (exactly) into `scratch`. */
function rowReader(w: WeightRows, K: number): (n: number) => Float32Array {
  if (w instanceof Float32Array) return (n) => w.subarray(n * K, n * K + K);
  const scratch = new Float32Array(K);
  return (n) => bf16ToF32(w.bf16.subarray(n * K, n * K + K), scratch);
}

/** Half away from zero (as C's lround), clamped to ±127 so it never wraps. */
function roundInt8(v: number): number {
  const r = (v + (v >= 0 ? 0.5 : -0.5)) | 0;
  return r > 127 ? 127 : r < -127 ? -127 : r;
}

/**
 * Quantizes `w` (`[outFeatures, inFeatures]` row-major fp32, PyTorch's Linear layout) to int8 with per-output-column
 * scales, transposed to `[in, out]`. With `rows`, also the same weight to 254× finer steps in int16, in the same pass:
 * `rows.values[k, n] = q[k, n]·254 + round((w[n, k] − q[k, n]·scale[n]) / rows.scale[n])` with
 * `rows.scale = scale / 254`, exact to half a fine step (the outlier-tolerant int8 Linear, int8-linear.ts, gathers
 * its few fp32 channels' rows from it). Deterministic.
 */
export function quantizeInt8(w: WeightRows, outFeatures: number, inFeatures: number, o: { rows?: boolean } = {}): Int8Weight & { rows?: Int16Rows } {
  const N = outFeatures;
  const K = inFeatures;
  if (!Number.isInteger(N) || !Number.isInteger(K) || N < 1 || K < 1) throw new RangeError(`quantizeInt8: bad shape [${outFeatures}, ${inFeatures}]`);
  const length = w instanceof Float32Array ? w.length : w.bf16.length;
  if (length !== N * K) throw new RangeError(`quantizeInt8: ${length} values for a [${N}, ${K}] weight (${N * K} expected)`);
  const rowOf = rowReader(w, K);
  const scale = new Float32Array(N);
  const q = new Int8Array(K * N);
  const rows = o.rows ? { values: new Int16Array(K * N), scale: new Float32Array(N) } : undefined;
  // Rows are quantized in blocks into a row-major scratch (sequential reads of W), then the block is transposed
  // into q, writing BLOCK consecutive bytes per input feature.
  const tmp = new Int8Array(BLOCK * K);
  const rtmp = rows ? new Int16Array(BLOCK * K) : undefined;
  for (let n0 = 0; n0 < N; n0 += BLOCK) {
    const n1 = Math.min(N, n0 + BLOCK);
    for (let n = n0; n < n1; n++) {
      let mx = 0;
      let sum = 0; // NaN never wins a comparison, but it does poison a sum
      const row = rowOf(n);
      for (let k = 0; k < K; k++) {
        const a = Math.abs(row[k]);
        sum += a;
        if (a > mx) mx = a;
      }
      if (!Number.isFinite(sum)) throw new RangeError(`quantizeInt8: output ${n} has a non-finite weight`);
      const s = (scale[n] = mx > 0 ? Math.fround(mx / 127) : 1);
      const inv = 1 / s;
      const t = (n - n0) * K;
      if (!rows || !rtmp) {
        for (let k = 0; k < K; k++) tmp[t + k] = roundInt8(row[k] * inv);
        continue;
      }
      const fine = (rows.scale[n] = Math.fround(s / FINE_STEPS));
      const fineInv = 1 / fine;
      for (let k = 0; k < K; k++) {
        const v = row[k];
        const qv = roundInt8(v * inv);
        tmp[t + k] = qv;
        rtmp[t + k] = qv * FINE_STEPS + roundInt8((v - qv * s) * fineInv);
      }
    }
    transposeBlock(tmp, q, n0, n1, N, K);
    if (rows && rtmp) transposeBlock(rtmp, rows.values, n0, n1, N, K);
  }
  return { q, scale, inFeatures: K, outFeatures: N, ...(rows ? { rows } : {}) };
}

/** Rows `[n0, n1)` of a row-major `[·, K]` block into the `[K, N]` layout. */
function transposeBlock<T extends Int8Array | Int16Array>(block: T, out: T, n0: number, n1: number, N: number, K: number): void {
  const width = n1 - n0;
  for (let k = 0; k < K; k++) {
    const at = k * N + n0;
    for (let j = 0; j < width; j++) out[at + j] = block[j * K + k];
  }
}

/** The fp32 weight `[out, in]` an Int8Weight stands for (tests and error analysis). */
export function dequantizeInt8(qw: Int8Weight): Float32Array {
  const { q, scale, inFeatures: K, outFeatures: N } = qw;
  const w = new Float32Array(N * K);
  for (let k = 0; k < K; k++) for (let n = 0; n < N; n++) w[n * K + k] = q[k * N + n] * scale[n];
  return w;
}

/**
 * One output of a quantization scheme for `ref`'s `[out, in]` source, as the bytes its initializer holds. `read`
 * gives the source (fp32, or bf16 bits); `memo` keeps the last source's outputs so its sibling refs reuse them.
 */
export function quantizeForRef(ref: WeightRef, scheme: string, output: string, memo: { key?: string; outputs?: Record<string, Uint8Array> }, read: () => WeightRows): Uint8Array {
  const key = `${scheme}:${sourceIdentity(ref.source)}`;
  if (memo.key !== key) {
    if (scheme !== INT8_SCHEME && scheme !== INT8_ROWS_SCHEME) throw new Error(`${ref.key}: unknown quantization scheme ${scheme}`);
    const [out, inF] = sourceShape(ref.source);
    const qw = quantizeInt8(read(), out, inF, { rows: scheme === INT8_ROWS_SCHEME });
    memo.key = key;
    memo.outputs = { q: new Uint8Array(qw.q.buffer), scale: new Uint8Array(qw.scale.buffer) };
    if (qw.rows) Object.assign(memo.outputs, { rows: new Uint8Array(qw.rows.values.buffer), 'rows.scale': new Uint8Array(qw.rows.scale.buffer) });
  }
  const bytes = memo.outputs![output];
  if (!bytes) throw new Error(`${ref.key}: scheme ${scheme} has no output ${output}`);
  return bytes;
}
