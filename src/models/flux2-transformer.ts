// The FLUX.2 flow transformer (BFL `flux2.model.Flux2`) as an ONNX graph, following flux2-klein-spec.md §1–2.
// Config-driven: klein 4B, klein 9B and FLUX.2 [dev] differ only in the numbers below (the golden tiny model too).
// The graph is written against BFL weight names; src/weights/flux2-layouts.ts maps them onto BFL or diffusers files.
// It runs as a chain of small ORT sessions (see "stages" below); all sequence lengths are symbolic, so the compiled
// stage graphs serve every image size, text length, reference count and batch size.
import path from 'node:path';
import type { Graph, Value } from '../graph/onnx-graph.ts';
import { Graph as GraphBuilder, MS_DOMAIN } from '../graph/onnx-graph.ts';
import { COMPUTE, concat, layerNormNoAffine, modulate, silu, splitLast } from '../graph/nn.ts';
import { DTYPE_SIZE, f16ToF32, f32ToBf16, f32ToF16, readRaw, writeSafetensors, type TensorInfo, type TensorToWrite } from '../weights/safetensors.ts';
import { loadGraph, f32, i64, ort, type SessionConfig } from '../graph/session.ts';
import { resolveDevice, defaultDevice, type Device } from '../graph/device.ts';
import { deviceResidentIO, type HostTransfers } from './flux2-gpu.ts';
import { deviceWeightBytes, resolveComputeDtype, type ComputeDtype } from '../graph/compute-dtype.ts';
import { diffusersSource, flux2BflShapes, openFlux2Checkpoint, type Flux2Layout, type Flux2Weights } from '../weights/flux2-layouts.ts';
import { INT8_SCHEME, int8ExternalData, quantizedLinear } from '../graph/quantize.ts';
import { Int8Cache, Int8CacheCorruptError } from '../weights/quantized-cache.ts';
import { applyOutlierEdits, flux2OutlierEdits } from '../weights/stress-outliers.ts';
import { int8ActivationsExperiment, sharedInt8Linear } from '../graph/int8-linear.ts';
import type { Precision } from '../pipeline/types.ts';

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
export interface Ctx {
  g: Graph;
  w: Flux2Weights;
  c: Flux2Config;
  weights: MemoryWeight[];
  /** Set for a GPU device: Linears as MatMul by a pre-transposed weight, in this dtype (see flux2-gpu.ts). */
  gpu?: { dtype: ComputeDtype };
  /** Fast mode: which Linear weights (BFL names) run as int8 products (see `int8Layer`). */
  int8?: (name: string) => boolean;
  /**
   * Fast mode, once the int8 cache is open: where each int8 weight lies in the cache file. The stage's graph then
   * lets ORT read them from that file, and its few other weights (QK-norm scales) are embedded as constants.
   */
  int8File?: (key: string) => { q: TensorInfo; scale: TensorInfo; residual?: { q: TensorInfo; scale: TensorInfo } };
}

/** A weight handed to ORT in memory as fp32: its stored row blocks (optionally a column range), converted at load. */
export interface MemoryWeight {
  /** ORT external-data location of the converted bytes. */
  location: string;
  parts: TensorInfo[];
  /** Columns `[start, end)` of a 2-D weight; all columns when absent. */
  cols?: [number, number];
  shape: number[];
  /** GPU Linear weight: stored transposed (`[in, out]`, `shape` is that), as fp16 when `fp16`. */
  gpu?: { fp16: boolean };
  /** Fast mode: the weight's key in the int8 cache; ORT gets its int8 values and scales (quantize.ts), not fp32. */
  int8?: string;
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
  if (cx.int8File) {
    // an int8 stage reads its int8 weights from the cache file, and ORT cannot mix that with in-memory data
    const n = shape.reduce((a, b) => a * b, 1);
    if (n > 1 << 16) throw new Error(`flux2 fast mode: ${name} (${n} values) is too large to embed in an int8 stage's graph`);
    return cx.g.constF32(readWeightF32({ location, parts, cols, shape }), shape, name);
  }
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
  if (cx.gpu) return gpuLinear(cx, x, name, rows, cols);
  if (cx.int8?.(name)) return int8Linear(cx, x, name, rows, cols);
  return cx.g.op('FusedMatMul', [x, weight(cx, name, rows, cols)], { transB: 1 }, { domain: MS_DOMAIN, hint: name.replace(/\.weight$/, '') });
}

/**
 * `linear` on a GPU device: `MatMul(x, Wᵀ)` with Wᵀ `[in, out]` transposed at load (WebGPU has no FusedMatMul;
 * with it the product fell back to the CPU provider). In fp16, x is cast to fp16 for the product only (one Cast
 * per input however many Linears read it, e.g. q, k and v) and the product back to fp32, so norms, modulation,
 * RoPE, attention and the residual stream stay fp32.
 */
