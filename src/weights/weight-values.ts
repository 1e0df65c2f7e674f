// The bytes of one WeightRef, computed from the checkpoint: stored row blocks read and widened to fp32, a column
// range cut out, transposed, narrowed to fp16 (clamped), or quantized (by the Int8Quantizer the worker was given). It
// runs inside the conversion workers (weight-convert-worker.ts), never on the event loop that serves HTTP.
import { transpose2d, f32ToF16Clamped } from './compute-dtype.ts';
import { quantizeForRef, type Int8Quantizer, type QuantizeMemo, type WeightRows } from './quantize.ts';
import { bf16ToF32, f16ToF32, readRaw, type TensorInfo } from './safetensors.ts';
import { Scratch } from './scratch.ts';
import { sourceShape, type WeightRef, type WeightSource } from './weight-ref.ts';

/** Statistics a conversion reports (fp16 narrowing clamps values beyond ±65504). */
export interface ConversionStats {
  fp16Overflows: number;
}

/**
 * What a conversion worker keeps from one weight to the next: its statistics, the last quantized source, and
 * reused memory (Scratch) for reading, widening and transposing. computeWeight's bytes are valid until its next call.
 */
export interface ConversionState {
  stats: ConversionStats;
  memo: QuantizeMemo;
  scratch: { read: Scratch; widened: Scratch; transposed: Scratch };
  /** Runs the int8 schemes; needed only when a ref is quantized. */
  quantizer?: Int8Quantizer;
}

export function conversionState(quantizer?: Int8Quantizer): ConversionState {
  return {
    quantizer,
    stats: { fp16Overflows: 0 },
    memo: { scratch: { q: new Scratch(), rows: new Scratch() } },
    scratch: { read: new Scratch(), widened: new Scratch(), transposed: new Scratch() },
  };
}

type ReadScratch = Pick<ConversionState['scratch'], 'read' | 'widened'>;

/** A tensor's stored bytes at an offset that is a multiple of 4 (pool slices may be misaligned; a Scratch is not). */
function readAligned(p: TensorInfo, scratch?: ReadScratch): Buffer {
  const raw = readRaw(p, scratch?.read.view(p.byteLength));
  return raw.byteOffset % 4 === 0 ? raw : Buffer.from(raw);
}

/** Stored values of one tensor, exactly (fp32 widening of bf16/f16 is exact); in `scratch` when given. */
function storedF32(p: TensorInfo, scratch?: ReadScratch): Float32Array {
  const aligned = readAligned(p, scratch);
  const n = p.shape.reduce((a, b) => a * b, 1);
  switch (p.dtype) {
    case 'F32':
      return new Float32Array(aligned.buffer, aligned.byteOffset, n);
    case 'BF16':
      return bf16ToF32(new Uint16Array(aligned.buffer, aligned.byteOffset, n), scratch?.widened.float32(n));
    case 'F16':
      return f16ToF32(new Uint16Array(aligned.buffer, aligned.byteOffset, n));
    default:
      throw new Error(`${p.file} [${p.name}]: dtype ${p.dtype} is not a float weight`);
  }
}

/** The source's values as fp32, rows concatenated and cut to its column range (a single whole part in `scratch`). */
export function sourceF32(s: WeightSource, scratch?: ReadScratch): Float32Array {
  if (s.parts.length === 1 && !s.cols) return storedF32(s.parts[0], scratch); // already an array of its own: no second copy
  const out = new Float32Array(sourceShape(s).reduce((a, b) => a * b, 1));
  let at = 0;
  for (const p of s.parts) {
    const v = storedF32(p, scratch);
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
 * The source as a quantizer reads it: a whole bf16 tensor as its stored bits (widened a block at a time there), anything
 * else (fp32, fp16, joined parts, a column range) as sourceF32.
 */
function sourceRows(s: WeightSource, scratch: ReadScratch): WeightRows {
  const [p] = s.parts;
  if (s.parts.length !== 1 || s.cols || p.dtype !== 'BF16') return sourceF32(s, scratch);
  const aligned = readAligned(p, scratch);
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

/**
 * Computes the bytes ORT reads for `ref`, valid until the next call with the same `state` (they may be its scratch
 * memory). Quantized refs of one source reuse its memo (q and scale come together).
 */
export async function computeWeight(ref: WeightRef, state: ConversionState): Promise<Uint8Array> {
  const t = ref.transform;
  if (t.kind === 'quantize') {
    if (!state.quantizer) throw new Error(`${ref.key}: quantized weights need a quantizer (WeightStoreOptions.quantizer)`);
    return quantizeForRef(ref, t.scheme, t.output, state.memo, state.quantizer, () => sourceRows(ref.source, state.scratch));
  }
  if (ref.type !== 'float32' && ref.type !== 'float16') return storedBytes(ref.source);
  let v = sourceF32(ref.source, state.scratch);
  if (t.transpose) {
    const rows = sourceShape(ref.source)[0];
    v = transpose2d(v, rows, v.length / rows, state.scratch.transposed.float32(v.length));
  }
  if (ref.type === 'float32') return bytesOf(v);
  const h = f32ToF16Clamped(v);
  state.stats.fp16Overflows += h.overflows;
  return bytesOf(h.data);
}
