// Rotary position embeddings, both layouts in use: FLUX.2's interleaved pairs over several position axes
// (`EmbedND` + `apply_rope`, spec §2.1) and Qwen's rotate-half (`rotate_half`, HF Qwen3).
import type { Graph, Value } from '../onnx-graph.ts';

export interface RopeTables {
  cos: Value;
  sin: Value;
}

/**
 * `EmbedND`: tables for int64 positions `ids` [B, L, n_axes], each [B, L, 1, headDim] with every pair's cosine
 * (sine) on both of its dims. Angles = ids · F with F[axis, j] = θ^(−2j/dim) for the pairs the axis owns and 0
 * elsewhere — the per-axis tables side by side as one MatMul — in float64 (as diffusers), so positions keep their
 * angle exact to fp32 precision.
 */
export function ropeTablesND(g: Graph, ids: Value, axesDim: readonly number[], theta: number): RopeTables {
  const pairs = axesDim.reduce((a, b) => a + b, 0) / 2;
  const F = new Float64Array(axesDim.length * pairs);
  let j0 = 0;
  axesDim.forEach((dim, axis) => {
    for (let j = 0; j < dim / 2; j++) F[axis * pairs + j0 + j] = 1 / theta ** ((2 * j) / dim);
    j0 += dim / 2;
  });
  const freqs = g.const({ type: 'float64', dims: [axesDim.length, pairs], data: F }, 'rope_freqs');
  const angles = g.op('Unsqueeze', [g.op('MatMul', [g.cast(ids, 'float64'), freqs]), g.constI64([-1])]); // [B, L, pairs, 1]
  const table = (op: string) => {
    const t = g.cast(g.op(op, [angles]), 'float32');
    return g.op('Reshape', [g.op('Concat', [t, t], { axis: -1 }), g.constI64([0, 0, 1, 2 * pairs])]);
  };
  return { cos: table('Cos'), sin: table('Sin') };
}

/**
 * Interleaved RoPE on x [B, L, heads, headDim]: each pair `(x0, x1)` becomes `(cos·x0 − sin·x1, sin·x0 + cos·x1)`,
 * written as `x·cos + (x R)·sin` with R the constant pair-swap-and-negate matrix (a MatMul by ±1 and zeros is
 * exact), so the pairs are never split apart.
 */
export function ropeInterleaved(g: Graph, x: Value, pe: RopeTables, headDim: number): Value {
  const R = new Float32Array(headDim * headDim);
  for (let j = 0; j < headDim; j += 2) {
    R[(j + 1) * headDim + j] = -1; // (xR)[2j] = −x[2j+1]
    R[j * headDim + j + 1] = 1; //    (xR)[2j+1] = x[2j]
  }
  const rotated = g.op('MatMul', [x, g.constF32(R, [headDim, headDim], 'rope_swap')]);
  return g.op('Add', [g.op('Mul', [x, pe.cos]), g.op('Mul', [rotated, pe.sin])], {}, { hint: 'rope' });
}

/**
 * Rotate-half RoPE tables for positions `0 … maxPositions − 1` as HF Qwen3 computes them in float32:
 * `inv_freq = 1 / θ^(2i/d)`, angle = `inv_freq · position` (both rounded to float32), halves duplicated
 * (`cat(freqs, freqs)`); each `[maxPositions · headDim]` row-major.
 */
export function rotateHalfAngles(headDim: number, theta: number, maxPositions: number): { cos: Float32Array; sin: Float32Array } {
  const half = headDim / 2;
  const inv = new Float32Array(half);
  for (let i = 0; i < half; i++) inv[i] = 1 / Math.fround(theta ** Math.fround((2 * i) / headDim));
  const cos = new Float32Array(maxPositions * headDim);
  const sin = new Float32Array(maxPositions * headDim);
  for (let p = 0; p < maxPositions; p++) {
    for (let i = 0; i < half; i++) {
      const a = Math.fround(inv[i] * p);
      cos[p * headDim + i] = cos[p * headDim + half + i] = Math.cos(a);
      sin[p * headDim + i] = sin[p * headDim + half + i] = Math.sin(a);
    }
  }
  return { cos, sin };
}

/**
 * Rotate-half tables for the positions `0 … L − 1` of `x` [B, L, …]: the constant tables cut to L, each
 * [L, 1, headDim] (broadcast over batch and heads).
 */
export function ropeTablesRotateHalf(g: Graph, x: Value, headDim: number, theta: number, maxPositions: number): RopeTables {
  const t = rotateHalfAngles(headDim, theta, maxPositions);
  const seqLen = g.op('Shape', [x], { start: 1, end: 2 });
  const cut = (v: Float32Array, hint: string) => g.op('Slice', [g.constF32(v, [maxPositions, 1, headDim], hint), g.constI64([0]), seqLen, g.constI64([0])]);
  return { cos: cut(t.cos, 'rope_cos'), sin: cut(t.sin, 'rope_sin') };
}

/** Rotate-half RoPE on x [B, L, heads, headDim]: `x·cos + rotate_half(x)·sin`, `rotate_half(x) = [−x₂, x₁]`. */
export function ropeRotateHalf(g: Graph, x: Value, pe: RopeTables, headDim: number): Value {
  const [a, b] = g.opN('Split', [x, g.constI64([headDim / 2, headDim / 2])], 2, { axis: -1 });
  const rotated = g.op('Concat', [g.op('Neg', [b]), a], { axis: -1 });
  return g.op('Add', [g.op('Mul', [x, pe.cos]), g.op('Mul', [rotated, pe.sin])], {}, { hint: 'rope' });
}