function gpuLinear(cx: Ctx, x: Value, name: string, rows?: [number, number], cols?: [number, number]): Value {
  const fp16 = cx.gpu!.dtype === 'fp16';
  const parts = rows ? cx.w.rows(name, rows[0], rows[1]) : cx.w.get(name);
  const nRows = parts.reduce((n, p) => n + p.shape[0], 0);
  const nCols = cols ? cols[1] - cols[0] : parts[0].shape[1];
  const tag = `${rows ? `.rows_${rows[0]}_${rows[1]}` : ''}${cols ? `.cols_${cols[0]}_${cols[1]}` : ''}.T`;
  const location = `flux2-mem/${name}${tag}`;
  cx.weights.push({ location, parts, cols, shape: [nCols, nRows], gpu: { fp16 } });
  const wt = cx.g.inMemoryWeight(`${name}${tag}`, fp16 ? 'float16' : COMPUTE, [nCols, nRows], location);
  const hint = name.replace(/\.weight$/, '');
  if (!fp16) return cx.g.op('MatMul', [x, wt], {}, { hint });
  let x16 = gpuHalf.get(x);
  if (!x16) {
    x16 = cx.g.op('Cast', [x], { to: 10 }, { hint: 'to_fp16' });
    gpuHalf.set(x, x16);
  }
  return cx.g.op('Cast', [cx.g.op('MatMul', [x16, wt], {}, { hint })], { to: 1 }, { hint: 'to_fp32' });
}

/**
 * Fast mode's Linear: the weight (or its row/column block) quantized to int8 per output column, multiplied by
 * DynamicQuantizeMatMul (activations quantized per tensor at run time). The int8 bytes come from the on-disk cache.
 */
function int8Linear(cx: Ctx, x: Value, name: string, rows?: [number, number], cols?: [number, number]): Value {
  const parts = rows ? cx.w.rows(name, rows[0], rows[1]) : cx.w.get(name);
  const out = parts.reduce((n, p) => n + p.shape[0], 0);
  const inF = cols ? cols[1] - cols[0] : parts[0].shape[1];
  const key = `${name}${rows ? `.rows_${rows[0]}_${rows[1]}` : ''}${cols ? `.cols_${cols[0]}_${cols[1]}` : ''}`;
  const location = `flux2-mem/${key}`;
  cx.weights.push({ location, parts, cols, shape: [out, inF], int8: key });
  const hint = name.replace(/\.weight$/, '');
  if (!cx.int8File) return quantizedLinear(cx.g, x, { name: key, inFeatures: inF, outFeatures: out, location, hint });
  // ORT reads the int8 values and scales from the cache file itself: a file's pages come and go with the mapping,
  // while in-memory external data is copied through the C heap, which kept ~1 byte per parameter of freed copies
  // resident (measured 0.96–1.10 vs 1.9–2.4 bytes per parameter, eight [3072, 9216] weights)
  const t = cx.int8File(key);
  if (int8ActivationsExperiment()) {
    const residual = t.residual && { q: cx.g.weight(t.residual.q), scale: cx.g.weight(t.residual.scale) };
    return sharedInt8Linear(cx.g, x, { q: cx.g.weight(t.q), scale: cx.g.weight(t.scale), inFeatures: inF, outFeatures: out, rows: { residual } }, { hint });
  }
  return cx.g.op('DynamicQuantizeMatMul', [x, cx.g.weight(t.q), cx.g.weight(t.scale)], {}, { domain: MS_DOMAIN, hint });
}

/**
 * Fast mode's per-layer policy (measured, docs/benchmarks.md "Fast mode"): the block Linears — q/k/v, attention
 * output, MLP in/out of the double blocks, linear1/linear2 of the single blocks, 92–96 % of a step's FLOPs — run in
 * int8. Kept fp32: the modulations (issue 13: they scale every activation of a block), time/guidance embedders
 * (one row per sample, nothing to gain), img_in (K = 128), txt_in (its input is the text encoder's hidden states,
 * whose few huge outlier channels a per-tensor activation scale would crush the other channels under) and the
 * final projection (the velocity itself, K = hidden, N = 128).
 */
export function int8Layer(name: string): boolean {
  return /^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])\.weight$/.test(name);
}

/** The fp16 copy of each activation a GPU Linear read (Values are per graph, so one map serves every graph). */
const gpuHalf = new WeakMap<Value, Value>();

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

type Pe = { cos: Value; sin: Value };

// The forward (spec §1.3) runs as a chain of ORT sessions, each a small stage of it: the time embedding, each
// shared modulation, the input projections, and each block in three parts (attention; then the image and text MLPs
// of a double block, or the MLP and output projection of a single block), then the final layer. ORT needs a
// stage's weights three times over while it opens the stage's session (our converted fp32 bytes, its own copy and
// its pre-packed copy; the first two are dropped once the session exists), so small stages keep the peak memory of
// loading close to the size of the weights. Stages exchange named values (`img`, `txt`, `h`, `mod_img`, …); a
// stage that updates a value outputs it as `<name>_next`.

