// The FLUX.2 flow transformer's forward (BFL `flux2.model.Flux2`, spec §1.2–1.3), once, as the math: the runtime
// (runtime.ts) decides how it is cut into sessions, where its weights live and what its products compute in.
// All sequence lengths are symbolic, so one compiled graph serves every image size, text length, reference
// count and batch size.
import { Graph, type Value } from '../../graph/onnx-graph.ts';
import { Layers } from '../../graph/nn/layers.ts';
import { ropeInterleaved, ropeTablesND, type RopeTables } from '../../graph/nn/rope.ts';
import { EPS, headDim, mlpHidden, type Flux2Config } from './config.ts';

/** `timestep_embedding(t, 256)`: 256 dims, max_period 10000, t scaled by 1000 (spec §1.2). */
const TIME_DIM = 256;
const MAX_PERIOD = 10000;
const TIME_FACTOR = 1000;

/** The graph's inputs: what changes per step (x, timesteps, guidance) and what does not (the rest). */
export const STEP_INVARIANT_INPUTS: ReadonlySet<string> = new Set(['x_ids', 'ctx', 'ctx_ids']);

type Rope = RopeTables;

/** §1.2 `[cos | sin](1000·t · exp(−ln(10000)·k/128))`, k = 0..127, in fp32. */
function timestepEmbedding(g: Graph, t: Value): Value {
  const half = TIME_DIM / 2;
  const freqs = Float32Array.from({ length: half }, (_, k) => Math.exp((-Math.log(MAX_PERIOD) * k) / half));
  const tt = g.op('Unsqueeze', [g.op('Mul', [t, g.scalarF32(TIME_FACTOR)]), g.constI64([1])]); // [B, 1]
  const args = g.op('Mul', [tt, g.constF32(freqs, [1, half], 'freqs')]); // [B, 128]
  return g.op('Concat', [g.op('Cos', [args]), g.op('Sin', [args])], { axis: -1 });
}

/** `MLPEmbedder`: `out_layer(silu(in_layer(x)))`. */
function mlpEmbedder(nn: Layers, x: Value): Value {
  return nn.linear(nn.silu(nn.linear(x, 'in_layer')), 'out_layer');
}

/** `Modulation`: `lin(silu(vec))` split into n [B, 1, H] vectors (shift, scale, gate, …). */
function modulation(nn: Layers, vec: Value, n: number, H: number, linear = 'lin'): Value[] {
  const g = nn.g;
  const m = g.op('Unsqueeze', [nn.linear(nn.silu(vec), linear), g.constI64([1])]);
  return g.opN('Split', [m, g.constI64(Array(n).fill(H))], n, { axis: -1 });
}

/** `(1 + scale) · x + shift`. */
function modulate(g: Graph, x: Value, shift: Value, scale: Value): Value {
  return g.op('Add', [g.op('Mul', [x, g.op('Add', [scale, g.scalarF32(1)])]), shift], {}, { hint: 'modulate' });
}

/**
 * q, k, v [B, L, H] from a fused `[q | k | v]` Linear (one product per third: same FLOPs as one product, without a
 * Split of the wide activation); QK-norm (RMSNorm per head) and RoPE on q and k.
 */
function qkv(nn: Layers, c: Flux2Config, x: Value, linear: string, norm: Layers, pe: Rope): Value[] {
  const g = nn.g;
  const H = c.hiddenSize;
  const hd = headDim(c);
  const heads = (t: Value) => g.op('Reshape', [t, g.constI64([0, 0, c.numHeads, hd])]);
  const flat = (t: Value) => g.op('Reshape', [t, g.constI64([0, 0, H])]);
  const q = ropeInterleaved(g, norm.rmsNorm(heads(nn.linear(x, linear, { rows: [0, H] })), 'query_norm.scale', EPS), pe, hd);
  const k = ropeInterleaved(g, norm.rmsNorm(heads(nn.linear(x, linear, { rows: [H, 2 * H] })), 'key_norm.scale', EPS), pe, hd);
  return [flat(q), flat(k), nn.linear(x, linear, { rows: [2 * H, 3 * H] })];
}

/** SwiGLU over the `[gate | up]` rows starting at `offset` of a fused Linear: `silu(gate) · up`. */
function swiglu(nn: Layers, c: Flux2Config, x: Value, linear: string, offset: number): Value {
  const M = mlpHidden(c);
  const gate = nn.linear(x, linear, { rows: [offset, offset + M] });
  const up = nn.linear(x, linear, { rows: [offset + M, offset + 2 * M] });
  return nn.g.op('Mul', [nn.silu(gate), up], {}, { hint: 'swiglu' });
}

function seqLen(g: Graph, x: Value): Value {
  return g.op('Shape', [x], { start: 1, end: 2 });
}

