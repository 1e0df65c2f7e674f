// The bytes of one WeightRef, computed from the checkpoint: stored row blocks read and widened to fp32, a column
// range cut out, transposed, narrowed to fp16 (clamped), or quantized. Pure and synchronous: it runs inside the
// conversion worker (weight-convert-worker.ts), never on the event loop that serves HTTP.
import { transpose2d, f32ToF16Clamped } from './compute-dtype.ts';
import { quantizeForRef, type WeightRows } from './quantize.ts';
import { bf16ToF32, f16ToF32, readRaw, type TensorInfo } from './safetensors.ts';
import { sourceShape, type WeightRef, type WeightSource } from './weight-ref.ts';

/** Statistics a conversion reports (fp16 narrowing clamps values beyond ±65504). */
export interface ConversionStats {
  fp16Overflows: number;
}

/** A tensor's stored bytes at an offset that is a multiple of 4 (pool slices may be misaligned). */
function readAligned(p: TensorInfo): Buffer {
  const raw = readRaw(p);
  return raw.byteOffset % 4 === 0 ? raw : Buffer.from(raw);
}

/** Stored values of one tensor, exactly (fp32 widening of bf16/f16 is exact). */
function storedF32(p: TensorInfo): Float32Array {
  const aligned = readAligned(p);
  const n = p.shape.reduce((a, b) => a * b, 1);
  switch (p.dtype) {
    case 'F32':
      return new Float32Array(aligned.buffer, aligned.byteOffset, n);
    case 'BF16':
      return bf16ToF32(new Uint16Array(aligned.buffer, aligned.byteOffset, n));
    case 'F16':
      return f16ToF32(new Uint16Array(aligned.buffer, aligned.byteOffset, n));
    default:
      throw new Error(`${p.file} [${p.name}]: dtype ${p.dtype} is not a float weight`);
  }
}

/** The source's values as fp32, rows concatenated and cut to its column range. */
export function sourceF32(s: WeightSource): Float32Array {
  if (s.parts.length === 1 && !s.cols) return storedF32(s.parts[0]); // already a fresh array: no second copy
  const out = new Float32Array(sourceShape(s).reduce((a, b) => a * b, 1));
  let at = 0;
  for (const p of s.parts) {
    const v = storedF32(p);
    if (!s.cols) {
      out.set(v, at);
      at += v.length;
      continue;
    }
    const [c0, c1] = s.cols;
    const width = p.shape[1];
    for (let r = 0; r < p.shape[0]; r++, at += c1 - c0) out.set(v.subarray(r * width + c0, r * width + c1), at);
  }
  return out;
}

/**
 * The source as quantizeInt8 reads it: a whole bf16 tensor as its stored bits (widened row by row there), anything
 * else (fp32, fp16, joined parts, a column range) as sourceF32.
 */
function sourceRows(s: WeightSource): WeightRows {
  const [p] = s.parts;
  if (s.parts.length !== 1 || s.cols || p.dtype !== 'BF16') return sourceF32(s);
  const aligned = readAligned(p);
  return { bf16: new Uint16Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 2) };
}

/** Non-float weights (int64 index tables, …) are copied as stored. */
function storedBytes(s: WeightSource): Uint8Array {
  if (s.cols || s.parts.length !== 1) throw new Error(`${s.parts[0].name}: only float weights can be sliced by column or joined`);
  return new Uint8Array(readRaw(s.parts[0]));
}

function bytesOf(a: Float32Array | Uint16Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** Computes the bytes ORT reads for `ref`. Quantized refs of one source reuse `memo` (q and scale come together). */
export function computeWeight(ref: WeightRef, stats: ConversionStats, memo: QuantizeMemo): Uint8Array {
  const t = ref.transform;
  if (t.kind === 'quantize') return quantizeForRef(ref, t.scheme, t.output, memo, () => sourceRows(ref.source));
  if (ref.type !== 'float32' && ref.type !== 'float16') return storedBytes(ref.source);
  let v = sourceF32(ref.source);
  if (t.transpose) {
    const rows = sourceShape(ref.source)[0];
    v = transpose2d(v, rows, v.length / rows);
  }
  if (ref.type === 'float32') return bytesOf(v);
  const h = f32ToF16Clamped(v);
  stats.fp16Overflows += h.overflows;
  return bytesOf(h.data);
}

/** The last quantized source, so a scheme's several outputs (values, scales, …) are computed once. */
export interface QuantizeMemo {
  key?: string;
  outputs?: Record<string, Uint8Array>;
}
