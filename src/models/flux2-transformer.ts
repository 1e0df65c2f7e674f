// The FLUX.2 flow transformer (BFL `flux2.model.Flux2`) as an ONNX graph, following flux2-klein-spec.md §1–2.
// Config-driven: klein 4B, klein 9B and FLUX.2 [dev] differ only in the numbers below (the golden tiny model too).
// The graph is written against BFL weight names; src/weights/flux2-layouts.ts maps them onto BFL or diffusers files.
// All sequence lengths are symbolic, so one compiled graph serves every image size, text length, reference count
// and batch size.
import type { Graph, Value } from '../graph/onnx-graph.ts';
import { Graph as GraphBuilder, MS_DOMAIN } from '../graph/onnx-graph.ts';
import { COMPUTE, concat, layerNormNoAffine, modulate, silu, splitLast } from '../graph/nn.ts';
import { DTYPE_SIZE, f16ToF32, f32ToBf16, f32ToF16, readRaw, writeSafetensors, type TensorInfo, type TensorToWrite } from '../weights/safetensors.ts';
import { loadGraph, f32, i64, ort, type SessionConfig } from '../graph/session.ts';
import { diffusersSource, flux2BflShapes, openFlux2Checkpoint, type Flux2Layout, type Flux2Weights } from '../weights/flux2-layouts.ts';

// ───────────────────────── §1.1 hyperparameters ─────────────────────────

export interface Flux2Config {
  inChannels: number;
  /** Width of the text context: 3 × the text encoder's hidden size. */
  contextInDim: number;
  hiddenSize: number;
  numHeads: number;
  /** Double-stream blocks. */
  depth: number;
  depthSingleBlocks: number;
  /** RoPE dims per position axis (t, h, w, l); they sum to the head dim. */
  axesDim: number[];
  theta: number;
  mlpRatio: number;
  /** FLUX.2 [dev] embeds a guidance value; klein has no guidance embedder. */
  useGuidanceEmbed: boolean;
}

export const KLEIN_4B: Flux2Config = { inChannels: 128, contextInDim: 7680, hiddenSize: 3072, numHeads: 24, depth: 5, depthSingleBlocks: 20, axesDim: [32, 32, 32, 32], theta: 2000, mlpRatio: 3, useGuidanceEmbed: false };
export const KLEIN_9B: Flux2Config = { ...KLEIN_4B, contextInDim: 12288, hiddenSize: 4096, numHeads: 32, depth: 8, depthSingleBlocks: 24 };
export const FLUX2_DEV: Flux2Config = { ...KLEIN_4B, contextInDim: 15360, hiddenSize: 6144, numHeads: 48, depth: 8, depthSingleBlocks: 48, useGuidanceEmbed: true };

/** LayerNorm and QK-RMSNorm epsilon (spec §1.2). */
const EPS = 1e-6;
/** `timestep_embedding(t, 256)`: 256 dims, max_period 10000, t scaled by 1000 (spec §1.2). */
const TIME_DIM = 256;
const MAX_PERIOD = 10000;
const TIME_FACTOR = 1000;

export function headDim(c: Flux2Config): number {
  return c.hiddenSize / c.numHeads;
}

export function mlpHidden(c: Flux2Config): number {
  return Math.round(c.hiddenSize * c.mlpRatio);
}

/** The config of a checkpoint file or folder (BFL params JSON, diffusers config, or read off the tensor shapes). */
export function readFlux2Config(pathOrFolder: string): Flux2Config {
  return openFlux2Checkpoint(pathOrFolder).config;
}

// ───────────────────────── graph building ─────────────────────────

/**
 * Graph-building context: the builder, the weights by BFL name, the config, and the weights this graph takes in
 * memory (see `linear`).
 */
interface Ctx {
  g: Graph;
  w: Flux2Weights;
  c: Flux2Config;
  weights: MemoryWeight[];
}

/** A weight handed to ORT in memory as fp32: its stored row blocks (optionally a column range), converted at load. */
export interface MemoryWeight {
  /** ORT external-data location of the converted bytes. */
  location: string;
  parts: TensorInfo[];
  /** Columns `[start, end)` of a 2-D weight; all columns when absent. */
  cols?: [number, number];
  shape: number[];
}

