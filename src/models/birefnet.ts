// BiRefNet (github.com/ZhengPeng7/BiRefNet, MIT) as an ONNX graph: a Swin-v1 backbone run on the image and on a
// half-size copy, an ASPP-Deformable decoder fed with image patches at every level, and gradient attention. One
// graph serves every public checkpoint (general, matting, HR, lite, dynamic, RMBG-2.0): each width is read from the
// weight shapes, so the Swin-L, Swin-T and tiny test geometries all load without a variant switch.
//
// Weights stay in the .safetensors file (external data, cast to fp32 in the graph). BatchNorm runs as ONNX
// BatchNormalization on the checkpoint's own statistics; ORT folds it into the preceding Conv when it optimises the
// session, which is the same maths as folding at load without writing a second copy of the weights.
//
// The graph has static shapes (batch 1, one input size): Swin's padding, shift masks and patch grids depend on
// the size, and static shapes let ORT constant-fold them. A BiRefNet object compiles one graph per size it meets.
import fs from 'node:fs';
import path from 'node:path';
import { Graph, type Value } from '../graph/onnx-graph.ts';
import { linear, reshape, transpose, concat, splitLast, COMPUTE } from '../graph/nn.ts';
import { loadGraph, f32, type SessionConfig, ort } from '../graph/session.ts';
import { Checkpoint, writeSafetensors, elementCount, type TensorInfo, type TensorToWrite } from '../weights/safetensors.ts';

// ---------------------------------------------------------------------------------------------------------------
// Configuration

/** Geometry of a BiRefNet checkpoint. Everything here is inferred from the weights by `inferBiRefNetConfig`. */
export interface BiRefNetConfig {
  /** Swin patch-embedding width (`bb.patch_embed.proj.weight.shape[0]`): 192 Swin-L, 96 Swin-T. */
  embedDim: number;
  /** Blocks per Swin stage (count of `bb.layers.{s}.blocks.{b}`). */
  depths: number[];
  /** Attention heads per stage (`relative_position_bias_table.shape[1]`). */
  numHeads: number[];
  /** Swin window (`(sqrt(table rows) + 1) / 2`): 12 Swin-L, 7 Swin-T. */
  windowSize: number;
  /** ASPPDeformable branch width (256 in the reference code). */
  asppPlanes: number;
  /** BasicDecBlk inner width (64 in the reference code). */
  decInter: number;
  /** SimpleConvs inner width of the image-patch blocks (64 in the reference code). */
  iptInter: number;
  /** Gradient-attention width (`_N` = 16). */
  gdtChannels: number;
}

/** The published geometries, plus the tiny one of the golden vectors (`../shared/golden/birefnet`). */
export const BIREFNET_CONFIGS = {
  /** BiRefNet, BiRefNet-matting, BiRefNet_HR(-matting), RMBG-2.0: Swin-L. */
  full: { embedDim: 192, depths: [2, 2, 18, 2], numHeads: [6, 12, 24, 48], windowSize: 12, asppPlanes: 256, decInter: 64, iptInter: 64, gdtChannels: 16 },
  /** BiRefNet_lite: Swin-T, same decoder. */
  lite: { embedDim: 96, depths: [2, 2, 6, 2], numHeads: [3, 6, 12, 24], windowSize: 7, asppPlanes: 256, decInter: 64, iptInter: 64, gdtChannels: 16 },
  /** The golden tiny config: the reference's hard-coded decoder widths shrunk, window 7. */
  tiny: { embedDim: 8, depths: [2, 2, 2, 2], numHeads: [2, 4, 8, 16], windowSize: 7, asppPlanes: 16, decInter: 8, iptInter: 8, gdtChannels: 16 },
} satisfies Record<string, BiRefNetConfig>;

/** Model input of the fixed-resolution checkpoints (HR variants: 2048). */
export const DEFAULT_INPUT_SIZE = 1024;
export const IMAGENET_MEAN = [0.485, 0.456, 0.406] as const;
export const IMAGENET_STD = [0.229, 0.224, 0.225] as const;
/** Bump when the graph built for a given config changes, so cached .onnx files are rebuilt. */
const GRAPH_VERSION = 3;
const LN_EPS = 1e-5;
const BN_EPS = 1e-5;

export class BiRefNetError extends Error {
  override name = 'BiRefNetError';
}

/**
 * Checkpoint access by reference key name. DataParallel (`module.`) and torch.compile (`_orig_mod.`) prefixes are
 * stripped, as the reference `check_state_dict` does.
 */
export class BiRefNetWeights {
  private readonly byKey = new Map<string, TensorInfo>();
  constructor(readonly ckpt: Checkpoint) {
    for (const name of ckpt.names) this.byKey.set(name.replace(/^(module\.|_orig_mod\.)+/, ''), ckpt.info(name));
  }
  has(key: string): boolean {
    return this.byKey.has(key);
  }
  get(key: string): TensorInfo {
    const t = this.byKey.get(key);
    if (!t) throw new BiRefNetError(`not a BiRefNet checkpoint (or an unsupported variant): tensor ${key} is missing in ${this.ckpt.files.map((f) => f.file).join(', ')}`);
    return t;
  }
  get files(): string[] {
    return this.ckpt.files.map((f) => f.file);
  }
}