/** `DoubleStreamBlock`: each stream's own q/k/v and MLP, one joint attention (text first), gated residuals. */
function doubleBlock(nn: Layers, c: Flux2Config, img: Value, txt: Value, pe: { img: Rope; txt: Rope }, mImg: Value[], mTxt: Value[]): [Value, Value] {
  const g = nn.g;
  const H = c.hiddenSize;
  const normed = (x: Value, m: Value[]) => modulate(g, nn.layerNorm(x, EPS, undefined, H), m[0], m[1]);
  const [qi, ki, vi] = qkv(nn, c, normed(img, mImg), 'img_attn.qkv', nn.at('img_attn.norm'), pe.img);
  const [qt, kt, vt] = qkv(nn, c, normed(txt, mTxt), 'txt_attn.qkv', nn.at('txt_attn.norm'), pe.txt);
  const joint = (a: Value, b: Value) => g.op('Concat', [a, b], { axis: 1 });
  const attn = nn.attention(joint(qt, qi), joint(kt, ki), joint(vt, vi), c.numHeads, 1 / Math.sqrt(headDim(c)));
  const [attnTxt, attnImg] = g.opN('Split', [attn, g.op('Concat', [seqLen(g, txt), seqLen(g, img)], { axis: 0 })], 2, { axis: 1 });
  const stream = (x: Value, a: Value, m: Value[], s: 'img' | 'txt') => {
    const h = g.op('Add', [x, g.op('Mul', [m[2], nn.linear(a, `${s}_attn.proj`)])]);
    const mlp = nn.linear(swiglu(nn, c, modulate(g, nn.layerNorm(h, EPS, undefined, H), m[3], m[4]), `${s}_mlp.0`, 0), `${s}_mlp.2`);
    return g.op('Add', [h, g.op('Mul', [m[5], mlp])]);
  };
  return [stream(img, attnImg, mImg, 'img'), stream(txt, attnTxt, mTxt, 'txt')];
}

/** `SingleStreamBlock`: linear1 gives q|k|v and the MLP's gate|up; linear2 over [attention ‖ MLP], gated residual. */
function singleBlock(nn: Layers, c: Flux2Config, h: Value, pe: Rope, m: Value[]): Value {
  const g = nn.g;
  const H = c.hiddenSize;
  const x = modulate(g, nn.layerNorm(h, EPS, undefined, H), m[0], m[1]);
  const [q, k, v] = qkv(nn, c, x, 'linear1', nn.at('norm'), pe);
  const attn = nn.attention(q, k, v, c.numHeads, 1 / Math.sqrt(headDim(c)));
  const mlp = swiglu(nn, c, x, 'linear1', 3 * H);
  // linear2(cat([attn, mlp])) as two products by the weight's column blocks: no Concat of the wide activation
  const out = g.op('Add', [nn.linear(attn, 'linear2', { cols: [0, H] }), nn.linear(mlp, 'linear2', { cols: [H, H + mlpHidden(c)] })]);
  return g.op('Add', [h, g.op('Mul', [m[2], out])]);
}

/** `LastLayer`: adaLN with BFL's (shift, scale) order, then the projection back to the latent channels. */
function finalLayer(nn: Layers, c: Flux2Config, img: Value, vec: Value): Value {
  const [shift, scale] = modulation(nn, vec, 2, c.hiddenSize, 'adaLN_modulation.1');
  return nn.linear(modulate(nn.g, nn.layerNorm(img, EPS, undefined, c.hiddenSize), shift, scale), 'linear');
}

/**
 * Builds the whole forward: inputs `x` [B, N, C] (target then reference tokens), `x_ids` [B, N, 4], `timesteps`
 * [B], `ctx` [B, L, D], `ctx_ids` [B, L, 4] (and `guidance` [B] for guidance-embedding models); output `output`
 * [B, N, C], the velocity of every input token.
 */
export function buildFlux2Forward(nn: Layers, c: Flux2Config): void {
  const g = nn.g;
  const H = c.hiddenSize;
  const n = c.axesDim.length;
  const x = g.input('x', 'float32', ['batch', 'n_img', c.inChannels]);
  const xIds = g.input('x_ids', 'int64', ['batch', 'n_img', n]);
  const t = g.input('timesteps', 'float32', ['batch']);
  const ctx = g.input('ctx', 'float32', ['batch', 'n_txt', c.contextInDim]);
  const ctxIds = g.input('ctx_ids', 'int64', ['batch', 'n_txt', n]);

  let vec = mlpEmbedder(nn.at('time_in'), timestepEmbedding(g, t));
  if (c.useGuidanceEmbed) vec = g.op('Add', [vec, mlpEmbedder(nn.at('guidance_in'), timestepEmbedding(g, g.input('guidance', 'float32', ['batch'])))]);
  // the shared modulations: computed once from vec, used by every block (spec §1.1)
  const modImg = modulation(nn.at('double_stream_modulation_img'), vec, 6, H);
  const modTxt = modulation(nn.at('double_stream_modulation_txt'), vec, 6, H);
  const modSingle = modulation(nn.at('single_stream_modulation'), vec, 3, H);

  let img = nn.linear(x, 'img_in');
  let txt = nn.linear(ctx, 'txt_in');
  const peTxt = ropeTablesND(g, ctxIds, c.axesDim, c.theta);
  const peImg = ropeTablesND(g, xIds, c.axesDim, c.theta);
  for (let i = 0; i < c.depth; i++) {
    [img, txt] = nn.block(`double_blocks.${i}`, (b) => doubleBlock(b, c, img, txt, { img: peImg, txt: peTxt }, modImg, modTxt));
  }
  const joint = (a: Value, b: Value) => g.op('Concat', [a, b], { axis: 1 });
  let h = joint(txt, img);
  const pe = { cos: joint(peTxt.cos, peImg.cos), sin: joint(peTxt.sin, peImg.sin) };
  for (let i = 0; i < c.depthSingleBlocks; i++) h = nn.block(`single_blocks.${i}`, (b) => singleBlock(b, c, h, pe, modSingle));
  // drop the text tokens: h[:, n_txt:]
  img = c.depthSingleBlocks > 0 ? g.op('Slice', [h, seqLen(g, txt), g.constI64([Number.MAX_SAFE_INTEGER]), g.constI64([1])]) : img;
  g.output(finalLayer(nn.at('final_layer'), c, img, vec), 'output', ['batch', 'n_img', c.inChannels]);
}