/**
 * A BFL weight (or a row/column block of it) as an fp32 initializer. Every weight reaches ORT as fp32 bytes
 * converted in JS (bf16 → fp32 is a 16-bit shift; diffusers' split q/k/v simply become consecutive rows), passed as
 * in-memory external data: ORT cannot mix in-memory and on-disk external data in one session, and the in-place
 * bf16 + Cast route made ORT constant-fold every weight at load (minutes for klein 4B, with a second fp32 copy at
 * its peak).
 */
function weight(cx: Ctx, name: string, rows?: [number, number], cols?: [number, number]): Value {
  const parts = rows ? cx.w.rows(name, rows[0], rows[1]) : cx.w.get(name);
  const nRows = parts.reduce((n, p) => n + p.shape[0], 0);
  const shape = parts[0].shape.length === 1 ? [nRows] : [nRows, cols ? cols[1] - cols[0] : parts[0].shape[1]];
  const tag = `${rows ? `.rows_${rows[0]}_${rows[1]}` : ''}${cols ? `.cols_${cols[0]}_${cols[1]}` : ''}`;
  const location = `flux2-mem/${name}${tag}`;
  cx.weights.push({ location, parts, cols, shape });
  return cx.g.inMemoryWeight(`${name}${tag}`, COMPUTE, shape, location);
}

/**
 * PyTorch `Linear(bias=False)`: `x Wᵀ` with W stored `[out, in]`; `rows` takes only some outputs, `cols` only some
 * inputs. Fused projections (q|k|v, gate|up) run as one product per part instead of one product followed by a
 * Split of the activations: same FLOPs, and ORT's Split along the last axis cost a fifth of a block's time.
 * `FusedMatMul(transB)` multiplies by the transpose directly, so ORT pre-packs the weight once at load.
 */
function linear(cx: Ctx, x: Value, name: string, rows?: [number, number], cols?: [number, number]): Value {
  return cx.g.op('FusedMatMul', [x, weight(cx, name, rows, cols)], { transB: 1 }, { domain: MS_DOMAIN, hint: name.replace(/\.weight$/, '') });
}

/** `[0, 0, …dims]` reshape keeping the leading (batch, sequence) dims. */
function reshapeKeep2(g: Graph, x: Value, dims: number[]): Value {
  return g.op('Reshape', [x, g.constI64([0, 0, ...dims])]);
}

/** §1.2 timestep embedding: `[cos | sin](1000·t · exp(−ln(10000)·k/128))`, k = 0..127, computed in fp32. */
function timestepEmbedding(g: Graph, t: Value): Value {
  const half = TIME_DIM / 2;
  const freqs = Float32Array.from({ length: half }, (_, k) => Math.exp((-Math.log(MAX_PERIOD) * k) / half));
  const tt = g.op('Unsqueeze', [g.op('Mul', [t, g.scalarF32(TIME_FACTOR)]), g.constI64([1])]); // [B, 1]
  const args = g.op('Mul', [tt, g.constF32(freqs, [1, half], 'freqs')]); // [B, 128]
  return concat(g, [g.op('Cos', [args]), g.op('Sin', [args])], -1);
}

/** `MLPEmbedder`: `out_layer(silu(in_layer(x)))`. */
function mlpEmbedder(cx: Ctx, x: Value, prefix: string): Value {
  return linear(cx, silu(cx.g, linear(cx, x, `${prefix}.in_layer.weight`)), `${prefix}.out_layer.weight`);
}

/** `Modulation`: `lin(silu(vec))` as [B, 1, n·H]; blocks split it into (shift, scale, gate, …) vectors. */
function modulation(cx: Ctx, vec: Value, name: string): Value {
  return cx.g.op('Unsqueeze', [linear(cx, silu(cx.g, vec), name), cx.g.constI64([1])]);
}

/**
 * RoPE tables for int64 positions `ids` [B, L, n_axes] (spec §2.1), each [B, L, 1, head_dim]: `cos` with every
 * pair's cosine on both of its dims, `sin` likewise, ready for `applyRope`.
 */
