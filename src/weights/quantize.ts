// int8 weight quantization for the fast mode (issue 13): a PyTorch Linear weight `W [out, in]` becomes int8 values
// with one fp32 scale per output column, in the `[in, out]` layout of ONNX Runtime's int8 products (the int8 weight
// policy emits them), so the product runs on the CPU's int8 dot-product units (AVX512-VNNI / AVX-VNNI): measured
// 3–4× the fp32 MatMul at klein's shapes, ~0.55 % relative rms error per product (docs/benchmarks.md, "Fast mode").
//
// Scheme (INT8_SCHEME): symmetric, per output column n: scale[n] = max_k |W[n, k]| / 127 (fp32),
// q[k, n] = W[n, k] / scale[n] rounded half to even, in [-127, 127]; an all-zero column gets scale 1 and q 0.
// Per-column scales keep a column with large weights from costing every other column its precision.
// The numbers are defined by graph/int8-quantize.ts, which ORT runs (an Int8Quantizer) in the conversion workers.

import type { Scratch } from './scratch.ts';
import { sourceIdentity, sourceShape, type WeightRef } from './weight-ref.ts';

/** Names the quantization scheme; part of every quantized-weight cache key. Bump when the numbers change. */
export const INT8_SCHEME = 'int8-sym-per-column-v2';

/**
 * INT8_SCHEME's `q` and `scale` plus the exact rows (`rows: true`) as `rows` and `rows.scale`: what the
 * outlier-tolerant int8 Linear (graph/int8-linear.ts) reads.
 */
export const INT8_ROWS_SCHEME = 'int8-sym-per-column-rows16-v2';

/** A Linear weight quantized to int8: `W[n, k] ≈ q[k · outFeatures + n] · scale[n]`. */
export interface Int8Weight {
  /** int8 values `[inFeatures, outFeatures]` row-major (K × N), i.e. Wᵀ. */
  q: Int8Array;
  /** `[outFeatures]`: one scale per output column. */
  scale: Float32Array;
  inFeatures: number;
  outFeatures: number;
}

/** `W ≈ values · scale`: int16 `[in, out]` with one fp32 scale per output column. */
export interface Int16Rows {
  values: Int16Array;
  scale: Float32Array;
}

/**
 * A `[N, K]` weight as a quantizer reads it: fp32 values, or a checkpoint's bf16 bits (widened a block of rows at a
 * time: the conversion never holds the whole weight in fp32).
 */
export type WeightRows = Float32Array | { bf16: Uint16Array };

export interface QuantizeOptions {
  /**
   * Also the same weight 254× finer in int16 (INT8_ROWS_SCHEME): `rows.values[k, n] = W[n, k] / rows.scale[n]`
   * rounded, with `rows.scale = scale / 254`, exact to half a fine step (the outlier-tolerant int8 Linear gathers
   * its few fp32 channels' rows from it).
   */
  rows?: boolean;
  /** Arrays of K·N values to write q and the rows into (reused memory, see Scratch) instead of fresh ones. */
  into?: { q: Int8Array; rows?: Int16Array };
}

/** Quantizes `[outFeatures, inFeatures]` weights (runtime/int8-quantizer.ts runs the scheme's graph). */
export interface Int8Quantizer {
  quantize(w: WeightRows, outFeatures: number, inFeatures: number, o?: QuantizeOptions): Promise<Int8Weight & { rows?: Int16Rows }>;
  release(): Promise<void>;
}

/** Checks a quantizer's arguments: the shape, the source's length and the output arrays'. */
export function checkQuantizeArgs(w: WeightRows, N: number, K: number, o: QuantizeOptions): void {
  if (!Number.isInteger(N) || !Number.isInteger(K) || N < 1 || K < 1) throw new RangeError(`int8 quantization: bad shape [${N}, ${K}]`);
  const length = w instanceof Float32Array ? w.length : w.bf16.length;
  if (length !== N * K) throw new RangeError(`int8 quantization: ${length} values for a [${N}, ${K}] weight (${N * K} expected)`);
  if ((o.into && o.into.q.length !== K * N) || (o.rows && o.into?.rows && o.into.rows.length !== K * N)) throw new RangeError(`int8 quantization: output arrays are not ${K * N} long`);
}

