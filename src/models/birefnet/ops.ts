// Tensor plumbing the BiRefNet forward shares between its backbone and decoder (static shapes throughout: one graph
// per input size, so ORT folds every shape computation).
import type { Graph, Value } from '../../graph/onnx-graph.ts';

/** Records a `dbg.*` intermediate as an extra graph output (debug builds only). */
export type Tap = (name: string, v: Value) => void;

/** A feature map: NCHW value, its channels and `[height, width]`. */
export interface Feature {
  v: Value;
  c: number;
  hw: [number, number];
}

export function reshape(g: Graph, x: Value, shape: number[]): Value {
  return g.op('Reshape', [x, g.constI64(shape)]);
}

export function transpose(g: Graph, x: Value, perm: number[]): Value {
  return g.op('Transpose', [x], { perm });
}

export function concat(g: Graph, xs: Value[], axis: number): Value {
  return g.op('Concat', xs, { axis });
}

export function relu(g: Graph, x: Value): Value {
  return g.op('Relu', [x]);
}

function slice(g: Graph, x: Value, axis: number, start: number, end: number): Value {
  return g.op('Slice', [x, g.constI64([start]), g.constI64([end]), g.constI64([axis])]);
}

/** `torch.roll(x, k, axis)` for an axis of length `n`: ONNX has no Roll, so two slices swap places. */
export function roll(g: Graph, x: Value, k: number, axis: number, n: number): Value {
  const s = ((k % n) + n) % n;
  if (s === 0) return x;
  return concat(g, [slice(g, x, axis, n - s, n), slice(g, x, axis, 0, n - s)], axis);
}

/** `F.interpolate(x, size, mode='bilinear', align_corners=True)` (every BiRefNet resize); no-op at equal size. */
export function resizeAlignCorners(g: Graph, f: Feature, to: [number, number]): Value {
  if (f.hw[0] === to[0] && f.hw[1] === to[1]) return f.v;
  return g.op('Resize', [f.v, null, null, g.constI64([1, f.c, to[0], to[1]])], { mode: 'linear', coordinate_transformation_mode: 'align_corners' }, { hint: 'resize' });
}

/** `tap` with every name under `prefix` (`dbg.bb.full` + `stage0`); undefined stays undefined. */
export function tapUnder(tap: Tap | undefined, prefix: string): Tap | undefined {
  return tap && ((name, v) => tap(`${prefix}.${name}`, v));
}