function ropeTables(cx: Ctx, ids: Value): { cos: Value; sin: Value } {
  const { g, c } = cx;
  const pairs = headDim(c) / 2;
  // Angles = ids · F, where F[axis, j] = omega_j of that axis for the pairs the axis owns and 0 elsewhere: this
  // writes the per-axis tables side by side (EmbedND's concatenation) as one MatMul. Done in float64 (as diffusers)
  // so positions up to the 512 text tokens keep their angle exact to fp32 precision.
  const F = new Float64Array(c.axesDim.length * pairs);
  let j0 = 0;
  c.axesDim.forEach((dim, axis) => {
    for (let j = 0; j < dim / 2; j++) F[axis * pairs + j0 + j] = 1 / c.theta ** ((2 * j) / dim);
    j0 += dim / 2;
  });
  const freqs = g.const({ type: 'float64', dims: [c.axesDim.length, pairs], data: new Uint8Array(F.buffer) }, 'rope_freqs');
  const angles = g.op('Unsqueeze', [g.op('MatMul', [g.op('Cast', [ids], { to: 11 }), freqs]), g.constI64([-1])]); // [B, L, pairs, 1]
  const table = (op: string) => {
    const t = g.op('Cast', [g.op(op, [angles])], { to: 1 });
    return g.op('Reshape', [concat(g, [t, t], -1), g.constI64([0, 0, 1, 2 * pairs])]);
  };
  return { cos: table('Cos'), sin: table('Sin') };
}

/**
 * `apply_rope` on x [B, L, heads, head_dim]: each adjacent pair `(x0, x1)` becomes `(cos·x0 − sin·x1,
 * sin·x0 + cos·x1)`. Written as `x·cos + (x R)·sin` with R the constant pair-swap-and-negate matrix, so the pairs
 * never have to be split apart (a MatMul by ±1 and zeros is exact).
 */
function applyRope(cx: Ctx, x: Value, pe: { cos: Value; sin: Value }): Value {
  const { g, c } = cx;
  const hd = headDim(c);
  const R = new Float32Array(hd * hd);
  for (let j = 0; j < hd; j += 2) {
    R[(j + 1) * hd + j] = -1; // (xR)[2j] = −x[2j+1]
    R[j * hd + j + 1] = 1; //    (xR)[2j+1] = x[2j]
  }
  const rotated = g.op('MatMul', [x, g.constF32(R, [hd, hd], 'rope_swap')]);
  return g.op('Add', [g.op('Mul', [x, pe.cos]), g.op('Mul', [rotated, pe.sin])], {}, { hint: 'rope' });
}

/** QK-norm: RMSNorm over each head's dims with a learned scale, eps 1e-6, in fp32 (spec §1.2). */
function qkNorm(cx: Ctx, x: Value, scaleName: string): Value {
  return cx.g.op('SimplifiedLayerNormalization', [x, weight(cx, scaleName)], { axis: -1, epsilon: { float: EPS } }, { hint: 'qk_norm' });
}

/**
 * q, k, v [B, L, H] of one attention from a fused `[q | k | v]` weight (rows head-major inside each third): QK-norm
 * per head, then RoPE, on [B, L, heads, head_dim] views.
 */
function qkv(cx: Ctx, x: Value, name: string, normPrefix: string, pe: { cos: Value; sin: Value }): [Value, Value, Value] {
  const { g, c } = cx;
  const H = c.hiddenSize;
  const heads = (t: Value) => reshapeKeep2(g, t, [c.numHeads, headDim(c)]);
  const flat = (t: Value) => reshapeKeep2(g, t, [H]);
  const q = applyRope(cx, qkNorm(cx, heads(linear(cx, x, name, [0, H])), `${normPrefix}.query_norm.scale`), pe);
  const k = applyRope(cx, qkNorm(cx, heads(linear(cx, x, name, [H, 2 * H])), `${normPrefix}.key_norm.scale`), pe);
  return [flat(q), flat(k), linear(cx, x, name, [2 * H, 3 * H])];
}

/**
 * `softmax(q kᵀ / √d) v` per head over the whole sequence, no mask; q, k, v and the result [B, L, H] with heads
 * merged `B L (H D)`. ORT's MultiHeadAttention takes this layout as is (no head transposes) and fuses scale,
 * softmax and both products.
 */
function attention(cx: Ctx, q: Value, k: Value, v: Value): Value {
  const { g, c } = cx;
  return g.op('MultiHeadAttention', [q, k, v], { num_heads: c.numHeads, scale: { float: 1 / Math.sqrt(headDim(c)) } }, { domain: MS_DOMAIN, hint: 'attention' });
}

/** SwiGLU: `silu(gate) * up`, gate = the first half of the fused projection (spec §1.2). */
function swiglu(cx: Ctx, x: Value, name: string, offset: number): Value {
  const mlp = mlpHidden(cx.c);
  const gate = linear(cx, x, name, [offset, offset + mlp]);
  const up = linear(cx, x, name, [offset + mlp, offset + 2 * mlp]);
  return cx.g.op('Mul', [silu(cx.g, gate), up], {}, { hint: 'swiglu' });
}

