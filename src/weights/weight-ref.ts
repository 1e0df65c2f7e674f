// A weight as a graph asks for it: which stored tensors its bytes come from and how they are transformed (widened
// to fp32, narrowed to fp16, transposed, quantized). The weight store (weights/weight-store.ts) computes the bytes
// once into a cache file that ORT maps — or, when nothing needs computing, points at the checkpoint in place.
import { DTYPE_SIZE, SafetensorsError, type TensorInfo } from './safetensors.ts';
import { elemTypeOf, type ElemType } from './dtypes.ts';

/** Stored tensors whose rows, concatenated in order, make the weight (diffusers' q, k, v give BFL's qkv). */
export interface WeightSource {
  parts: TensorInfo[];
  /** Columns `[start, end)` of a 2-D weight; all when absent. */
  cols?: [number, number];
}

export type WeightTransform =
  /** The values converted to the ref's type (fp32, fp16, or unchanged), a 2-D weight optionally transposed. */
  | { kind: 'convert'; transpose?: boolean }
  /** One output of a quantization scheme applied to the `[out, in]` weight (graph/quantize.ts). */
  | { kind: 'quantize'; scheme: string; output: string };

export interface WeightRef {
  /** Unique within a model; becomes the initializer's name. */
  key: string;
  type: ElemType;
  dims: number[];
  source: WeightSource;
  transform: WeightTransform;
}

/** Shape of the stored source after row concatenation and column selection. */
export function sourceShape(s: WeightSource): number[] {
  const first = s.parts[0].shape;
  const rows = s.parts.reduce((n, p) => n + p.shape[0], 0);
  if (first.length === 1) return [rows];
  const cols = s.cols ? s.cols[1] - s.cols[0] : first[1];
  return [rows, cols, ...first.slice(2)];
}

/**
 * Identity of a weight's source (files, offsets, column range): a quantization scheme's outputs of one source are
 * computed together once, so the store's conversion never splits them between workers.
 */
export function sourceIdentity(s: WeightSource): string {
  return JSON.stringify([s.parts.map((p) => [p.file, p.dataOffset, p.byteLength]), s.cols ?? null]);
}

/**
 * A whole stored tensor, or a row/column block of it, converted to `type`. `transpose` swaps the two axes of a
 * matrix (a `[out, in, 1, 1]` 1×1 convolution counts as `[out, in]`); `dims` reshapes (same element count).
 */
export function convertedRef(key: string, source: WeightSource, type: ElemType, o: { transpose?: boolean; dims?: number[] } = {}): WeightRef {
  const shape = sourceShape(source);
  const count = shape.reduce((a, b) => a * b, 1);
  const dims = o.transpose ? [count / shape[0], shape[0]] : (o.dims ?? shape);
  if (dims.reduce((a, b) => a * b, 1) !== count) throw new Error(`${key}: dims [${dims}] do not hold the ${count} values of [${shape}]`);
  return { key, type, dims, source, transform: { kind: 'convert', transpose: o.transpose ?? false } };
}

/**
 * True when the ref's bytes are exactly a stored tensor's (same dtype, whole rows of one part, no column range, not
 * transposed): the graph can then reference the checkpoint file in place.
 */
export function storedInPlace(ref: WeightRef): boolean {
  const { parts, cols } = ref.source;
  return ref.transform.kind === 'convert' && !ref.transform.transpose && !cols && parts.length === 1 && elemTypeOf(parts[0].dtype) === ref.type;
}

/** `rows[start:end]` of a stored tensor as its own TensorInfo, pointing at the same bytes (rows are contiguous). */
export function rowSlice(t: TensorInfo, start: number, end: number): TensorInfo {
  const rowElems = t.shape.slice(1).reduce((a, b) => a * b, 1);
  const rowBytes = rowElems * DTYPE_SIZE[t.dtype];
  if (start < 0 || end > t.shape[0] || start >= end) throw new SafetensorsError(t.file, `row slice [${start}, ${end}) out of range for shape ${JSON.stringify(t.shape)}`, t.name);
  return { ...t, name: `${t.name}.rows_${start}_${end}`, shape: [end - start, ...t.shape.slice(1)], dataOffset: t.dataOffset + start * rowBytes, byteLength: (end - start) * rowBytes };
}

/** Rows `[start, end)` of the weight whose rows are `parts` concatenated, as views into the parts that hold them. */
export function sliceRows(parts: readonly TensorInfo[], start: number, end: number): TensorInfo[] {
  const out: TensorInfo[] = [];
  let at = 0;
  for (const p of parts) {
    const [a, b] = [Math.max(start, at), Math.min(end, at + p.shape[0])];
    if (a < b) out.push(a === at && b === at + p.shape[0] ? p : rowSlice(p, a - at, b - at));
    at += p.shape[0];
  }
  if (start < 0 || end > at || start >= end) throw new RangeError(`rows [${start}, ${end}) out of range for ${parts.map((p) => p.name).join(' + ')} (${at} rows)`);
  return out;
}
