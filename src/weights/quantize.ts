// int8 weight quantization for the fast mode (issue 13): a PyTorch Linear weight `W [out, in]` becomes int8 values
// with one fp32 scale per output column, in the layout of ONNX Runtime's com.microsoft DynamicQuantizeMatMul (the int8 weight policy emits that op). The activations are quantized by the op itself at run time (uint8, one scale and
// zero point per tensor), so the product runs on the CPU's int8 dot-product units (AVX512-VNNI / AVX-VNNI): measured
// 3–4× the fp32 MatMul at klein's shapes, ~0.55 % relative rms error per product (docs/benchmarks.md, "Fast mode").
//
// Scheme (INT8_SCHEME): symmetric, per output column n: scale[n] = max_k |W[n, k]| / 127 (fp32),
// q[k, n] = round(W[n, k] · (1 / scale[n])) rounded half away from zero, in [-127, 127]; an all-zero column gets scale 1
// and q 0. Per-column scales keep a column with large weights from costing every other column its precision.

import { sourceShape, type WeightRef } from './weight-ref.ts';

/** Names the quantization scheme; part of every quantized-weight cache key. Bump when the numbers change. */
export const INT8_SCHEME = 'int8-sym-per-column-v1';

/**
 * INT8_SCHEME's `q` and `scale` plus the residual of `quantizeInt8(…, { residual: true })` as `residual.q` and
 * `residual.scale`: what the outlier-tolerant int8 Linear (graph/int8-linear.ts) reads.
 */
export const INT8_RESIDUAL_SCHEME = 'int8-sym-per-column-residual-v2';

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

/** The residual's step: a rounding error is at most half a step of q, so 254 steps span it (no pass for its max). */
const RESIDUAL_STEPS = 254;

/** Half away from zero (as C's lround), clamped to ±127 so it never wraps. */
function roundInt8(v: number): number {
  const r = (v + (v >= 0 ? 0.5 : -0.5)) | 0;
  return r > 127 ? 127 : r < -127 ? -127 : r;
}

/**
 * Quantizes `w` (`[outFeatures, inFeatures]` row-major fp32, PyTorch's Linear layout) to int8 with per-output-column
 * scales, transposed to `[in, out]`. With `residual`, also what q leaves of w, quantized in the same pass with the
 * fixed step `scale / 254`: `w[n, k] ≈ q[k, n]·scale[n] + r.q[k, n]·r.scale[n]` to half of that step (the
 * outlier-tolerant int8 Linear, int8-linear.ts, multiplies its few fp32 channels with `q + r` rows). Deterministic.
 */
export function quantizeInt8(w: Float32Array, outFeatures: number, inFeatures: number, o: { residual?: boolean } = {}): Int8Weight & { residual?: Int8Weight } {
  const N = outFeatures;
  const K = inFeatures;
  if (!Number.isInteger(N) || !Number.isInteger(K) || N < 1 || K < 1) throw new RangeError(`quantizeInt8: bad shape [${outFeatures}, ${inFeatures}]`);
  if (w.length !== N * K) throw new RangeError(`quantizeInt8: ${w.length} values for a [${N}, ${K}] weight (${N * K} expected)`);
  const scale = new Float32Array(N);
  const q = new Int8Array(K * N);
  const r = o.residual ? { q: new Int8Array(K * N), scale: new Float32Array(N) } : undefined;
  // Rows are quantized in blocks into a row-major scratch (sequential reads of W), then the block is transposed
  // into q, writing BLOCK consecutive bytes per input feature.
  const tmp = new Int8Array(BLOCK * K);
  const rtmp = r ? new Int8Array(BLOCK * K) : undefined;
  for (let n0 = 0; n0 < N; n0 += BLOCK) {
    const n1 = Math.min(N, n0 + BLOCK);
    for (let n = n0; n < n1; n++) {
      let mx = 0;
      let sum = 0; // NaN never wins a comparison, but it does poison a sum
      const row = n * K;
      for (let k = 0; k < K; k++) {
        const a = Math.abs(w[row + k]);
        sum += a;
        if (a > mx) mx = a;
      }
      if (!Number.isFinite(sum)) throw new RangeError(`quantizeInt8: output ${n} has a non-finite weight`);
      const s = (scale[n] = mx > 0 ? Math.fround(mx / 127) : 1);
      const inv = 1 / s;
      const t = (n - n0) * K;
      if (!r || !rtmp) {
        for (let k = 0; k < K; k++) tmp[t + k] = roundInt8(w[row + k] * inv);
        continue;
      }
      const rs = (r.scale[n] = Math.fround(s / RESIDUAL_STEPS));
      const rinv = 1 / rs;
      for (let k = 0; k < K; k++) {
        const v = w[row + k];
        const qv = roundInt8(v * inv);
        tmp[t + k] = qv;
        rtmp[t + k] = roundInt8((v - qv * s) * rinv);
      }
    }
    transposeBlock(tmp, q, n0, n1, N, K);
    if (r && rtmp) transposeBlock(rtmp, r.q, n0, n1, N, K);
  }
  return { q, scale, inFeatures: K, outFeatures: N, ...(r ? { residual: { ...r, inFeatures: K, outFeatures: N } } : {}) };
}

/** Rows `[n0, n1)` of a row-major `[·, K]` block into the `[K, N]` layout. */
function transposeBlock(block: Int8Array, out: Int8Array, n0: number, n1: number, N: number, K: number): void {
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

/** Identity of a weight's source (files, offsets, column range): quantized outputs of one source are computed once. */
function sourceKey(ref: WeightRef): string {
  return JSON.stringify([ref.source.parts.map((p) => [p.file, p.dataOffset, p.byteLength]), ref.source.cols ?? null]);
}

/**
 * One output of a quantization scheme for `ref`'s `[out, in]` source, as the bytes its initializer holds. `read`
 * gives the fp32 source; `memo` keeps the last source's outputs so its sibling refs reuse them.
 */
export function quantizeForRef(ref: WeightRef, scheme: string, output: string, memo: { key?: string; outputs?: Record<string, Uint8Array> }, read: () => Float32Array): Uint8Array {
  const key = `${scheme}:${sourceKey(ref)}`;
  if (memo.key !== key) {
    if (scheme !== INT8_SCHEME && scheme !== INT8_RESIDUAL_SCHEME) throw new Error(`${ref.key}: unknown quantization scheme ${scheme}`);
    const [out, inF] = sourceShape(ref.source);
    const qw = quantizeInt8(read(), out, inF, { residual: scheme === INT8_RESIDUAL_SCHEME });
    memo.key = key;
    memo.outputs = { q: new Uint8Array(qw.q.buffer), scale: new Uint8Array(qw.scale.buffer) };
    if (qw.residual) Object.assign(memo.outputs, { 'residual.q': new Uint8Array(qw.residual.q.buffer), 'residual.scale': new Uint8Array(qw.residual.scale.buffer) });
  }
  const bytes = memo.outputs![output];
  if (!bytes) throw new Error(`${ref.key}: scheme ${scheme} has no output ${output}`);
  return bytes;
}