/** Reads the geometry off the weight shapes; throws a clear error for anything that is not a BiRefNet (Swin) checkpoint. */
export function inferBiRefNetConfig(w: BiRefNetWeights): BiRefNetConfig {
  const embedDim = w.get('bb.patch_embed.proj.weight').shape[0];
  const depths: number[] = [];
  const numHeads: number[] = [];
  let windowSize = 0;
  for (let s = 0; w.has(`bb.layers.${s}.blocks.0.norm1.weight`); s++) {
    let d = 0;
    while (w.has(`bb.layers.${s}.blocks.${d}.norm1.weight`)) d++;
    depths.push(d);
    const table = w.get(`bb.layers.${s}.blocks.0.attn.relative_position_bias_table`).shape;
    numHeads.push(table[1]);
    const ws = (Math.sqrt(table[0]) + 1) / 2;
    if (!Number.isInteger(ws) || (windowSize && ws !== windowSize)) throw new BiRefNetError(`unexpected relative_position_bias_table shape ${JSON.stringify(table)} in stage ${s}`);
    windowSize = ws;
  }
  if (depths.length !== 4) throw new BiRefNetError(`expected a 4-stage Swin backbone, found ${depths.length} stages`);
  for (let s = 0; s < 4; s++) {
    const dim = embedDim * 2 ** s;
    if (dim % numHeads[s] !== 0) throw new BiRefNetError(`stage ${s}: width ${dim} is not divisible by ${numHeads[s]} heads`);
  }
  return {
    embedDim,
    depths,
    numHeads,
    windowSize,
    asppPlanes: w.get('squeeze_module.0.dec_att.aspp1.atrous_conv.regular_conv.weight').shape[0],
    decInter: w.get('squeeze_module.0.conv_in.weight').shape[0],
    iptInter: w.get('decoder.ipt_blk5.conv1.weight').shape[0],
    gdtChannels: w.get('decoder.gdt_convs_4.0.weight').shape[0],
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Graph: shared helpers

type W = BiRefNetWeights;

function wt(g: Graph, w: W, key: string): Value {
  return g.weight(w.get(key), COMPUTE);
}

function layerNorm(g: Graph, w: W, x: Value, p: string): Value {
  return g.op('LayerNormalization', [x, wt(g, w, `${p}.weight`), wt(g, w, `${p}.bias`)], { axis: -1, epsilon: { float: LN_EPS } }, { hint: 'ln' });
}

/** NCHW Conv with the reference's `padding = k // 2`, stride 1 (patch embed passes its own stride). */
function conv(g: Graph, w: W, x: Value, p: string, stride = 1): Value {
  const weight = w.get(`${p}.weight`);
  const [kh, kw] = weight.shape.slice(2);
  const pad = stride === 1 ? [kh >> 1, kw >> 1, kh >> 1, kw >> 1] : [0, 0, 0, 0];
  const inputs = [x, wt(g, w, `${p}.weight`)];
  if (w.has(`${p}.bias`)) inputs.push(wt(g, w, `${p}.bias`));
  return g.op('Conv', inputs, { kernel_shape: [kh, kw], pads: pad, strides: [stride, stride] }, { hint: 'conv' });
}

/** Eval-mode BatchNorm; absent when the reference was built with batch_size 1 (nn.Identity). */
function bn(g: Graph, w: W, x: Value, p: string): Value {
  if (!w.has(`${p}.running_mean`)) return x;
  const args = ['weight', 'bias', 'running_mean', 'running_var'].map((n) => wt(g, w, `${p}.${n}`));
  return g.op('BatchNormalization', [x, ...args], { epsilon: { float: BN_EPS } }, { hint: 'bn' });
}

const relu = (g: Graph, x: Value): Value => g.op('Relu', [x]);

/** Bilinear resize with `align_corners=True` (F.interpolate's mode in every BiRefNet resize); no-op at equal size. */
function resizeAC(g: Graph, x: Value, from: [number, number], to: [number, number], channels: number): Value {
  if (from[0] === to[0] && from[1] === to[1]) return x;
  return g.op('Resize', [x, null, null, g.constI64([1, channels, to[0], to[1]])], { mode: 'linear', coordinate_transformation_mode: 'align_corners' }, { hint: 'resize' });
}

function slice(g: Graph, x: Value, axis: number, start: number, end: number): Value {
  return g.op('Slice', [x, g.constI64([start]), g.constI64([end]), g.constI64([axis])]);
}

/** `torch.roll(x, k, axis)`: ONNX has no Roll, so two slices swap places. */
function roll(g: Graph, x: Value, k: number, axis: number, n: number): Value {
  const s = ((k % n) + n) % n;
  if (s === 0) return x;
  return concat(g, [slice(g, x, axis, n - s, n), slice(g, x, axis, 0, n - s)], axis);
}

// ---------------------------------------------------------------------------------------------------------------
// Swin-v1 backbone (tokens kept NHWC: [1, H, W, C])

/** `relative_position_index` of the reference, recomputed: index into the (2ws−1)² bias table per token pair. */
export function relativePositionIndex(ws: number): number[] {
  const n = ws * ws;
  const idx = new Array<number>(n * n);
  for (let i = 0; i < n; i++) {
    const ih = Math.floor(i / ws), iw = i % ws;
    for (let j = 0; j < n; j++) {
      const jh = Math.floor(j / ws), jw = j % ws;
      idx[i * n + j] = (ih - jh + ws - 1) * (2 * ws - 1) + (iw - jw + ws - 1);
    }
  }
  return idx;
}

/**
 * Region ids of the shifted-window mask, per window and token: the reference labels the padded map in 3×3 bands
 * (`[0, Hp−ws)`, `[Hp−ws, Hp−shift)`, `[Hp−shift, Hp)` per axis); tokens of different bands never attend to each
 * other. Returned as `[nW, N]`, windows in row-major order.
 */
export function shiftRegionIds(Hp: number, Wp: number, ws: number, shift: number): Float32Array {
  const band = (r: number, n: number) => (r < n - ws ? 0 : r < n - shift ? 1 : 2);
  const nWh = Hp / ws, nWw = Wp / ws, N = ws * ws;
  const ids = new Float32Array(nWh * nWw * N);
  for (let a = 0; a < nWh; a++) {
    for (let b = 0; b < nWw; b++) {
      for (let i = 0; i < ws; i++) {
        for (let j = 0; j < ws; j++) ids[(a * nWw + b) * N + i * ws + j] = band(a * ws + i, Hp) * 3 + band(b * ws + j, Wp);
      }
    }
  }
  return ids;
}

/** `[nW, 1, N, N]` additive mask (0 / −inf), built in-graph from the small id table so ORT folds it at load. */
function shiftMask(g: Graph, Hp: number, Wp: number, ws: number, shift: number): Value {
  const N = ws * ws;
  const nW = (Hp / ws) * (Wp / ws);
  const ids = g.constF32(shiftRegionIds(Hp, Wp, ws, shift), [nW, N], 'region_ids');
  const same = g.op('Equal', [reshape(g, ids, [nW, N, 1]), reshape(g, ids, [nW, 1, N])]);
  const m = g.op('Where', [same, g.scalarF32(0), g.scalarF32(-Infinity)], {}, { hint: 'shift_mask' });
  return reshape(g, m, [nW, 1, N, N]);
}

interface Stage {
  dim: number;
  heads: number;
}

/** Per-graph caches: one index constant per window size, one folded bias per block shared by both scales. */
const graphCaches = new WeakMap<Graph, Map<string, Value>>();

function cached(g: Graph, key: string, make: () => Value): Value {
  let m = graphCaches.get(g);
  if (!m) graphCaches.set(g, (m = new Map()));
  let v = m.get(key);
  if (!v) m.set(key, (v = make()));
  return v;
}

/** `table[relative_position_index]` as `[1, h, N, N]`: a Gather on an initializer, which ORT folds at load. */
function relativePositionBias(g: Graph, w: W, p: string, ws: number, h: number): Value {
  const N = ws * ws;
  return cached(g, `bias:${p}`, () => {
    const index = cached(g, `index:${ws}`, () => g.constI64(relativePositionIndex(ws), [N * N], 'relative_position_index'));
    const gathered = g.op('Gather', [wt(g, w, `${p}.relative_position_bias_table`), index], { axis: 0 });
    return reshape(g, transpose(g, reshape(g, gathered, [N, N, h]), [2, 0, 1]), [1, h, N, N]);
  });
}

function windowAttention(g: Graph, w: W, x: Value, p: string, st: Stage, ws: number, nW: number, mask: Value | null): Value {
  const N = ws * ws;
  const C = st.dim;
  const h = st.heads;
  const d = C / h;
  const qkv = linear(g, x, w.get(`${p}.qkv.weight`), w.get(`${p}.qkv.bias`));
  const [q0, k0, v0] = splitLast(g, qkv, [C, C, C]);
  const q = g.op('Mul', [transpose(g, reshape(g, q0, [nW, N, h, d]), [0, 2, 1, 3]), g.scalarF32(d ** -0.5)]);
  const kT = transpose(g, reshape(g, k0, [nW, N, h, d]), [0, 2, 3, 1]);
  const v = transpose(g, reshape(g, v0, [nW, N, h, d]), [0, 2, 1, 3]);
  const bias = relativePositionBias(g, w, p, ws, h);
  let attn = g.op('Add', [g.op('MatMul', [q, kT]), bias]);
  if (mask) attn = g.op('Add', [attn, mask]);
  attn = g.op('Softmax', [attn], { axis: -1 });
  const out = reshape(g, transpose(g, g.op('MatMul', [attn, v]), [0, 2, 1, 3]), [nW, N, C]);
  return linear(g, out, w.get(`${p}.proj.weight`), w.get(`${p}.proj.bias`));
}

function swinBlock(g: Graph, w: W, x: Value, p: string, st: Stage, H: number, Wd: number, ws: number, shift: number, mask: Value | null): Value {
  const C = st.dim;
  const Hp = Math.ceil(H / ws) * ws;
  const Wp = Math.ceil(Wd / ws) * ws;
  let y = layerNorm(g, w, x, `${p}.norm1`);
  // padded tokens are zeros after norm1 and are not masked (the reference attends to them too)
  if (Hp > H || Wp > Wd) y = g.op('Pad', [y, g.constI64([0, 0, 0, 0, 0, Hp - H, Wp - Wd, 0])]);
  if (shift) y = roll(g, roll(g, y, -shift, 1, Hp), -shift, 2, Wp);
  const nWh = Hp / ws, nWw = Wp / ws, nW = nWh * nWw;
  const windows = reshape(g, transpose(g, reshape(g, y, [1, nWh, ws, nWw, ws, C]), [0, 1, 3, 2, 4, 5]), [nW, ws * ws, C]);
  const a = windowAttention(g, w, windows, `${p}.attn`, st, ws, nW, shift ? mask : null);
  y = reshape(g, transpose(g, reshape(g, a, [1, nWh, nWw, ws, ws, C]), [0, 1, 3, 2, 4, 5]), [1, Hp, Wp, C]);
  if (shift) y = roll(g, roll(g, y, shift, 1, Hp), shift, 2, Wp);
  if (Hp > H || Wp > Wd) y = g.op('Slice', [y, g.constI64([0, 0]), g.constI64([H, Wd]), g.constI64([1, 2])]);
  const x1 = g.op('Add', [x, y]);
  const hid = g.op('Gelu', [linear(g, layerNorm(g, w, x1, `${p}.norm2`), w.get(`${p}.mlp.fc1.weight`), w.get(`${p}.mlp.fc1.bias`))]);
  return g.op('Add', [x1, linear(g, hid, w.get(`${p}.mlp.fc2.weight`), w.get(`${p}.mlp.fc2.bias`))]);
}

/** PatchMerging: zero-pad odd sizes, gather 2×2 neighbours in the order (0,0), (1,0), (0,1), (1,1), norm, reduce. */
function patchMerging(g: Graph, w: W, x: Value, p: string, C: number, H: number, Wd: number): Value {
  if (H % 2 || Wd % 2) x = g.op('Pad', [x, g.constI64([0, 0, 0, 0, 0, H % 2, Wd % 2, 0])]);
  const H2 = Math.ceil(H / 2), W2 = Math.ceil(Wd / 2);
  // [1, H2, dh, W2, dw, C] → [1, H2, W2, dw, dh, C]: channel block dw·2 + dh matches the reference's cat order
  const merged = reshape(g, transpose(g, reshape(g, x, [1, H2, 2, W2, 2, C]), [0, 1, 3, 4, 2, 5]), [1, H2, W2, 4 * C]);
  return linear(g, layerNorm(g, w, merged, `${p}.norm`), w.get(`${p}.reduction.weight`));
}

interface Feature {
  v: Value;
  c: number;
  hw: [number, number];
}

/** The four stage outputs (after `bb.norm{i}`), NCHW, strides 4, 8, 16, 32. */
function swin(g: Graph, w: W, cfg: BiRefNetConfig, x: Value, H: number, Wd: number, tap: Tap, tapPrefix: string): Feature[] {
  let h = Math.ceil(H / 4), wd = Math.ceil(Wd / 4);
  const pe = conv(g, w, x, 'bb.patch_embed.proj', 4);
  let t = layerNorm(g, w, transpose(g, pe, [0, 2, 3, 1]), 'bb.patch_embed.norm');
  const outs: Feature[] = [];
  const ws = cfg.windowSize;
  const shift = ws >> 1;
  for (let s = 0; s < cfg.depths.length; s++) {
    const st: Stage = { dim: cfg.embedDim * 2 ** s, heads: cfg.numHeads[s] };
    g.within(`bb.layers.${s}`, () => {
      const Hp = Math.ceil(h / ws) * ws, Wp = Math.ceil(wd / ws) * ws;
      // the mask is computed whatever the size (no "window ≥ feature map" shortcut in this Swin variant)
      const mask = cfg.depths[s] > 1 ? shiftMask(g, Hp, Wp, ws, shift) : null;
      for (let b = 0; b < cfg.depths[s]; b++) t = swinBlock(g, w, t, `bb.layers.${s}.blocks.${b}`, st, h, wd, ws, b % 2 ? shift : 0, mask);
    });
    const out = transpose(g, layerNorm(g, w, t, `bb.norm${s}`), [0, 3, 1, 2]);
    tap(`${tapPrefix}.stage${s}`, out);
    outs.push({ v: out, c: st.dim, hw: [h, wd] });
    if (s < cfg.depths.length - 1) {
      t = patchMerging(g, w, t, `bb.layers.${s}.downsample`, st.dim, h, wd);
      h = Math.ceil(h / 2);
      wd = Math.ceil(wd / 2);
    }
  }
  return outs;
}

// ---------------------------------------------------------------------------------------------------------------
// Decoder

/** DeformableConv2d: offsets and a `2·sigmoid` modulation mask predicted by plain convs, then ONNX DeformConv. */
function deformableConv(g: Graph, w: W, x: Value, p: string): Value {
  const weight = w.get(`${p}.regular_conv.weight`);
  const k = weight.shape[2];
  const pad = k >> 1;
  const offset = conv(g, w, x, `${p}.offset_conv`);
  const mask = g.op('Mul', [g.op('Sigmoid', [conv(g, w, x, `${p}.modulator_conv`)]), g.scalarF32(2)]);
  const bias = w.has(`${p}.regular_conv.bias`) ? wt(g, w, `${p}.regular_conv.bias`) : null;
  return g.op('DeformConv', [x, wt(g, w, `${p}.regular_conv.weight`), offset, bias, mask], { kernel_shape: [k, k], pads: [pad, pad, pad, pad], strides: [1, 1], dilations: [1, 1], group: 1, offset_group: 1 }, { hint: 'deform' });
}

function asppDeformable(g: Graph, w: W, x: Value, p: string, hw: [number, number], tap: Tap, tapPrefix?: string): Value {
  const branch = (bp: string) => relu(g, bn(g, w, deformableConv(g, w, x, `${bp}.atrous_conv`), `${bp}.bn`));
  const branches = [branch(`${p}.aspp1`)];
  for (let i = 0; w.has(`${p}.aspp_deforms.${i}.atrous_conv.regular_conv.weight`); i++) {
    if (tapPrefix && i === 2) {
      tap(`${tapPrefix}.deform_k7.input`, x);
      tap(`${tapPrefix}.deform_k7`, deformableConv(g, w, x, `${p}.aspp_deforms.${i}.atrous_conv`));
    }
    branches.push(branch(`${p}.aspp_deforms.${i}`));
  }
  // global-average-pool branch; upsampling a 1×1 map with align_corners is a broadcast
  const pooled = relu(g, bn(g, w, conv(g, w, g.op('GlobalAveragePool', [x]), `${p}.global_avg_pool.1`), `${p}.global_avg_pool.2`));
  branches.push(g.op('Expand', [pooled, g.constI64([1, 1, hw[0], hw[1]])]));
  return relu(g, bn(g, w, conv(g, w, concat(g, branches, 1), `${p}.conv1`), `${p}.bn1`)); // dropout: identity in eval
}

function basicDecBlk(g: Graph, w: W, x: Value, p: string, hw: [number, number], tap: Tap, tapPrefix?: string): Value {
  return g.within(p, () => {
    let y = relu(g, bn(g, w, conv(g, w, x, `${p}.conv_in`), `${p}.bn_in`));
    if (w.has(`${p}.dec_att.conv1.weight`)) {
      y = asppDeformable(g, w, y, `${p}.dec_att`, hw, tap, tapPrefix);
      if (tapPrefix) tap(`${tapPrefix}.dec_att`, y);
    }
    return bn(g, w, conv(g, w, y, `${p}.conv_out`), `${p}.bn_out`);
  });
}

/** `rearrange(x, 'b c (hg h) (wg w) -> b (c hg wg) h w')`: the image cut into an hg×wg grid stacked on channels. */
function imagePatches(g: Graph, x: Value, H: number, Wd: number, h: number, wd: number): Value {
  const hg = H / h, wg = Wd / wd;
  if (hg === 1 && wg === 1) return x;
  return reshape(g, transpose(g, reshape(g, x, [1, 3, hg, h, wg, wd]), [0, 1, 2, 4, 3, 5]), [1, 3 * hg * wg, h, wd]);
}

const simpleConvs = (g: Graph, w: W, x: Value, p: string): Value => conv(g, w, conv(g, w, x, `${p}.conv1`), `${p}.conv_out`);

/** `p · sigmoid(attn(relu(bn(conv(p)))))`, the gradient attention the reference applies at inference too. */
function gradientAttention(g: Graph, w: W, p: Value, level: number, tap: Tap): Value {
  const f = relu(g, bn(g, w, conv(g, w, p, `decoder.gdt_convs_${level}.0`), `decoder.gdt_convs_${level}.1`));
  const a = conv(g, w, f, `decoder.gdt_convs_attn_${level}.0`);
  if (level === 4) tap('dbg.decoder.gdt_convs_attn_4', a);
  return g.op('Mul', [p, g.op('Sigmoid', [a])]);
}

/**
 * `conv_out1(cat(upsample(d1 → H×W), ipt))`, computed as `upsample(conv_a(d1)) + conv_b(ipt)`: the 1×1 conv and the
 * bilinear upsample are both linear (and the upsample's weights sum to 1), so they commute. The reference form
 * materialises d1 at full resolution (192 ch × 1024² = 805 MB for Swin-L, 3.2 GB at 2048²); this one upsamples a
 * single channel.
 */
function outputHead(g: Graph, w: W, d1: Value, hw: [number, number], ipt: Value, H: number, Wd: number): Value {
  const c1 = w.get('decoder.decoder_block1.conv_out.weight').shape[0];
  const total = w.get('decoder.conv_out1.0.weight').shape[1];
  const weight = wt(g, w, 'decoder.conv_out1.0.weight');
  const part = (from: number, to: number) => g.op('Slice', [weight, g.constI64([from]), g.constI64([to]), g.constI64([1])], {}, { hint: 'conv_out1_part' });
  const low = g.op('Conv', [d1, part(0, c1)], { kernel_shape: [1, 1] });
  const high = g.op('Conv', [ipt, part(c1, total), wt(g, w, 'decoder.conv_out1.0.bias')], { kernel_shape: [1, 1] });
  return g.op('Add', [resizeAC(g, low, hw, [H, Wd], 1), high], {}, { hint: 'logits' });
}

type Tap = (name: string, v: Value) => void;

export interface BuildOptions {
  /** Also output the golden file's `dbg.*` intermediates (bug hunting). */
  debug?: boolean;
}

/** The whole model for one input size: input `input` [1,3,H,W] (normalised), outputs `logits` and `alpha`. */
export function buildBiRefNetGraph(w: BiRefNetWeights, cfg: BiRefNetConfig, H: number, Wd: number, opts: BuildOptions = {}): Graph {
  if (H % 32 || Wd % 32 || H <= 0 || Wd <= 0) throw new BiRefNetError(`BiRefNet input must be a positive multiple of 32 in both directions, got ${Wd}×${H}`);
  const g = new Graph(`birefnet_${H}x${Wd}`);
  const taps: Array<[string, Value]> = [];
  const tap: Tap = opts.debug ? (name, v) => taps.push([name, v]) : () => {};
  const x = g.input('input', 'float32', [1, 3, H, Wd]);

  // encoder: Swin on the image and on a half-size copy, concatenated per stage
  const xHalf = resizeAC(g, x, [H, Wd], [H / 2, Wd / 2], 3);
  tap('dbg.x_half', xHalf);
  const full = g.within('bb_full', () => swin(g, w, cfg, x, H, Wd, tap, 'dbg.bb.full'));
  const half = g.within('bb_half', () => swin(g, w, cfg, xHalf, H / 2, Wd / 2, tap, 'dbg.bb.half'));
  const enc: Feature[] = full.map((f, i) => ({ v: concat(g, [f.v, resizeAC(g, half[i].v, half[i].hw, f.hw, half[i].c)], 1), c: 2 * f.c, hw: f.hw }));
  const [x1, x2, x3] = enc;
  const hw4 = enc[3].hw;
  const x4cat = concat(g, [...[x1, x2, x3].map((f) => resizeAC(g, f.v, f.hw, hw4, f.c)), enc[3].v], 1);
  enc.forEach((f, i) => tap(`dbg.enc.x${i + 1}`, i === 3 ? x4cat : f.v));

  let x4 = x4cat;
  for (let i = 0; w.has(`squeeze_module.${i}.conv_in.weight`); i++) x4 = basicDecBlk(g, w, x4, `squeeze_module.${i}`, hw4, tap, i === 0 ? 'dbg.squeeze' : undefined);
  tap('dbg.squeeze_out', x4);

  // decoder: image patches joined at every level, gradient attention, laterals from the encoder
  const patchesAt = (blk: number, hw: [number, number]) => {
    const pt = imagePatches(g, x, H, Wd, hw[0], hw[1]);
    if (blk === 5) tap('dbg.decoder.ipt_blk5.input', pt);
    const out = simpleConvs(g, w, pt, `decoder.ipt_blk${blk}`);
    if (blk === 5) tap('dbg.decoder.ipt_blk5', out);
    return out;
  };
  let p = g.within('decoder.level4', () => {
    const p4 = basicDecBlk(g, w, concat(g, [x4, patchesAt(5, hw4)], 1), 'decoder.decoder_block4', hw4, tap);
    tap('dbg.decoder.decoder_block4', p4);
    return gradientAttention(g, w, p4, 4, tap);
  });
  const levels: Array<[number, Feature]> = [[3, x3], [2, x2]];
  let pc = w.get('decoder.decoder_block4.conv_out.weight').shape[0];
  let phw = hw4;
  for (const [level, skip] of levels) {
    p = g.within(`decoder.level${level}`, () => {
      const up = g.op('Add', [resizeAC(g, p, phw, skip.hw, pc), conv(g, w, skip.v, `decoder.lateral_block${level + 1}.conv`)]);
      const d = basicDecBlk(g, w, concat(g, [up, patchesAt(level + 1, skip.hw)], 1), `decoder.decoder_block${level}`, skip.hw, tap);
      return gradientAttention(g, w, d, level, tap);
    });
    pc = w.get(`decoder.decoder_block${level}.conv_out.weight`).shape[0];
    phw = skip.hw;
  }
  const logits = g.within('decoder.level1', () => {
    const up = g.op('Add', [resizeAC(g, p, phw, x1.hw, pc), conv(g, w, x1.v, 'decoder.lateral_block2.conv')]);
    const d1 = basicDecBlk(g, w, concat(g, [up, patchesAt(2, x1.hw)], 1), 'decoder.decoder_block1', x1.hw, tap);
    tap('dbg.decoder.decoder_block1', d1);
    return outputHead(g, w, d1, x1.hw, simpleConvs(g, w, x, 'decoder.ipt_blk1'), H, Wd);
  });
  g.output(logits, 'logits', 'float32', [1, 1, H, Wd]);
  g.output(g.op('Sigmoid', [logits]), 'alpha', 'float32', [1, 1, H, Wd]);
  for (const [name, v] of taps) g.output(v, name);
  return g;
}

// ---------------------------------------------------------------------------------------------------------------
// Pre- and post-processing

/**
 * Pillow's `Image.resize(..., BILINEAR)` on 8-bit images, reproduced exactly: a separable triangle filter whose
 * support widens with the downscale factor (antialiasing), 22-bit fixed-point coefficients, horizontal pass first
 * into an 8-bit intermediate. This is what torchvision's `Resize` does to the PIL image in the reference
 * preprocessing, so matching it bit for bit keeps the model input identical. Also BICUBIC (a = −0.5).
 */
export function pilResize(src: Uint8Array, sw: number, sh: number, channels: number, dw: number, dh: number, filter: 'bilinear' | 'bicubic' = 'bilinear'): Uint8Array {
  if (src.length !== sw * sh * channels) throw new BiRefNetError(`image buffer holds ${src.length} bytes, expected ${sw}×${sh}×${channels}`);
  let cur = src, cw = sw;
  if (dw !== sw) {
    cur = resample1d(cur, cw, sh, channels, dw, true, filter);
    cw = dw;
  }
  if (dh !== sh) cur = resample1d(cur, cw, sh, channels, dh, false, filter);
  return cur === src ? Uint8Array.from(src) : cur;
}

const PRECISION_BITS = 32 - 8 - 2;

function filterFn(kind: 'bilinear' | 'bicubic'): { f: (x: number) => number; support: number } {
  if (kind === 'bilinear') return { f: (x) => (Math.abs(x) < 1 ? 1 - Math.abs(x) : 0), support: 1 };
  const a = -0.5;
  return {
    f: (x0) => {
      const x = Math.abs(x0);
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
    support: 2,
  };
}

/** Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`. */
function coeffs(inSize: number, outSize: number, kind: 'bilinear' | 'bicubic'): { bounds: Int32Array; kk: Int32Array; ksize: number } {
  const { f, support: fs0 } = filterFn(kind);
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = fs0 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      k[x] = f((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (let x = 0; x < ksize; x++) {
      const v = x < xmax ? (ww !== 0 ? k[x] / ww : k[x]) : 0;
      kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * (1 << PRECISION_BITS)) : Math.trunc(0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { bounds, kk, ksize };
}

function clip8(v: number): number {
  const r = Math.floor(v / (1 << PRECISION_BITS)); // arithmetic shift; sums exceed int32 range only in Pillow's overflow-free domain
  return r < 0 ? 0 : r > 255 ? 255 : r;
}

function resample1d(src: Uint8Array, w: number, h: number, ch: number, out: number, horizontal: boolean, kind: 'bilinear' | 'bicubic'): Uint8Array {
  const { bounds, kk, ksize } = coeffs(horizontal ? w : h, out, kind);
  const ow = horizontal ? out : w, oh = horizontal ? h : out;
  const dst = new Uint8Array(ow * oh * ch);
  const half = 1 << (PRECISION_BITS - 1);
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      const o = horizontal ? x : y;
      const min = bounds[o * 2], n = bounds[o * 2 + 1];
      for (let c = 0; c < ch; c++) {
        let ss = half;
        for (let i = 0; i < n; i++) {
          const si = horizontal ? (y * w + min + i) * ch + c : ((min + i) * w + x) * ch + c;
          ss += src[si] * kk[o * ksize + i];
        }
        dst[(y * ow + x) * ch + c] = clip8(ss);
      }
    }
  }
  return dst;
}

/** `ToTensor` + `Normalize(mean, std)` in float32, as torch computes it: `(u8/255 − mean) / std`, NCHW. */
export function normalizeImage(rgb: Uint8Array, w: number, h: number, channels = 3): Float32Array {
  const out = new Float32Array(3 * w * h);
  const fr = Math.fround;
  for (let c = 0; c < 3; c++) {
    const m = fr(IMAGENET_MEAN[c]), s = fr(IMAGENET_STD[c]);
    for (let i = 0; i < w * h; i++) out[c * w * h + i] = fr(fr(rgb[i * channels + c] / 255) - m) / s;
  }
  return out;
}

/** `F.interpolate(x, (dh, dw), mode='bilinear', align_corners=True)` of one channel (the repo's eval route). */
export function resizeBilinearAlignCorners(src: Float32Array, sw: number, sh: number, dw: number, dh: number): Float32Array {
  const out = new Float32Array(dw * dh);
  const sy = dh > 1 ? (sh - 1) / (dh - 1) : 0;
  const sx = dw > 1 ? (sw - 1) / (dw - 1) : 0;
  for (let y = 0; y < dh; y++) {
    const fy = y * sy;
    const y0 = Math.min(Math.floor(fy), sh - 1), y1 = Math.min(y0 + 1, sh - 1), ly = fy - y0;
    for (let x = 0; x < dw; x++) {
      const fx = x * sx;
      const x0 = Math.min(Math.floor(fx), sw - 1), x1 = Math.min(x0 + 1, sw - 1), lx = fx - x0;
      const top = src[y0 * sw + x0] * (1 - lx) + src[y0 * sw + x1] * lx;
      const bot = src[y1 * sw + x0] * (1 - lx) + src[y1 * sw + x1] * lx;
      out[y * dw + x] = top * (1 - ly) + bot * ly;
    }
  }
  return out;
}

/** A float NCHW image in [0, 1] as 8-bit HWC, the form the reference's PIL pipeline sees. */
export function floatNchwToUint8(img: Float32Array, w: number, h: number): Uint8Array {
  if (img.length !== 3 * w * h) throw new BiRefNetError(`float image holds ${img.length} values, expected 3×${h}×${w} (NCHW)`);
  const out = new Uint8Array(w * h * 3);
  for (let c = 0; c < 3; c++) for (let i = 0; i < w * h; i++) out[i * 3 + c] = Math.round(Math.min(1, Math.max(0, img[c * w * h + i])) * 255);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Runtime

export type InputSize = number | [number, number] | 'dynamic';

export interface BiRefNetLoadOptions {
  /**
   * Model input: a square size, `[height, width]`, or `'dynamic'` (the image's own size rounded to a multiple of
   * 32, for BiRefNet_dynamic). Default: 2048 when the path names an `HR` checkpoint, `'dynamic'` when it names a
   * `dynamic` one, else 1024.
   */
  inputSize?: InputSize;
  session?: SessionConfig;
  /** Also output the `dbg.*` intermediates (bug hunting, conformance). */
  debug?: boolean;
}

export interface BiRefNetOutput {
  /** `[1, 1, H, W]` logits at model resolution. */
  logits: Float32Array;
  /** `sigmoid(logits)`, same shape. */
  alpha: Float32Array;
  /** `dbg.*` intermediates when loaded with `debug`. */
  debug: Record<string, Float32Array>;
}

/** The default model input for a checkpoint path: HR variants 2048², `_dynamic` the image's own size, else 1024². */
export function defaultInputSize(p: string): InputSize {
  // the checkpoint's name is in its folder (HF repo) or its file name
  const abs = path.resolve(p);
  const base = `${path.basename(path.dirname(abs))}/${path.basename(abs)}`;
  if (/dynamic/i.test(base)) return 'dynamic';
  if (/(^|[_\-./])HR([_\-./]|$)/.test(base)) return 2048;
  return DEFAULT_INPUT_SIZE;
}

const round32 = (n: number) => Math.max(32, Math.round(n / 32) * 32);

export class BiRefNet {
  private readonly sessions = new Map<string, Promise<ort.InferenceSession>>();

  private constructor(
    readonly weights: BiRefNetWeights,
    readonly config: BiRefNetConfig,
    readonly inputSize: InputSize,
    private readonly opts: BiRefNetLoadOptions,
  ) {}

  /** Opens a checkpoint (file, folder or sharded index) and compiles the graph for the default input size. */
  static async load(folderOrFile: string, opts: BiRefNetLoadOptions = {}): Promise<BiRefNet> {
    let ckpt: Checkpoint;
    try {
      ckpt = Checkpoint.open(folderOrFile);
    } catch (e) {
      throw new BiRefNetError(`cannot open BiRefNet weights at ${folderOrFile}: ${(e as Error).message}`);
    }
    const weights = new BiRefNetWeights(ckpt);
    const config = inferBiRefNetConfig(weights); // fails fast on a foreign checkpoint
    const inputSize = opts.inputSize ?? defaultInputSize(folderOrFile);
    if (inputSize !== 'dynamic') {
      const [h, w] = typeof inputSize === 'number' ? [inputSize, inputSize] : inputSize;
      if (h % 32 || w % 32 || h <= 0 || w <= 0) throw new BiRefNetError(`BiRefNet input size must be a positive multiple of 32, got ${w}×${h}`);
    }
    const model = new BiRefNet(weights, config, inputSize, opts);
    if (inputSize !== 'dynamic') await model.session(...model.modelSize(0, 0));
    return model;
  }

  /** Model input `[height, width]` for a source image of `w`×`h`. */
  modelSize(w: number, h: number): [number, number] {
    if (this.inputSize === 'dynamic') return [round32(h), round32(w)];
    return typeof this.inputSize === 'number' ? [this.inputSize, this.inputSize] : this.inputSize;
  }

  private session(h: number, w: number): Promise<ort.InferenceSession> {
    const key = `${h}x${w}`;
    let s = this.sessions.get(key);
    if (!s) {
      const debug = !!this.opts.debug;
      s = loadGraph(`birefnet-${key}${debug ? '-debug' : ''}`, { model: 'birefnet', graph: GRAPH_VERSION, config: this.config, h, w, debug }, this.weights.files, () => buildBiRefNetGraph(this.weights, this.config, h, w, { debug }), this.opts.session).then((r) => r.session);
      s.catch(() => this.sessions.delete(key));
      this.sessions.set(key, s);
    }
    return s;
  }

  /** Runs the network on a normalised `[1, 3, h, w]` input (h, w multiples of 32). */
  async run(input: Float32Array, h: number, w: number): Promise<BiRefNetOutput> {
    if (input.length !== 3 * h * w) throw new BiRefNetError(`input holds ${input.length} values, expected 1×3×${h}×${w}`);
    const session = await this.session(h, w);
    const r = await session.run({ input: f32(input, [1, 3, h, w]) });
    const debug: Record<string, Float32Array> = {};
    for (const name of session.outputNames) if (name.startsWith('dbg.')) debug[name] = r[name].data as Float32Array;
    return { logits: r.logits.data as Float32Array, alpha: r.alpha.data as Float32Array, debug };
  }

  /** Resize to the model input (Pillow bilinear) and normalise: the exact model input, NCHW. */
  preprocess(image: Uint8Array, w: number, h: number, channels = 3): { input: Float32Array; h: number; w: number } {
    const [mh, mw] = this.modelSize(w, h);
    const resized = pilResize(image, w, h, channels, mw, mh);
    return { input: normalizeImage(resized, mw, mh, channels), h: mh, w: mw };
  }

  /**
   * The alpha matte of an image, `h`×`w` values in [0, 1]. `image` is 8-bit RGB(A) HWC, or float RGB NCHW in
   * [0, 1] (quantised to 8 bits first, as the reference only ever sees PIL images). The matte comes back at the
   * source size by bilinear (align_corners) resizing of `sigmoid(logits)`, the reference repo's eval route.
   */
  async predict(image: Uint8Array | Float32Array, w: number, h: number): Promise<Float32Array> {
    if (!Number.isInteger(w) || !Number.isInteger(h) || w <= 0 || h <= 0) throw new BiRefNetError(`bad image size ${w}×${h}`);
    let rgb: Uint8Array;
    let channels = 3;
    if (image instanceof Float32Array) rgb = floatNchwToUint8(image, w, h);
    else {
      channels = image.length / (w * h);
      if (channels !== 3 && channels !== 4) throw new BiRefNetError(`image buffer holds ${image.length} bytes, expected ${w}×${h}×3 (RGB) or ×4 (RGBA)`);
      rgb = image;
    }
    const pre = this.preprocess(rgb, w, h, channels);
    const { alpha } = await this.run(pre.input, pre.h, pre.w);
    return resizeBilinearAlignCorners(alpha, pre.w, pre.h, w, h);
  }

  async close(): Promise<void> {
    for (const s of this.sessions.values()) await (await s.catch(() => null))?.release();
    this.sessions.clear();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Random checkpoints (tests, tiny models, benchmarks)

/** Seeded PRNG (mulberry32) with Box–Muller normals: deterministic across platforms. */
function rng(seed: number): { normal: () => number } {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    normal: () => {
      const u = Math.max(uniform(), 1e-12);
      return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * uniform());
    },
  };
}

/**
 * Every state-dict entry of the reference `BiRefNet` for a geometry, with shapes, in module order (the key set of
 * the HF `model.safetensors` files, training-only heads and buffers included).
 */
export function biRefNetStateDictShapes(cfg: BiRefNetConfig): Array<[string, number[], 'F32' | 'I64']> {
  const out: Array<[string, number[], 'F32' | 'I64']> = [];
  const add = (k: string, s: number[], t: 'F32' | 'I64' = 'F32') => out.push([k, s, t]);
  const ln = (p: string, c: number) => { add(`${p}.weight`, [c]); add(`${p}.bias`, [c]); };
  const convw = (p: string, cin: number, cout: number, k: number, bias = true) => { add(`${p}.weight`, [cout, cin, k, k]); if (bias) add(`${p}.bias`, [cout]); };
  const bnw = (p: string, c: number) => { ln(p, c); add(`${p}.running_mean`, [c]); add(`${p}.running_var`, [c]); add(`${p}.num_batches_tracked`, [], 'I64'); };
  const E = cfg.embedDim, ws = cfg.windowSize;
  convw('bb.patch_embed.proj', 3, E, 4);
  ln('bb.patch_embed.norm', E);
  cfg.depths.forEach((depth, s) => {
    const C = E * 2 ** s;
    for (let b = 0; b < depth; b++) {
      const p = `bb.layers.${s}.blocks.${b}`;
      ln(`${p}.norm1`, C);
      add(`${p}.attn.relative_position_bias_table`, [(2 * ws - 1) ** 2, cfg.numHeads[s]]);
      add(`${p}.attn.relative_position_index`, [ws * ws, ws * ws], 'I64');
      add(`${p}.attn.qkv.weight`, [3 * C, C]); add(`${p}.attn.qkv.bias`, [3 * C]);
      add(`${p}.attn.proj.weight`, [C, C]); add(`${p}.attn.proj.bias`, [C]);
      ln(`${p}.norm2`, C);
      add(`${p}.mlp.fc1.weight`, [4 * C, C]); add(`${p}.mlp.fc1.bias`, [4 * C]);
      add(`${p}.mlp.fc2.weight`, [C, 4 * C]); add(`${p}.mlp.fc2.bias`, [C]);
    }
    if (s < cfg.depths.length - 1) {
      add(`bb.layers.${s}.downsample.reduction.weight`, [2 * C, 4 * C]);
      ln(`bb.layers.${s}.downsample.norm`, 4 * C);
    }
  });
  for (let s = 0; s < 4; s++) ln(`bb.norm${s}`, E * 2 ** s);
  const lat = [8, 4, 2, 1].map((m) => 2 * E * m); // ×2: the 'cat' multi-scale input
  const P = cfg.asppPlanes;
  const decBlk = (p: string, cin: number, cout: number) => {
    const I = cfg.decInter;
    convw(`${p}.conv_in`, cin, I, 3);
    const deform = (dp: string, k: number) => {
      convw(`${dp}.atrous_conv.offset_conv`, I, 2 * k * k, k);
      convw(`${dp}.atrous_conv.modulator_conv`, I, k * k, k);
      convw(`${dp}.atrous_conv.regular_conv`, I, P, k, false);
      bnw(`${dp}.bn`, P);
    };
    deform(`${p}.dec_att.aspp1`, 1);
    [1, 3, 7].forEach((k, i) => deform(`${p}.dec_att.aspp_deforms.${i}`, k));
    add(`${p}.dec_att.global_avg_pool.1.weight`, [P, I, 1, 1]);
    bnw(`${p}.dec_att.global_avg_pool.2`, P);
    add(`${p}.dec_att.conv1.weight`, [I, 5 * P, 1, 1]);
    bnw(`${p}.dec_att.bn1`, I);
    convw(`${p}.conv_out`, I, cout, 3);
    bnw(`${p}.bn_in`, I);
    bnw(`${p}.bn_out`, cout);
  };
  const cxt = lat[1] + lat[2] + lat[3];
  decBlk('squeeze_module.0', lat[0] + cxt, lat[0]);
  const iptIn = [3072, 768, 192, 48, 3];
  const iptOut = [lat[0] / 8, lat[0] / 8, lat[1] / 8, lat[2] / 8, lat[3] / 8];
  iptIn.forEach((cin, i) => { convw(`decoder.ipt_blk${5 - i}.conv1`, cin, cfg.iptInter, 3); convw(`decoder.ipt_blk${5 - i}.conv_out`, cfg.iptInter, iptOut[i], 3); });
  const decOut = [lat[1], lat[2], lat[3], lat[3] / 2];
  const decIn = [lat[0] + lat[0] / 8, lat[1] + lat[0] / 8, lat[2] + lat[1] / 8, lat[3] + lat[2] / 8]; // + the image-patch channels
  [4, 3, 2, 1].forEach((lvl, i) => decBlk(`decoder.decoder_block${lvl}`, decIn[i], decOut[i]));
  convw('decoder.conv_out1.0', decOut[3] + iptOut[4], 1, 1);
  [4, 3, 2].forEach((lvl, i) => convw(`decoder.lateral_block${lvl}.conv`, lat[i + 1], decOut[i], 1));
  [4, 3, 2].forEach((lvl, i) => convw(`decoder.conv_ms_spvn_${lvl}`, decOut[i], 1, 1));
  const N = cfg.gdtChannels;
  [4, 3, 2].forEach((lvl, i) => { convw(`decoder.gdt_convs_${lvl}.0`, decOut[i], N, 3); bnw(`decoder.gdt_convs_${lvl}.1`, N); });
  [4, 3, 2].forEach((lvl) => convw(`decoder.gdt_convs_pred_${lvl}.0`, N, 1, 1));
  [4, 3, 2].forEach((lvl) => convw(`decoder.gdt_convs_attn_${lvl}.0`, N, 1, 1));
  return out;
}

/**
 * Writes a BiRefNet checkpoint with random weights and the real key layout (fp32). Initialisation keeps
 * activations in range without a calibration pass: weights N(0, 1/fan_in), BatchNorm near identity with running
 * stats mean 0 / var 1, deformable offsets of about ±1 px and modulation masks that differ from 1, so a tiny model
 * produces a soft, non-constant matte.
 */
export function writeRandomBiRefNetCheckpoint(file: string, config: BiRefNetConfig, opts: { seed?: number } = {}): void {
  const r = rng(opts.seed ?? 0);
  const tensors: Record<string, TensorToWrite> = {};
  const ws = config.windowSize;
  const fanIn = new Map<string, number>();
  const shapes = biRefNetStateDictShapes(config);
  for (const [k, s] of shapes) if (k.endsWith('.weight') && s.length >= 2) fanIn.set(k.slice(0, -'.weight'.length), elementCount(s.slice(1)));
  for (const [key, shape, dtype] of shapes) {
    const n = elementCount(shape);
    if (dtype === 'I64') {
      const data = key.endsWith('relative_position_index') ? BigInt64Array.from(relativePositionIndex(ws), BigInt) : BigInt64Array.of(1n);
      tensors[key] = { dtype, shape, data };
      continue;
    }
    const mod = key.slice(0, key.lastIndexOf('.'));
    const leaf = key.slice(key.lastIndexOf('.') + 1);
    const isNorm = shape.length === 1 && !fanIn.has(mod) && leaf !== 'running_mean' && leaf !== 'running_var';
    const data = new Float32Array(n);
    let gen: () => number;
    if (leaf === 'running_mean') gen = () => 0.1 * r.normal();
    else if (leaf === 'running_var') gen = () => 1 + 0.2 * Math.abs(r.normal());
    else if (key.endsWith('relative_position_bias_table')) gen = () => 0.5 * r.normal();
    else if (isNorm) gen = leaf === 'weight' ? () => 1 + 0.2 * r.normal() : () => 0.1 * r.normal();
    else if (leaf === 'weight') {
      const std = 1 / Math.sqrt(fanIn.get(mod) ?? 1);
      gen = () => std * r.normal();
    } else {
      const deformable = /\.(offset_conv|modulator_conv)$/.test(mod);
      gen = deformable ? () => 0.5 * r.normal() : () => 0.1 * r.normal();
    }
    for (let i = 0; i < n; i++) data[i] = gen();
    tensors[key] = { dtype, shape, data };
  }
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  writeSafetensors(file, tensors, { format: 'pt', generator: 'klein writeRandomBiRefNetCheckpoint', config: JSON.stringify(config) });
}