/** Dims of the values stages exchange. */
function valueDims(c: Flux2Config, name: string): { type: 'float32' | 'int64'; dims: Array<number | string> } {
  const H = c.hiddenSize;
  const n = c.axesDim.length;
  const table: Record<string, { type: 'float32' | 'int64'; dims: Array<number | string> }> = {
    x: { type: 'float32', dims: ['batch', 'n_img', c.inChannels] },
    x_ids: { type: 'int64', dims: ['batch', 'n_img', n] },
    timesteps: { type: 'float32', dims: ['batch'] },
    guidance: { type: 'float32', dims: ['batch'] },
    ctx: { type: 'float32', dims: ['batch', 'n_txt', c.contextInDim] },
    ctx_ids: { type: 'int64', dims: ['batch', 'n_txt', n] },
    n_txt: { type: 'int64', dims: [1] },
    vec: { type: 'float32', dims: ['batch', H] },
    mod_img: { type: 'float32', dims: ['batch', 1, 6 * H] },
    mod_txt: { type: 'float32', dims: ['batch', 1, 6 * H] },
    mod_single: { type: 'float32', dims: ['batch', 1, 3 * H] },
    mod_final: { type: 'float32', dims: ['batch', 1, 2 * H] },
    pe_cos: { type: 'float32', dims: ['batch', 'n_all', 1, headDim(c)] },
    pe_sin: { type: 'float32', dims: ['batch', 'n_all', 1, headDim(c)] },
    img: { type: 'float32', dims: ['batch', 'n_img', H] },
    txt: { type: 'float32', dims: ['batch', 'n_txt', H] },
    attn_img: { type: 'float32', dims: ['batch', 'n_img', H] },
    attn_txt: { type: 'float32', dims: ['batch', 'n_txt', H] },
    h: { type: 'float32', dims: ['batch', 'n_all', H] },
    a: { type: 'float32', dims: ['batch', 'n_all', H] },
    attn: { type: 'float32', dims: ['batch', 'n_all', H] },
    mlp: { type: 'float32', dims: ['batch', 'n_all', mlpHidden(c)] },
    output: { type: 'float32', dims: ['batch', 'n_img', c.inChannels] },
  };
  const d = table[name];
  if (!d) throw new Error(`flux2: unknown stage value ${name}`);
  return d;
}

/** A stage's inputs (declared on first use) and outputs. */
export class StageIO {
  private readonly inputs = new Map<string, Value>();
  constructor(private readonly cx: Ctx) {}
  in(name: string): Value {
    let v = this.inputs.get(name);
    if (!v) {
      const d = valueDims(this.cx.c, name);
      v = this.cx.g.input(name, d.type, d.dims);
      this.inputs.set(name, v);
    }
    return v;
  }
  out(name: string, v: Value): void {
    const d = valueDims(this.cx.c, name);
    this.cx.g.output(v, this.inputs.has(name) ? `${name}_next` : name, d.type, d.dims);
  }
  pe(): Pe {
    return { cos: this.in('pe_cos'), sin: this.in('pe_sin') };
  }
  /** A modulation vector split into `n` [B, 1, H] pieces (shift, scale, gate, …). */
  mod(name: string, n: number): Value[] {
    return splitLast(this.cx.g, this.in(name), Array(n).fill(this.cx.c.hiddenSize));
  }
}

/** DoubleStreamBlock, part 1 (spec §1.3): q/k/v of each stream, one joint attention, text first. */
function doubleBlockAttention(cx: Ctx, io: StageIO, p: string): void {
  const { g, c } = cx;
  const H = c.hiddenSize;
  const [img, txt, pe] = [io.in('img'), io.in('txt'), io.pe()];
  const [mImg, mTxt] = [io.mod('mod_img', 6), io.mod('mod_txt', 6)];
  // RoPE is per token, so it is applied to each stream before they are joined
  const sizes = concat(g, [seqLen(g, txt), seqLen(g, img)], 0);
  const [cosT, cosI] = g.opN('Split', [pe.cos, sizes], 2, { axis: 1 });
  const [sinT, sinI] = g.opN('Split', [pe.sin, sizes], 2, { axis: 1 });
  const [qi, ki, vi] = qkv(cx, modulate(g, layerNormNoAffine(g, img, H, EPS), mImg[0], mImg[1]), `${p}.img_attn.qkv.weight`, `${p}.img_attn.norm`, { cos: cosI, sin: sinI });
  const [qt, kt, vt] = qkv(cx, modulate(g, layerNormNoAffine(g, txt, H, EPS), mTxt[0], mTxt[1]), `${p}.txt_attn.qkv.weight`, `${p}.txt_attn.norm`, { cos: cosT, sin: sinT });
  const o = attention(cx, concat(g, [qt, qi], 1), concat(g, [kt, ki], 1), concat(g, [vt, vi], 1));
  const [ot, oi] = g.opN('Split', [o, sizes], 2, { axis: 1 });
  io.out('attn_img', oi);
  io.out('attn_txt', ot);
}