/** Sequence length of x [B, L, …] as a 1-D int64 tensor, for splitting the joint sequence back. */
function seqLen(g: Graph, x: Value): Value {
  return g.op('Shape', [x], { start: 1, end: 2 });
}

type Mod = Value[]; // shift1, scale1, gate1, shift2, scale2, gate2

/** DoubleStreamBlock (spec §1.3): separate weights per stream, one joint attention, text first. */
function doubleBlock(cx: Ctx, i: number, img: Value, txt: Value, pe: { cos: Value; sin: Value }, mImg: Mod, mTxt: Mod): [Value, Value] {
  const { g, c } = cx;
  const H = c.hiddenSize;
  const p = `double_blocks.${i}`;
  return g.within(p, () => {
    // RoPE is per token, so it can be applied to each stream before joining them (text first)
    const [nTxt, nImg] = [seqLen(g, txt), seqLen(g, img)];
    const peSplit = (t: Value) => g.opN('Split', [t, concat(g, [nTxt, nImg], 0)], 2, { axis: 1 });
    const [cosT, cosI] = peSplit(pe.cos);
    const [sinT, sinI] = peSplit(pe.sin);
    const [qi, ki, vi] = qkv(cx, modulate(g, layerNormNoAffine(g, img, H, EPS), mImg[0], mImg[1]), `${p}.img_attn.qkv.weight`, `${p}.img_attn.norm`, { cos: cosI, sin: sinI });
    const [qt, kt, vt] = qkv(cx, modulate(g, layerNormNoAffine(g, txt, H, EPS), mTxt[0], mTxt[1]), `${p}.txt_attn.qkv.weight`, `${p}.txt_attn.norm`, { cos: cosT, sin: sinT });
    const o = attention(cx, concat(g, [qt, qi], 1), concat(g, [kt, ki], 1), concat(g, [vt, vi], 1));
    const [ot, oi] = g.opN('Split', [o, concat(g, [nTxt, nImg], 0)], 2, { axis: 1 });
    const stream = (x: Value, attnOut: Value, m: Mod, s: 'img' | 'txt'): Value => {
      x = g.op('Add', [x, g.op('Mul', [m[2], linear(cx, attnOut, `${p}.${s}_attn.proj.weight`)])]);
      const h = swiglu(cx, modulate(g, layerNormNoAffine(g, x, H, EPS), m[3], m[4]), `${p}.${s}_mlp.0.weight`, 0);
      return g.op('Add', [x, g.op('Mul', [m[5], linear(cx, h, `${p}.${s}_mlp.2.weight`)])]);
    };
    return [stream(img, oi, mImg, 'img'), stream(txt, ot, mTxt, 'txt')];
  });
}

/** SingleStreamBlock (spec §1.3): one fused projection to q|k|v|gate|up, attention and MLP in parallel. */
function singleBlock(cx: Ctx, i: number, h: Value, pe: { cos: Value; sin: Value }, m: Value[]): Value {
  const { g, c } = cx;
  const H = c.hiddenSize;
  const mlp = mlpHidden(c);
  const p = `single_blocks.${i}`;
  return g.within(p, () => {
    const a = modulate(g, layerNormNoAffine(g, h, H, EPS), m[0], m[1]);
    const [q, k, v] = qkv(cx, a, `${p}.linear1.weight`, `${p}.norm`, pe);
    const o = attention(cx, q, k, v);
    // linear2(cat([o, mlp])) = o·W[:, :H]ᵀ + mlp·W[:, H:]ᵀ: two products instead of concatenating activations
    const w2 = `${p}.linear2.weight`;
    const out = g.op('Add', [linear(cx, o, w2, undefined, [0, H]), linear(cx, swiglu(cx, a, `${p}.linear1.weight`, 3 * H), w2, undefined, [H, H + mlp])]);
    return g.op('Add', [h, g.op('Mul', [m[2], out])]);
  });
}

/** LastLayer: adaLN with BFL's (shift, scale) order, then the projection back to latent channels. */
function finalLayer(cx: Ctx, img: Value, shift: Value, scale: Value): Value {
  const { g, c } = cx;
  return g.within('final_layer', () => linear(cx, modulate(g, layerNormNoAffine(g, img, c.hiddenSize, EPS), shift, scale), 'final_layer.linear.weight'));
}

