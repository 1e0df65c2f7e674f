// Causal grouped-query attention with a key-padding mask (decoder LLMs: HF Qwen3's eager path). Bidirectional
// multi-head attention without a mask is `Layers.attention`.
import type { Graph, Value } from '../onnx-graph.ts';

/** float32's lowest value: what HF's eager attention puts at masked entries. */
const MASKED = -3.4028234663852886e38;

/**
 * The additive attention bias `[B, 1, 1, L, L]` for an int64 `attention_mask` `[B, L]` (1 = real token): 0 where
 * key j is visible to query i (j ≤ i and j a real token), float32's lowest value elsewhere, so a row whose keys are
 * all masked (never the case with right padding, where pad queries still see the prompt) becomes a uniform average,
 * not NaN. Built once per graph and shared by every layer.
 */
export function causalPaddingBias(g: Graph, attentionMask: Value): Value {
  return g.within('mask', () => {
    const seqLen = g.op('Squeeze', [g.op('Shape', [attentionMask], { start: 1, end: 2 }), g.constI64([0])]);
    const pos = g.op('Range', [g.constI64([0], [], 'zero'), seqLen, g.constI64([1], [], 'one')]);
    const causal = g.op('LessOrEqual', [g.op('Unsqueeze', [pos, g.constI64([0])]), g.op('Unsqueeze', [pos, g.constI64([1])])]); // [L, L]
    const keyOk = g.op('Unsqueeze', [g.cast(attentionMask, 'bool'), g.constI64([1, 2])]); // [B, 1, 1, L]
    const bias = g.op('Where', [g.op('And', [causal, keyOk]), g.scalarF32(0), g.scalarF32(MASKED)]);
    return g.op('Unsqueeze', [bias, g.constI64([2])]);
  });
}

export interface GqaShape {
  heads: number;
  kvHeads: number;
  headDim: number;
}

/**
 * `softmax(q kᵀ / √d + bias) v` per query head, q `[B, L, heads, d]`, k and v `[B, L, kvHeads, d]`, bias from
 * `causalPaddingBias`; the result `[B, L, heads·d]`. K/V are not repeated: query head h = kv·groups + r is grouped
 * under its KV head and MatMul broadcasts K/V over the group axis. Scores and softmax in fp32.
 */
export function causalGqa(g: Graph, q: Value, k: Value, v: Value, bias: Value, s: GqaShape): Value {
  const groups = s.heads / s.kvHeads;
  const qg = g.op('Transpose', [g.op('Reshape', [q, g.constI64([0, 0, s.kvHeads, groups, s.headDim])])], { perm: [0, 2, 3, 1, 4] }); // [B, kv, g, L, d]
  const kt = g.op('Unsqueeze', [g.op('Transpose', [k], { perm: [0, 2, 3, 1] }), g.constI64([2])]); // [B, kv, 1, d, L]
  const vv = g.op('Unsqueeze', [g.op('Transpose', [v], { perm: [0, 2, 1, 3] }), g.constI64([2])]); // [B, kv, 1, L, d]
  const scores = g.op('Add', [g.op('Mul', [g.op('MatMul', [qg, kt]), g.scalarF32(1 / Math.sqrt(s.headDim))]), bias]);
  const probs = g.op('Softmax', [scores], { axis: -1 });
  const out = g.op('Transpose', [g.op('MatMul', [probs, vv])], { perm: [0, 3, 1, 2, 4] }); // [B, L, kv, g, d]
  return g.op('Reshape', [out, g.constI64([0, 0, s.heads * s.headDim])], {}, { hint: 'attention' });
}