/** DoubleStreamBlock, part 2 (one per stream): gated attention output, then the gated SwiGLU MLP. */
function doubleBlockStream(cx: Ctx, io: StageIO, p: string, s: 'img' | 'txt'): void {
  const { g, c } = cx;
  const m = io.mod(`mod_${s}`, 6); // shift1, scale1, gate1, shift2, scale2, gate2
  let x = g.op('Add', [io.in(s), g.op('Mul', [m[2], linear(cx, io.in(`attn_${s}`), `${p}.${s}_attn.proj.weight`)])]);
  const h = swiglu(cx, modulate(g, layerNormNoAffine(g, x, c.hiddenSize, EPS), m[3], m[4]), `${p}.${s}_mlp.0.weight`, 0);
  x = g.op('Add', [x, g.op('Mul', [m[5], linear(cx, h, `${p}.${s}_mlp.2.weight`)])]);
  io.out(s, x);
}

/** SingleStreamBlock, part 1 (spec §1.3): q|k|v from the fused linear1, attention. The first one joins txt and img. */
function singleBlockAttention(cx: Ctx, io: StageIO, p: string, join: boolean): void {
  const { g, c } = cx;
  let h: Value;
  if (join) {
    h = concat(g, [io.in('txt'), io.in('img')], 1); // text first
    io.out('h', h);
  } else {
    h = io.in('h');
  }
  const m = io.mod('mod_single', 3);
  const a = modulate(g, layerNormNoAffine(g, h, c.hiddenSize, EPS), m[0], m[1]);
  const [q, k, v] = qkv(cx, a, `${p}.linear1.weight`, `${p}.norm`, io.pe());
  io.out('a', a);
  io.out('attn', attention(cx, q, k, v));
}

/** SingleStreamBlock, part 2: the gate|up rows of linear1, SwiGLU. */
function singleBlockMlp(cx: Ctx, io: StageIO, p: string): void {
  io.out('mlp', swiglu(cx, io.in('a'), `${p}.linear1.weight`, 3 * cx.c.hiddenSize));
}

/** SingleStreamBlock, part 3: linear2(cat([attn, mlp])) = attn·W[:, :H]ᵀ + mlp·W[:, H:]ᵀ, gated residual. */
function singleBlockOut(cx: Ctx, io: StageIO, p: string): void {
  const { g, c } = cx;
  const H = c.hiddenSize;
  const w2 = `${p}.linear2.weight`;
  const out = g.op('Add', [linear(cx, io.in('attn'), w2, undefined, [0, H]), linear(cx, io.in('mlp'), w2, undefined, [H, H + mlpHidden(c)])]);
  io.out('h', g.op('Add', [io.in('h'), g.op('Mul', [io.mod('mod_single', 3)[2], out])]));
}

/** LastLayer: adaLN with BFL's (shift, scale) order, then the projection back to latent channels. */
function finalLayer(cx: Ctx, io: StageIO): void {
  const { g, c } = cx;
  let img: Value;
  if (c.depthSingleBlocks > 0) {
    // drop the text tokens: h[:, n_txt:]
    img = g.op('Slice', [io.in('h'), io.in('n_txt'), g.constI64([Number.MAX_SAFE_INTEGER]), g.constI64([1])]);
  } else {
    img = io.in('img');
  }
  const [shift, scale] = io.mod('mod_final', 2);
  io.out('output', linear(cx, modulate(g, layerNormNoAffine(g, img, c.hiddenSize, EPS), shift, scale), 'final_layer.linear.weight'));
}

/** The stage whose outputs (`txt`, `pe_cos`, `pe_sin`) do not change between denoising steps. */
export const CONTEXT_STAGE = 'context';
/** The values a Flux2Context holds for the steps: the context stage's outputs and the text length. */
const CONTEXT_VALUES = ['txt', 'pe_cos', 'pe_sin', 'n_txt'] as const;

/** One stage of the forward: a name (also its graph's name) and what it computes. */
export interface Flux2Stage {
  name: string;
  build(cx: Ctx, io: StageIO): void;
}