// The forward (spec §1.3) runs as a chain of ORT sessions, one per stage: the embeddings, each block, the final
// layer. A session per block bounds the memory of loading to one block's weights at a time (ORT pre-packs each
// weight into its own buffer; the converted fp32 bytes are dropped once the block's session exists), and the
// activations passed between sessions are tiny next to the weights.

/** One stage of the forward; `join` = the first single block, which concatenates txt and img (text first). */
export type Flux2Stage =
  | { kind: 'embed' }
  | { kind: 'double'; index: number }
  | { kind: 'single'; index: number; join: boolean }
  | { kind: 'final'; fromJoint: boolean };

export function flux2Stages(c: Flux2Config): Flux2Stage[] {
  const stages: Flux2Stage[] = [{ kind: 'embed' }];
  for (let i = 0; i < c.depth; i++) stages.push({ kind: 'double', index: i });
  for (let i = 0; i < c.depthSingleBlocks; i++) stages.push({ kind: 'single', index: i, join: i === 0 });
  stages.push({ kind: 'final', fromJoint: c.depthSingleBlocks > 0 });
  return stages;
}

/** RoPE tables travel between sessions as two inputs. */
function peInputs(g: Graph, c: Flux2Config): { cos: Value; sin: Value } {
  const dims = ['batch', 'n_all', 1, headDim(c)];
  return { cos: g.input('pe_cos', 'float32', dims), sin: g.input('pe_sin', 'float32', dims) };
}

/** Builds the graph of one stage; `weights` lists what its session needs in memory. */
export function buildFlux2Stage(w: Flux2Weights, stage: Flux2Stage): { graph: Graph; weights: MemoryWeight[] } {
  const c = w.config;
  const H = c.hiddenSize;
  const g = new GraphBuilder(`flux2_${stage.kind}${'index' in stage ? `_${stage.index}` : ''}`);
  const cx: Ctx = { g, w, c, weights: [] };
  const nAxes = c.axesDim.length;
  const hidden = (name: string, seq: string) => g.input(name, 'float32', ['batch', seq, H]);
  const modIn = (name: string, n: number) => g.input(name, 'float32', ['batch', 1, n * H]);
  const split = (m: Value, n: number) => splitLast(g, m, Array(n).fill(H));

  if (stage.kind === 'embed') {
    const x = g.input('x', 'float32', ['batch', 'n_img', c.inChannels]);
    const xIds = g.input('x_ids', 'int64', ['batch', 'n_img', nAxes]);
    const t = g.input('timesteps', 'float32', ['batch']);
    const ctx = g.input('ctx', 'float32', ['batch', 'n_txt', c.contextInDim]);
    const ctxIds = g.input('ctx_ids', 'int64', ['batch', 'n_txt', nAxes]);
    let vec = g.within('time_in', () => mlpEmbedder(cx, timestepEmbedding(g, t), 'time_in'));
    if (c.useGuidanceEmbed) {
      const guidance = g.input('guidance', 'float32', ['batch']);
      vec = g.op('Add', [vec, g.within('guidance_in', () => mlpEmbedder(cx, timestepEmbedding(g, guidance), 'guidance_in'))]);
    }
    // shared modulation: computed once from vec, reused by every block (spec §1.1)
    g.output(modulation(cx, vec, 'double_stream_modulation_img.lin.weight'), 'mod_img');
    g.output(modulation(cx, vec, 'double_stream_modulation_txt.lin.weight'), 'mod_txt');
    g.output(modulation(cx, vec, 'single_stream_modulation.lin.weight'), 'mod_single');
    g.output(g.within('final_layer', () => modulation(cx, vec, 'final_layer.adaLN_modulation.1.weight')), 'mod_final');
    g.output(linear(cx, x, 'img_in.weight'), 'img');
    g.output(linear(cx, ctx, 'txt_in.weight'), 'txt');
    // positions of the joint sequence, text first, as every attention sees it
    const pe = g.within('pe', () => ropeTables(cx, concat(g, [ctxIds, xIds], 1)));
    g.output(pe.cos, 'pe_cos');
    g.output(pe.sin, 'pe_sin');
  } else if (stage.kind === 'double') {
    const img = hidden('img', 'n_img');
    const txt = hidden('txt', 'n_txt');
    const mImg = split(modIn('mod_img', 6), 6);
    const mTxt = split(modIn('mod_txt', 6), 6);
    const [img2, txt2] = doubleBlock(cx, stage.index, img, txt, peInputs(g, c), mImg, mTxt);
    g.output(img2, 'img_out');
    g.output(txt2, 'txt_out');
  } else if (stage.kind === 'single') {
    const h = stage.join ? concat(g, [hidden('txt', 'n_txt'), hidden('img', 'n_img')], 1) : hidden('h', 'n_all');
    g.output(singleBlock(cx, stage.index, h, peInputs(g, c), split(modIn('mod_single', 3), 3)), 'h_out');
  } else {
    let img: Value;
    if (stage.fromJoint) {
      // drop the text tokens: h[:, n_txt:]
      const h = hidden('h', 'n_all');
      const nTxt = g.input('n_txt', 'int64', [1]);
      img = g.op('Slice', [h, nTxt, g.constI64([Number.MAX_SAFE_INTEGER]), g.constI64([1])]);
    } else {
      img = hidden('img', 'n_img');
    }
    const [shift, scale] = split(modIn('mod_final', 2), 2);
    g.output(finalLayer(cx, img, shift, scale), 'output', 'float32', ['batch', 'n_img', c.inChannels]);
  }
  return { graph: g, weights: cx.weights };
}

