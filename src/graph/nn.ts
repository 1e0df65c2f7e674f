// Neural-network building blocks on top of the graph builder, shared by every model file.
import type { Graph, Value } from './onnx-graph.ts';
import type { TensorInfo } from '../weights/safetensors.ts';

/** Compute dtype of the CPU graphs: ORT's CPU EP has no bf16 MatMul, so bf16 weights are cast in the graph. */
export const COMPUTE = 'float32' as const;

/**
 * `y = x Wᵀ` for a PyTorch Linear weight `W [out, in]` (no bias: FLUX.2 and Qwen3 have none). The weight is
 * transposed inside the graph so ORT constant-folds it into a pre-packed fp32 [in, out] matrix at load time.
 */
export function linear(g: Graph, x: Value, w: TensorInfo, bias?: TensorInfo): Value {
  const wt = g.op('Transpose', [g.weight(w, COMPUTE)], { perm: [1, 0] }, { hint: 'wT' });
  const y = g.op('MatMul', [x, wt]);
  return bias ? g.op('Add', [y, g.weight(bias, COMPUTE)]) : y;
}

export function silu(g: Graph, x: Value): Value {
  return g.op('Mul', [x, g.op('Sigmoid', [x])], {}, { hint: 'silu' });
}

/** LayerNorm over the last axis without affine parameters. */
export function layerNormNoAffine(g: Graph, x: Value, dim: number, eps: number): Value {
  return g.op('LayerNormalization', [x, g.constF32(new Float32Array(dim).fill(1), [dim], 'ones')], { axis: -1, epsilon: { float: eps } });
}

/** RMSNorm over the last axis: `x * rsqrt(mean(x²) + eps) * weight`, computed in fp32. */
export function rmsNorm(g: Graph, x: Value, weight: Value, eps: number): Value {
  const ms = g.op('ReduceMean', [g.op('Mul', [x, x]), g.constI64([-1])], { keepdims: 1 });
  const inv = g.op('Reciprocal', [g.op('Sqrt', [g.op('Add', [ms, g.scalarF32(eps)])])]);
  return g.op('Mul', [g.op('Mul', [x, inv]), weight], {}, { hint: 'rmsnorm' });
}

/** `(1 + scale) * x + shift`, the adaLN modulation. */
export function modulate(g: Graph, x: Value, shift: Value, scale: Value): Value {
  return g.op('Add', [g.op('Mul', [x, g.op('Add', [scale, g.scalarF32(1)])]), shift], {}, { hint: 'modulate' });
}

/** Splits the last axis into pieces of the given sizes. */
export function splitLast(g: Graph, x: Value, sizes: number[]): Value[] {
  return g.opN('Split', [x, g.constI64(sizes)], sizes.length, { axis: -1 });
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