/** The stages of the forward, in execution order (spec §1.3). */
export function flux2Stages(c: Flux2Config): Flux2Stage[] {
  const stages: Flux2Stage[] = [];
  const add = (name: string, build: (cx: Ctx, io: StageIO) => void) => stages.push({ name, build });
  add('time_in', (cx, io) => {
    let vec = mlpEmbedder(cx, timestepEmbedding(cx.g, io.in('timesteps')), 'time_in');
    if (c.useGuidanceEmbed) vec = cx.g.op('Add', [vec, mlpEmbedder(cx, timestepEmbedding(cx.g, io.in('guidance')), 'guidance_in')]);
    io.out('vec', vec);
  });
  // shared modulation: computed once from vec, reused by every block (spec §1.1)
  for (const [out, w] of [
    ['mod_img', 'double_stream_modulation_img.lin.weight'],
    ['mod_txt', 'double_stream_modulation_txt.lin.weight'],
    ['mod_single', 'single_stream_modulation.lin.weight'],
    ['mod_final', 'final_layer.adaLN_modulation.1.weight'],
  ]) {
    add(out, (cx, io) => io.out(out, modulation(cx, io.in('vec'), w)));
  }
  // The step-invariant part: the text stream's projection and the RoPE tables depend on the prompt and the token
  // positions only, so a sampler computes them once and reuses them every step (Flux2Transformer.prepareContext).
  add(CONTEXT_STAGE, (cx, io) => {
    io.out('txt', linear(cx, io.in('ctx'), 'txt_in.weight'));
    // positions of the joint sequence, text first, as every attention sees it
    const pe = ropeTables(cx, concat(cx.g, [io.in('ctx_ids'), io.in('x_ids')], 1));
    io.out('pe_cos', pe.cos);
    io.out('pe_sin', pe.sin);
  });
  add('img_in', (cx, io) => io.out('img', linear(cx, io.in('x'), 'img_in.weight')));
  for (let i = 0; i < c.depth; i++) {
    const p = `double_blocks.${i}`;
    add(`${p}.attn`, (cx, io) => doubleBlockAttention(cx, io, p));
    add(`${p}.img`, (cx, io) => doubleBlockStream(cx, io, p, 'img'));
    add(`${p}.txt`, (cx, io) => doubleBlockStream(cx, io, p, 'txt'));
  }
  for (let i = 0; i < c.depthSingleBlocks; i++) {
    const p = `single_blocks.${i}`;
    add(`${p}.attn`, (cx, io) => singleBlockAttention(cx, io, p, i === 0));
    add(`${p}.mlp`, (cx, io) => singleBlockMlp(cx, io, p));
    add(`${p}.out`, (cx, io) => singleBlockOut(cx, io, p));
  }
  add('final_layer', (cx, io) => finalLayer(cx, io));
  return stages;
}

/** Builds the graph of one stage; `weights` lists what its session needs in memory. */
export function buildFlux2Stage(w: Flux2Weights, stage: Flux2Stage, gpu?: { dtype: ComputeDtype }, int8?: (name: string) => boolean, int8File?: Ctx['int8File']): { graph: Graph; weights: MemoryWeight[] } {
  const g = new GraphBuilder(`flux2.${stage.name}`);
  const cx: Ctx = { g, w, c: w.config, weights: [], gpu, int8, int8File };
  g.within(stage.name, () => stage.build(cx, new StageIO(cx)));
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

/** What `prepareContext` reads: the text context and every position; the same for every step of a generation. */
export type Flux2ContextInput = Pick<Flux2ForwardInput, 'xIds' | 'ctx' | 'ctxIds' | 'batch' | 'nTokens' | 'nCtx'>;
/** What changes from step to step. */
export type Flux2StepInput = Pick<Flux2ForwardInput, 'x' | 'timesteps' | 'guidance' | 'batch' | 'nTokens' | 'nCtx'>;

/**
 * The step-invariant values of a generation (`txt`, the RoPE tables, the text length), made by
 * `Flux2Transformer.prepareContext`: in WebGPU memory with device-resident I/O, else on the host. `dispose()` frees
 * the device memory; a disposed context cannot be used.
 */
export class Flux2Context {
  disposed = false;
  constructor(
    readonly counts: { batch: number; nTokens: number; nCtx: number },
    readonly values: ReadonlyMap<string, ort.Tensor>,
    /** Host↔device copies its preparation made (zero on the CPU). */
    readonly transfers: HostTransfers,
  ) {}
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const v of this.values.values()) if (v.location === 'gpu-buffer') v.dispose();
  }
}

function checkCounts<T extends { batch: number; nTokens: number; nCtx: number }>(inp: T): T {
  for (const [k, v] of Object.entries({ batch: inp.batch, nTokens: inp.nTokens, nCtx: inp.nCtx })) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`flux2 forward: ${k} must be a positive integer, got ${v}`);
  }
  return inp;
}

function expectLength(name: string, arr: { length: number } | undefined, n: number): void {
  if (!arr) throw new RangeError(`flux2 forward: ${name} is required`);
  if (arr.length !== n) throw new RangeError(`flux2 forward: ${name} has ${arr.length} values, expected ${n}`);
}

export interface Flux2LoadOptions extends SessionConfig {
  /** Called after each stage's session is ready (loading klein 4B converts 15 GB of weights). */
  onProgress?: (done: number, total: number, stage: string) => void;
  /** GPU devices: the Linears' dtype (default $KLEIN_GPU_DTYPE, else fp16); the CPU is always fp32 (flux2-gpu.ts). */
  gpuDtype?: ComputeDtype;
  /** WebGPU: keep stage outputs in device memory (default true unless KLEIN_DEVICE_IO=host); false = host round trips. */
  deviceIO?: boolean;
  /**
   * `exact` (default): fp32 products, the reference numbers. `fast`: the block Linears as int8 products (CPU only,
   * see `int8Layer`); their int8 weights are quantized on the first load of a checkpoint and cached on disk.
   */
  precision?: Precision;
  /** Fast mode, first load of a checkpoint: called after each weight is quantized and written to the cache. */
  onQuantizeProgress?: (done: number, total: number, weight: string) => void;
  /** Fast mode: quantize again even if the int8 cache is valid (benchmarks of the first load). */
  requantize?: boolean;
}