// ───────────────────────── runtime ─────────────────────────

export interface Flux2ForwardInput {
  /** [batch, nTokens, inChannels]: target-image tokens followed by reference-image tokens. */
  x: Float32Array;
  /** [batch, nTokens, 4] positions (t, h, w, l). */
  xIds: BigInt64Array;
  /** [batch] sigma in [0, 1], one per sample. */
  timesteps: Float32Array;
  /** [batch, nCtx, contextInDim] text context. */
  ctx: Float32Array;
  /** [batch, nCtx, 4] text positions (0, 0, 0, l). */
  ctxIds: BigInt64Array;
  /** [batch] guidance values; only for guidance-embedding models (FLUX.2 [dev]). */
  guidance?: Float32Array;
  batch: number;
  nTokens: number;
  nCtx: number;
}

export interface Flux2LoadOptions extends SessionConfig {
  /** Called after each stage's session is ready (loading klein 4B converts 15 GB of weights). */
  onProgress?: (done: number, total: number, stage: string) => void;
}

/** Bump when the graphs change in a way the config does not capture (the compiled-graph cache key). */
const FLUX2_GRAPH_VERSION = 4;

function stageName(s: Flux2Stage): string {
  return 'index' in s ? `${s.kind}_${s.index}` : s.kind;
}

/** Stored values (F32, BF16 or F16) widened to fp32. */
function toF32(p: TensorInfo): Float32Array {
  const raw = readRaw(p);
  const n = p.byteLength / DTYPE_SIZE[p.dtype];
  // a small Buffer may sit at an odd offset of Node's pool: copy before viewing it as 16/32-bit words
  const aligned = raw.byteOffset % 4 === 0 ? raw : new Uint8Array(raw);
  if (p.dtype === 'F32') return new Float32Array(aligned.buffer, aligned.byteOffset, n);
  const u16 = new Uint16Array(aligned.buffer, aligned.byteOffset, n);
  if (p.dtype === 'BF16') {
    const out = new Float32Array(n);
    const bits = new Uint32Array(out.buffer);
    for (let i = 0; i < n; i++) bits[i] = u16[i] << 16;
    return out;
  }
  if (p.dtype === 'F16') return f16ToF32(u16);
  throw new Error(`${p.file} [${p.name}]: dtype ${p.dtype} is not supported for a FLUX.2 weight`);
}

/** A weight as fp32 bytes: its row blocks read from the checkpoint, widened, and cut to its column range. */
export function readWeightF32(l: MemoryWeight): Float32Array {
  const out = new Float32Array(l.shape.reduce((a, b) => a * b, 1));
  let at = 0;
  for (const p of l.parts) {
    const v = toF32(p);
    if (!l.cols) {
      out.set(v, at);
      at += v.length;
      continue;
    }
    const [c0, c1] = l.cols;
    const width = p.shape[1];
    for (let r = 0; r < p.shape[0]; r++, at += c1 - c0) out.set(v.subarray(r * width + c0, r * width + c1), at);
  }
  return out;
}

interface StageSession {
  stage: Flux2Stage;
  session: ort.InferenceSession;
}

