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