/** Bump when the graphs change in a way the config does not capture (the compiled-graph cache key). */
const FLUX2_GRAPH_VERSION = 6; // 6: the `inputs` stage split into `context` (step-invariant) and `img_in`

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

/**
 * The bytes ORT gets for a weight: fp32, or for a GPU Linear its transpose, as fp16 when asked (counting the
 * values clamped to ±65504 into `stats.fp16Overflows`).
 */
function readWeightBytes(l: MemoryWeight, stats: { fp16Overflows: number }): Uint8Array {
  const v = readWeightF32(l);
  if (!l.gpu) return new Uint8Array(v.buffer);
  return deviceWeightBytes(v, { fp16: l.gpu.fp16, transpose: [l.shape[1], l.shape[0]] }, stats);
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

/** Shrink the CPU arena at the end of every run (see `load`). */
const RUN_OPTIONS: ort.InferenceSession.RunOptions = { extra: { memory: { enable_memory_arena_shrinkage: 'cpu:0' } } };

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

  /** What the Linears compute in (fp16 only on GPU devices, see flux2-gpu.ts). */
  computeDtype: ComputeDtype = 'fp32';
  /** Weight values beyond fp16's range, clamped to ±65504 at load (fp16 only). */
  fp16Overflows = 0;
  /** Stage outputs stay in WebGPU memory between stages; only `output` comes back to the host. */
  deviceIO = false;
  /** Host↔device copies of the last `forward` (zero on the CPU). */
  lastTransfers: HostTransfers = { uploads: 0, downloads: 0 };
  /** The device the stage sessions run on. */
  device: Device = 'cpu';
  /** `fast`: the block Linears run as int8 products. */
  precision: Precision = 'exact';
  /** Fast mode: the int8 weight cache's folder, and whether this load built it (quantized the checkpoint). */
  int8Cache?: { folder: string; built: boolean };

  /** Opens a checkpoint (file, BFL folder or diffusers `transformer/` folder) and its compiled stage graphs. */
  static async load(pathOrFolder: string, opts: Flux2LoadOptions = {}): Promise<Flux2Transformer> {
    const w = openFlux2Checkpoint(pathOrFolder);
    const { onProgress, gpuDtype, deviceIO: wantDeviceIO, precision = 'exact', onQuantizeProgress, requantize, ...session } = opts;
    if (precision !== 'exact' && precision !== 'fast') throw new Error(`flux2: precision must be exact or fast, got ${JSON.stringify(precision)}`);
    // GPU devices get their own graphs (MatMul by pre-transposed weights, fp16 or fp32); the CPU graphs are unchanged.
    const device = await resolveDevice(session.device ?? defaultDevice());
    session.device = device;
    const dtype = resolveComputeDtype(device, gpuDtype);
    const gpu = device === 'cpu' ? undefined : { dtype };
    const deviceIO = deviceResidentIO(device) && wantDeviceIO !== false;
    const stats = { fp16Overflows: 0 };
    if (precision === 'fast' && gpu) throw new Error(`flux2: precision fast (int8 products) runs on the CPU only; use precision exact on ${device}`);
    const int8 = precision === 'fast' ? int8Layer : undefined;
    const built = flux2Stages(w.config).map((stage) => ({ stage, ...buildFlux2Stage(w, stage, gpu, int8) }));
    // Fast mode: the int8 weights come from the on-disk cache, built (quantized from the checkpoint) on first use.
    const openCache = (rebuild = false) =>
      int8 &&
      Int8Cache.open({
        rebuild,
        model: 'flux2-transformer',
        sourceFiles: w.files,
        entries: built.flatMap((b) => b.weights.filter((l) => l.int8).map((l) => ({ key: l.int8!, outFeatures: l.shape[0], inFeatures: l.shape[1], read: () => readWeightF32(l) }))),
        onProgress: onQuantizeProgress,
        residual: int8ActivationsExperiment() !== '',
      });
    let cache = openCache(requantize);
    const cacheInfo = cache && { folder: cache.folder, built: cache.built };
    // The stages with int8 weights, rebuilt to read them from the cache file (see int8Linear).
    const onDisk = () => {
      if (!cache) return;
      const c = cache;
      for (const b of built) {
        if (b.weights.some((l) => l.int8)) Object.assign(b, buildFlux2Stage(w, b.stage, gpu, int8, (k) => c.tensors(k)), { int8Stage: true });
      }
    };
    onDisk();
    const bytes = (ws: MemoryWeight[]) => ws.reduce((n, x) => n + x.shape.reduce((a, b) => a * b, 4), 0);
    // Largest stages first: each session holds its weights ~3× while it opens, so the last ones opened (when
    // everything else is resident) should be the small ones.
    const order = built.map((_, i) => i).sort((a, b) => bytes(built[b].weights) - bytes(built[a].weights));
    const int8Stage = (b: (typeof built)[number]) => (b as { int8Stage?: boolean }).int8Stage === true;
    let sessions: Array<ort.InferenceSession | undefined> = [];
    let allCached = true;
    for (let attempt = 0; ; attempt++) try {
      for (const [done, i] of order.entries()) {
        const { stage, graph, weights } = built[i];
        const key = { model: 'flux2-transformer', version: FLUX2_GRAPH_VERSION, config: w.config, layout: w.layout, stage: stage.name, gpu: gpu && `gpu-${dtype}`, precision: int8 && `fast-${INT8_SCHEME}${int8ActivationsExperiment()}` };
        if (int8Stage(built[i])) {
          // int8 weights from the cache file, checked against their crc32 first unless this load just wrote them;
          // the compiled graph lives beside the cache file (its key covers the checkpoint: the folder's hash does)
          if (!cache!.built) for (const l of weights) if (l.int8) cache!.verify(l.int8);
          // ORT's arena off for the int8 stages: with it on, every such session kept 30–115 MB of its run's buffers
          // although RUN_OPTIONS shrinks the arena (1 double + 2 single blocks at 256²: 2.43 vs 1.64 GiB anonymous
          // after two steps; full depth at 512² reached 19.9 GiB), and the steps run as fast without it (4 alternated
          // bench pairs, 1 double + 2 single blocks at 256²: 441–524 vs 400–536 GFLOP/s, within the machine's
          // noise). The fp32 stages keep the arena (see below).
          const r = await loadGraph(`flux2-${stage.name}`, { ...key, int8Cache: path.basename(cache!.folder) }, [cache!.file], () => graph, { lowMemory: true, ...session });
          sessions[i] = r.session;
          allCached &&= r.cached;
          onProgress?.(done + 1, order.length, stage.name);
          continue;
        }
        // The converted bytes live only until the session exists: ORT copies them (and packs the MatMul weights).
        const externalData = weights.flatMap((l) => (l.int8 ? int8ExternalData(l.location, cache!.get(l.int8)) : [{ path: l.location, data: readWeightBytes(l, stats) }]));
        // ORT's memory arena stays on: with it off every intermediate is a fresh mmap, and page faults made attention
        // 2.6× and the MLP's elementwise ops several times slower (measured). RUN_OPTIONS hands each arena's
        // memory back after every run, so 80-odd sessions do not each keep their peak activations.
        // On WebGPU every stage but the last leaves its outputs in device memory for the next (see forward).
        const preferredOutputLocation = deviceIO && stage.name !== 'final_layer' ? ('gpu-buffer' as const) : undefined;
        const r = await loadGraph(`flux2-${stage.name}`, key, w.files, () => graph, { lowMemory: false, ...session, externalData, preferredOutputLocation });
        sessions[i] = r.session;
        allCached &&= r.cached;
        onProgress?.(done + 1, order.length, stage.name);
      }
      break;
    } catch (e) {
      await Promise.all(sessions.map((s) => s?.release()));
      // a cache file damaged since it was written was removed by get(): quantize again, once
      if (!(e instanceof Int8CacheCorruptError) || attempt > 0) throw e;
      sessions = [];
      cache = openCache();
      onDisk();
      if (cacheInfo) cacheInfo.built = true;
    }
    const model = new Flux2Transformer(built.map(({ stage }, i) => ({ stage, session: sessions[i]! })), w.config, w.layout, allCached);
    Object.assign(model, { computeDtype: dtype, fp16Overflows: stats.fp16Overflows, deviceIO, device, precision, int8Cache: cacheInfo });
    return model;
  }

  /** Velocity for every input token, [batch, nTokens, inChannels] (spec §1.3): `prepareContext`, then one `step`. */
  async forward(inp: Flux2ForwardInput): Promise<Float32Array> {
    const context = await this.prepareContext(inp);
    try {
      return await this.step(inp, context);
    } finally {
      context.dispose();
    }
  }

  /**
   * Runs the step-invariant stage once: the text projection and the RoPE tables of `inp`'s positions. A sampler
   * passes the result to every `step` of a generation (same batch, token and text counts) and disposes it after.
   * On WebGPU with device-resident I/O the context stays in device memory, so a step uploads only `x` and
   * `timesteps`.
   */
  async prepareContext(inp: Flux2ContextInput): Promise<Flux2Context> {
    const c = this.config;
    const { batch: B, nTokens: N, nCtx: L } = checkCounts(inp);
    const nAxes = c.axesDim.length;
    expectLength('xIds', inp.xIds, B * N * nAxes);
    expectLength('ctx', inp.ctx, B * L * c.contextInDim);
    expectLength('ctxIds', inp.ctxIds, B * L * nAxes);
    const values = new Map<string, ort.Tensor>([
      ['x_ids', i64(inp.xIds, [B, N, nAxes])],
      ['ctx', f32(inp.ctx, [B, L, c.contextInDim])],
      ['ctx_ids', i64(inp.ctxIds, [B, L, nAxes])],
      ['n_txt', i64(BigInt64Array.of(BigInt(L)), [1])],
    ]);
    const transfers = await this.runStages(this.stages.filter((s) => s.stage.name === CONTEXT_STAGE), values, { keep: new Set(), take: CONTEXT_VALUES });
    const kept = new Map(CONTEXT_VALUES.map((k) => [k, values.get(k)!]));
    return new Flux2Context({ batch: B, nTokens: N, nCtx: L }, kept, transfers);
  }

  /** One model evaluation with a prepared context: velocity for every input token, [batch, nTokens, inChannels]. */
  async step(inp: Flux2StepInput, context: Flux2Context): Promise<Float32Array> {
    const c = this.config;
    const { batch: B, nTokens: N, nCtx: L } = checkCounts(inp);
    if (context.disposed) throw new Error('flux2 step: the context was disposed');
    const k = context.counts;
    if (k.batch !== B || k.nTokens !== N || k.nCtx !== L) {
      throw new RangeError(`flux2 step: the context is for batch ${k.batch}, ${k.nTokens} tokens, ${k.nCtx} text tokens; the step has ${B}, ${N}, ${L}`);
    }
    expectLength('x', inp.x, B * N * c.inChannels);
    expectLength('timesteps', inp.timesteps, B);
    // the values the stages exchange: the step's own inputs and the context's (which the step must not dispose)
    const values = new Map<string, ort.Tensor>([
      ['x', f32(inp.x, [B, N, c.inChannels])],
      ['timesteps', f32(inp.timesteps, [B])],
      ...context.values,
    ]);
    if (c.useGuidanceEmbed) {
      expectLength('guidance', inp.guidance, B);
      values.set('guidance', f32(inp.guidance!, [B]));
    }
    const owned = new Set(context.values.values());
    this.lastTransfers = await this.runStages(this.stages.filter((s) => s.stage.name !== CONTEXT_STAGE), values, { keep: owned, take: ['output'] });
    return values.get('output')!.data as Float32Array;
  }

  /**
   * Runs `stages` in order on `values`, which gains their outputs (`<name>_next` replaces `<name>`). With
   * device-resident I/O, values other than host inputs live in device memory: each is disposed as soon as a stage
   * replaces it and the rest when the run ends, except the tensors in `keep` (a context's, owned by it) and, when
   * the run succeeds, the final values named in `take` (handed to the caller), so memory does not grow per step.
   */
  private async runStages(stages: StageSession[], values: Map<string, ort.Tensor>, own: { keep: ReadonlySet<ort.Tensor>; take: readonly string[] }): Promise<HostTransfers> {
    const { keep } = own;
    const transfers: HostTransfers = { uploads: 0, downloads: 0 };
    const onGpu = (v: ort.Tensor) => v.location === 'gpu-buffer';
    const produced = new Set<ort.Tensor>();
    let ok = false;
    try {
      for (const { stage, session } of stages) {
        const feeds: Record<string, ort.Tensor> = {};
        for (const name of session.inputNames) {
          const v = values.get(name);
          if (!v) throw new Error(`flux2 stage ${stage.name}: no value ${name}`);
          feeds[name] = v;
          if (this.device !== 'cpu' && !onGpu(v)) transfers.uploads++;
        }
        const out = await session.run(feeds, RUN_OPTIONS);
        for (const [name, v] of Object.entries(out)) {
          const key = name.replace(/_next$/, '');
          const old = values.get(key);
          if (old && old !== v && onGpu(old) && !keep.has(old)) {
            old.dispose();
            produced.delete(old);
          }
          values.set(key, v);
          produced.add(v);
          if (this.device !== 'cpu' && !onGpu(v)) transfers.downloads++;
        }
      }
      ok = true;
      return transfers;
    } finally {
      const retain = new Set(ok ? own.take.map((k) => values.get(k)) : []);
      for (const v of produced) if (onGpu(v) && !keep.has(v) && !retain.has(v)) v.dispose();
    }
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
  /** The stress model of issue 21: outlier channels, heavy-tailed SwiGLU products (weights/stress-outliers.ts). */
  outliers?: boolean;
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
  const generate = (name: string, shape: number[]) => {
    const d = randomTensor(name, shape, seed);
    if (opts.outliers) applyOutlierEdits(d, shape, flux2OutlierEdits(name, config));
    return d;
  };
  const tensors: Record<string, TensorToWrite> = {};
  // diffusers splits one BFL tensor into several: generate it once, hand out its row blocks in order
  let cache: { name: string; data: Float32Array } | undefined;
  const bflData = (name: string, shape: number[]) => {
    if (cache?.name !== name) cache = { name, data: generate(name, shape) };
    return cache.data;
  };
  for (const { name, shape } of flux2BflShapes(config)) {
    if (layout === 'bfl') {
      tensors[name] = { dtype, shape, data: () => encode(generate(name, shape)) };
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
  writeSafetensors(file, tensors, { format: 'pt', generator: 'klein writeRandomFlux2Checkpoint', flux2_config: JSON.stringify(config), seed: String(seed), ...(opts.outliers ? { outliers: 'issue-21' } : {}) });
}