/** A loaded FLUX.2 transformer: `forward` runs one model evaluation (one denoising step). */
export class Flux2Transformer {
  private constructor(
    private readonly stages: StageSession[],
    readonly config: Flux2Config,
    readonly layout: Flux2Weights['layout'],
    /** True when every stage's compiled graph came from the cache. */
    readonly graphCached: boolean,
  ) {}

  /** Opens a checkpoint (file, BFL folder or diffusers `transformer/` folder) and its compiled stage graphs. */
  static async load(pathOrFolder: string, opts: Flux2LoadOptions = {}): Promise<Flux2Transformer> {
    const w = openFlux2Checkpoint(pathOrFolder);
    const { onProgress, ...session } = opts;
    const plan = flux2Stages(w.config);
    const stages: StageSession[] = [];
    let allCached = true;
    try {
      for (const [i, stage] of plan.entries()) {
        const { graph, weights } = buildFlux2Stage(w, stage);
        const key = { model: 'flux2-transformer', version: FLUX2_GRAPH_VERSION, config: w.config, layout: w.layout, stage };
        // The converted bytes live only until the session exists: ORT copies them (and packs the MatMul weights).
        const externalData = weights.map((l) => ({ path: l.location, data: new Uint8Array(readWeightF32(l).buffer) }));
        const r = await loadGraph(`flux2-${stageName(stage)}`, key, w.files, () => graph, { lowMemory: true, ...session, externalData });
        stages.push({ stage, session: r.session });
        allCached &&= r.cached;
        onProgress?.(i + 1, plan.length, stageName(stage));
      }
    } catch (e) {
      await Promise.all(stages.map((s) => s.session.release()));
      throw e;
    }
    return new Flux2Transformer(stages, w.config, w.layout, allCached);
  }

  /** Velocity for every input token, [batch, nTokens, inChannels] (spec §1.3). */
  async forward(inp: Flux2ForwardInput): Promise<Float32Array> {
    const c = this.config;
    const { batch: B, nTokens: N, nCtx: L } = inp;
    for (const [k, v] of Object.entries({ batch: B, nTokens: N, nCtx: L })) {
      if (!Number.isInteger(v) || v < 1) throw new RangeError(`flux2 forward: ${k} must be a positive integer, got ${v}`);
    }
    const expect = (name: string, arr: { length: number } | undefined, n: number) => {
      if (!arr) throw new RangeError(`flux2 forward: ${name} is required`);
      if (arr.length !== n) throw new RangeError(`flux2 forward: ${name} has ${arr.length} values, expected ${n}`);
    };
    const nAxes = c.axesDim.length;
    expect('x', inp.x, B * N * c.inChannels);
    expect('xIds', inp.xIds, B * N * nAxes);
    expect('timesteps', inp.timesteps, B);
    expect('ctx', inp.ctx, B * L * c.contextInDim);
    expect('ctxIds', inp.ctxIds, B * L * nAxes);
    const feeds: Record<string, ort.Tensor> = {
      x: f32(inp.x, [B, N, c.inChannels]),
      x_ids: i64(inp.xIds, [B, N, nAxes]),
      timesteps: f32(inp.timesteps, [B]),
      ctx: f32(inp.ctx, [B, L, c.contextInDim]),
      ctx_ids: i64(inp.ctxIds, [B, L, nAxes]),
    };
    if (c.useGuidanceEmbed) {
      expect('guidance', inp.guidance, B);
      feeds.guidance = f32(inp.guidance!, [B]);
    }
    // embeddings, shared modulation and RoPE tables, then the blocks in order, then the final layer
    const e = await this.stages[0].session.run(feeds);
    const pe = { pe_cos: e.pe_cos, pe_sin: e.pe_sin };
    let img = e.img;
    let txt = e.txt;
    let h: ort.Tensor | undefined;
    for (const { stage, session } of this.stages.slice(1)) {
      if (stage.kind === 'double') {
        const r = await session.run({ img, txt, mod_img: e.mod_img, mod_txt: e.mod_txt, ...pe });
        [img, txt] = [r.img_out, r.txt_out];
      } else if (stage.kind === 'single') {
        const r = await session.run({ ...(stage.join ? { txt, img } : { h: h! }), mod_single: e.mod_single, ...pe });
        h = r.h_out;
      } else if (stage.kind === 'final') {
        const r = await session.run(stage.fromJoint ? { h: h!, n_txt: i64(BigInt64Array.of(BigInt(L)), [1]), mod_final: e.mod_final } : { img, mod_final: e.mod_final });
        return r.output.data as Float32Array;
      }
    }
    throw new Error('flux2: the stage list has no final layer');
  }