/**
 * Rows `[n0, n1)` of `w` as fp32 in `out` (bf16 widened exactly). A non-finite weight is refused with its row: the
 * scheme's scale would be Inf or NaN for the whole output column.
 */
export function widenRows(w: WeightRows, n0: number, n1: number, K: number, out: Float32Array): Float32Array {
  const length = (n1 - n0) * K;
  const dst = new Uint32Array(out.buffer, out.byteOffset, length);
  // the largest exponent field seen: all ones means Inf or NaN somewhere (a compare per value, no branch taken);
  // checked in the widening loop: bf16ToF32 and then a second pass cost ~25 % more per weight (measured)
  let maxExponent = 0;
  if (w instanceof Float32Array) {
    const src = new Uint32Array(w.buffer, w.byteOffset + n0 * K * 4, length);
    for (let i = 0; i < length; i++) {
      const e = (dst[i] = src[i]) & 0x7f800000;
      maxExponent = e > maxExponent ? e : maxExponent;
    }
    maxExponent >>>= 16;
  } else {
    const src = w.bf16.subarray(n0 * K, n1 * K);
    for (let i = 0; i < length; i++) {
      const b = src[i];
      dst[i] = b << 16;
      const e = b & 0x7f80;
      maxExponent = e > maxExponent ? e : maxExponent;
    }
  }
  const values = out.subarray(0, length);
  if (maxExponent === 0x7f80) {
    const i = values.findIndex((v) => !Number.isFinite(v));
    throw new RangeError(`int8 quantization: output ${n0 + Math.floor(i / K)} has a non-finite weight`);
  }
  return values;
}

/** The fp32 weight `[out, in]` an Int8Weight stands for (tests and error analysis). */
export function dequantizeInt8(qw: Int8Weight): Float32Array {
  const { q, scale, inFeatures: K, outFeatures: N } = qw;
  const w = new Float32Array(N * K);
  for (let k = 0; k < K; k++) for (let n = 0; n < N; n++) w[n * K + k] = q[k * N + n] * scale[n];
  return w;
}

/**
 * The last quantized source's outputs, so a scheme's several outputs (values, scales, …) are computed once; with
 * `scratch`, q and the rows are written into its reused memory (valid until the next source is quantized).
 */
export interface QuantizeMemo {
  key?: string;
  outputs?: Record<string, Uint8Array>;
  scratch?: { q: Scratch; rows: Scratch };
}

const bytesOf = (a: Int8Array | Int16Array | Float32Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/**
 * One output of a quantization scheme for `ref`'s `[out, in]` source, as the bytes its initializer holds. `read`
 * gives the source (fp32, or bf16 bits); `memo` keeps the last source's outputs so its sibling refs reuse them.
 */
export async function quantizeForRef(ref: WeightRef, scheme: string, output: string, memo: QuantizeMemo, quantizer: Int8Quantizer, read: () => WeightRows): Promise<Uint8Array> {
  const key = `${scheme}:${sourceIdentity(ref.source)}`;
  if (memo.key !== key) {
    if (scheme !== INT8_SCHEME && scheme !== INT8_ROWS_SCHEME) throw new Error(`${ref.key}: unknown quantization scheme ${scheme}`);
    const [out, inF] = sourceShape(ref.source);
    const rows = scheme === INT8_ROWS_SCHEME;
    memo.key = undefined; // the scratch is about to be overwritten
    const into = memo.scratch && { q: memo.scratch.q.int8(out * inF), rows: rows ? memo.scratch.rows.int16(out * inF) : undefined };
    const qw = await quantizer.quantize(read(), out, inF, { rows, into }).catch((e: Error) => {
      throw new Error(`${ref.source.parts.map((p) => `${p.file} [${p.name}]`).join(' + ')}: ${e.message}`);
    });
    memo.key = key;
    memo.outputs = { q: bytesOf(qw.q), scale: bytesOf(qw.scale) };
    if (qw.rows) Object.assign(memo.outputs, { rows: bytesOf(qw.rows.values), 'rows.scale': bytesOf(qw.rows.scale) });
  }
  const bytes = memo.outputs![output];
  if (!bytes) throw new Error(`${ref.key}: scheme ${scheme} has no output ${output}`);
  return bytes;
}
