// The Qwen3 decoder's forward (HF `Qwen3Model`), once, as the math, for the FLUX.2 [klein] text encoder: only the
// layers up to the deepest hidden state asked for are built (27 of Qwen3-4B's 36 for klein's 9/18/27). The
// embedding rows come in as an input (read on the host: the 151936-row table never reaches ORT); the runtime
// (runtime.ts) decides where the weights live and what the products compute in.
import type { Value } from '../../graph/onnx-graph.ts';
import type { Layers } from '../../graph/nn/layers.ts';
import { causalGqa, causalPaddingBias } from '../../graph/nn/attention.ts';
import { ropeRotateHalf, ropeTablesRotateHalf, type RopeTables } from '../../graph/nn/rope.ts';
import { DOWN_PROJ_HEADROOM, layersNeeded, type Qwen3Config } from './config.ts';

export interface Qwen3Outputs {
  /** Hidden-state indices concatenated, in this order, into the `context` output. */
  outputLayers: readonly number[];
  /** Hidden states also output on their own as `hidden_states.k` (conformance, debugging). */
  hiddenStates: readonly number[];
  /** Longest sequence the RoPE tables cover. */
  maxPositions: number;
}

/** `Qwen3Attention`: q/k/v, per-head RMSNorm of q and k, rotate-half RoPE, causal GQA, o_proj. */
function selfAttention(nn: Layers, c: Qwen3Config, h: Value, bias: Value, pe: RopeTables): Value {
  const g = nn.g;
  const hd = c.headDim;
  const heads = (t: Value, n: number) => g.op('Reshape', [t, g.constI64([0, 0, n, hd])]);
  const q = ropeRotateHalf(g, nn.rmsNorm(heads(nn.linear(h, 'q_proj'), c.numAttentionHeads), 'q_norm.weight', c.rmsNormEps), pe, hd);
  const k = ropeRotateHalf(g, nn.rmsNorm(heads(nn.linear(h, 'k_proj'), c.numKeyValueHeads), 'k_norm.weight', c.rmsNormEps), pe, hd);
  const v = heads(nn.linear(h, 'v_proj'), c.numKeyValueHeads);
  const attn = causalGqa(g, q, k, v, bias, { heads: c.numAttentionHeads, kvHeads: c.numKeyValueHeads, headDim: hd });
  return nn.linear(attn, 'o_proj');
}

/** `Qwen3MLP`: `down(silu(gate(x)) · up(x))`; down_proj's product gets fp16 headroom (config.ts). */
function mlp(nn: Layers, h: Value): Value {
  const act = nn.g.op('Mul', [nn.silu(nn.linear(h, 'gate_proj')), nn.linear(h, 'up_proj')], {}, { hint: 'swiglu' });
  return nn.linear(act, 'down_proj', { headroom: DOWN_PROJ_HEADROOM });
}

/** `Qwen3DecoderLayer`: pre-norm attention and MLP, each with a residual add. */
function decoderLayer(nn: Layers, c: Qwen3Config, x: Value, bias: Value, pe: RopeTables): Value {
  const g = nn.g;
  const h = g.op('Add', [x, selfAttention(nn.at('self_attn'), c, nn.rmsNorm(x, 'input_layernorm.weight', c.rmsNormEps), bias, pe)], {}, { hint: 'residual' });
  return g.op('Add', [h, mlp(nn.at('mlp'), nn.rmsNorm(h, 'post_attention_layernorm.weight', c.rmsNormEps))], {}, { hint: 'residual' });
}

/**
 * Builds the encoder: inputs `inputs_embeds` fp32 `[batch, seq, hidden]` (the prompt's embedding rows) and
 * `attention_mask` int64 `[batch, seq]`; output `context` `[batch, seq, outputLayers.length · hidden]` (the hidden
 * states stacked per token) and `hidden_states.k` `[batch, seq, hidden]` for each of `o.hiddenStates`.
 */
export function buildQwen3Forward(nn: Layers, c: Qwen3Config, o: Qwen3Outputs): void {
  const g = nn.g;
  const H = c.hiddenSize;
  const embeds = g.input('inputs_embeds', 'float32', ['batch', 'seq', H]);
  const bias = causalPaddingBias(g, g.input('attention_mask', 'int64', ['batch', 'seq']));
  const pe = ropeTablesRotateHalf(g, embeds, c.headDim, c.ropeTheta, o.maxPositions);
  const hidden = new Map<number, Value>([[0, embeds]]);
  let x = embeds;
  for (let i = 0; i < layersNeeded(o); i++) {
    x = nn.block(`layers.${i}`, (b) => decoderLayer(b, c, x, bias, pe));
    // HF's last hidden state is the final-normed one; every earlier index is the raw residual stream
    hidden.set(i + 1, i + 1 === c.numHiddenLayers ? nn.rmsNorm(x, 'norm.weight', c.rmsNormEps) : x);
  }
  const stacked = g.op('Concat', o.outputLayers.map((k) => hidden.get(k)!), { axis: -1 });
  g.output(stacked, 'context', ['batch', 'seq', o.outputLayers.length * H]);
  for (const k of new Set(o.hiddenStates)) g.output(hidden.get(k)!, `hidden_states.${k}`, ['batch', 'seq', H]);
}