  async close(): Promise<void> {
    await Promise.all(this.stages.map((s) => s.session.release()));
  }
}

// ───────────────────────── random checkpoints (tests, benchmarks, tiny pipelines) ─────────────────────────

export interface RandomFlux2Options {
  /** Storage dtype; default BF16 like the real checkpoints. */
  dtype?: 'BF16' | 'F16' | 'F32';
  /** Key layout; default 'bfl'. The same seed gives the same weights in both layouts. */
  layout?: Flux2Layout;
  seed?: number;
}

/** FNV-1a of a string, to give every tensor its own reproducible random stream. */
function hashName(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/**
 * Deterministic random values for one BFL tensor: Linear weights uniform with std 1/√fan_in (activations keep their
 * scale through the 25 blocks, so timings see realistic numbers, no NaN or denormal storms); norm scales 1 ± 0.1.
 */
function randomTensor(name: string, shape: number[], seed: number): Float32Array {
  const n = shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  const amp = name.endsWith('.scale') ? 0.2 : Math.sqrt(3 / shape[shape.length - 1]) * 2;
  const offset = name.endsWith('.scale') ? 1 : 0;
  let x = (hashName(name) ^ Math.imul(seed + 1, 0x9e3779b1)) >>> 0 || 1;
  const bits = new Uint32Array(1);
  const f = new Float32Array(bits.buffer);
  for (let i = 0; i < n; i++) {
    // xorshift32, then 23 random mantissa bits → uniform in [1, 2)
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    bits[0] = 0x3f800000 | (x >>> 9);
    out[i] = offset + (f[0] - 1.5) * amp;
  }
  return out;
}

/**
 * Writes a random-weight FLUX.2 transformer checkpoint to `file` (a `.safetensors` path) with the real key names
 * and shapes of `config`, in the BFL or diffusers layout (diffusers: q/k/v split, final adaLN halves swapped, as
 * the official converter does). Tensors are generated one at a time, so a full-size klein 4B never sits in memory.
 * The config is also stored in the file's metadata (`flux2_config`); config.json files are the caller's business.
 */
export function writeRandomFlux2Checkpoint(file: string, config: Flux2Config, opts: RandomFlux2Options = {}): void {
  const dtype = opts.dtype ?? 'BF16';
  const layout = opts.layout ?? 'bfl';
  const seed = opts.seed ?? 0;
  const encode = (a: Float32Array) => (dtype === 'F32' ? a : dtype === 'BF16' ? f32ToBf16(a) : f32ToF16(a));
  const tensors: Record<string, TensorToWrite> = {};
  // diffusers splits one BFL tensor into several: generate it once, hand out its row blocks in order
  let cache: { name: string; data: Float32Array } | undefined;
  const bflData = (name: string, shape: number[]) => {
    if (cache?.name !== name) cache = { name, data: randomTensor(name, shape, seed) };
    return cache.data;
  };
  for (const { name, shape } of flux2BflShapes(config)) {
    if (layout === 'bfl') {
      tensors[name] = { dtype, shape, data: () => encode(randomTensor(name, shape, seed)) };
      continue;
    }
    const rowLen = shape.slice(1).reduce((a, b) => a * b, 1);
    const src = diffusersSource(name);
    if ('parts' in src) {
      const rows = shape[0] / src.parts.length;
      src.parts.forEach((part, k) => {
        tensors[part] = { dtype, shape: [rows, ...shape.slice(1)], data: () => encode(bflData(name, shape).subarray(k * rows * rowLen, (k + 1) * rows * rowLen)) };
      });
    } else {
      const half = (shape[0] / 2) * rowLen;
      tensors[src.swapHalves] = {
        dtype,
        shape,
        data: () => {
          const d = bflData(name, shape);
          const swapped = new Float32Array(d.length);
          swapped.set(d.subarray(half), 0);
          swapped.set(d.subarray(0, half), half);
          return encode(swapped);
        },
      };
    }
  }
  writeSafetensors(file, tensors, { format: 'pt', generator: 'klein writeRandomFlux2Checkpoint', flux2_config: JSON.stringify(config), seed: String(seed) });
}
