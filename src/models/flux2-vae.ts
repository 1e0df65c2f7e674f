// The FLUX.2 autoencoder (spec §5; BFL `flux2/autoencoder.py`): an encoder that maps [-1, 1] RGB to the posterior
// mean of a 32-channel latent at 1/8 resolution, and a decoder back. Both directions are built as ONNX graphs with
// dynamic H/W, and both include the FLUX.2 latent plumbing (2×2 patchify to 128 channels + BatchNorm
// normalisation with the checkpoint's running statistics), so the pipeline only ever sees the normalised
// [B, 128, H/16, W/16] latent the transformer works in.
//
// Weights come from the BFL `ae.safetensors` layout or the diffusers `vae/` layout; the graph is written in BFL
// names and `vaeKey` maps each name to the layout found in the file.
import fs from 'node:fs';
import path from 'node:path';
import { Graph, MS_DOMAIN, type Value } from '../graph/onnx-graph.ts';
import { COMPUTE } from '../graph/nn.ts';
import { f32, loadGraph, ort, type SessionConfig } from '../graph/session.ts';
import { defaultDevice, resolveDevice, type Device } from '../graph/device.ts';
import { resolveComputeDtype, throwIfOverflowed, type ComputeDtype } from '../graph/compute-dtype.ts';
import { VaeHalfGraph } from './flux2-vae-gpu.ts';
import { Checkpoint, readFloat32, writeSafetensors, f32ToBf16, type TensorInfo, type TensorToWrite } from '../weights/safetensors.ts';

export interface Flux2VaeConfig {
  inChannels: number;
  outChannels: number;
  /** Base channel count; level i has `ch * chMult[i]` channels. */
  ch: number;
  chMult: number[];
  /** Resnet blocks per encoder level (the decoder has one more per level). */
  numResBlocks: number;
  /** Latent channels before patchify (128 after the 2×2 patchify). */
  zChannels: number;
}

/** The real FLUX.2 VAE (spec §5: ch 128, mult [1,2,4,4], 2 res blocks, z 32). */
export const FLUX2_VAE_CONFIG: Flux2VaeConfig = { inChannels: 3, outChannels: 3, ch: 128, chMult: [1, 2, 4, 4], numResBlocks: 2, zChannels: 32 };

/** Constants fixed in the reference code, not in the checkpoint. */
export const VAE_GROUPS = 32;
export const VAE_NORM_EPS = 1e-6;
export const VAE_BN_EPS = 1e-4;
/** Pixels per latent token side: 8× VAE downsampling × 2×2 patch. */
export const VAE_SCALE = 16;

export type VaeLayout = 'bfl' | 'diffusers';

/** Part of the compiled-graph cache key: bump when the graphs built here change. */
const VAE_GRAPH_VERSION = 2;

/**
 * The diffusers name of a BFL VAE tensor (DF `convert_flux2_to_diffusers.py`): resnets and samplers renamed, the
 * quant convs moved to the top level, and the decoder's levels numbered the other way round.
 */
export function vaeKey(bflName: string, layout: VaeLayout, levels = FLUX2_VAE_CONFIG.chMult.length): string {
  if (layout === 'bfl') return bflName;
  let m: RegExpMatchArray | null;
  if (bflName === 'encoder.quant_conv.weight' || bflName === 'encoder.quant_conv.bias') return bflName.slice('encoder.'.length);
  if (bflName.startsWith('decoder.post_quant_conv.')) return bflName.slice('decoder.'.length);
  let n = bflName.replace(/\.norm_out\./, '.conv_norm_out.').replace(/\.nin_shortcut\./, '.conv_shortcut.');
  if ((m = n.match(/^encoder\.down\.(\d+)\.block\.(\d+)\.(.*)$/))) return `encoder.down_blocks.${m[1]}.resnets.${m[2]}.${m[3]}`;
  if ((m = n.match(/^encoder\.down\.(\d+)\.downsample\.conv\.(.*)$/))) return `encoder.down_blocks.${m[1]}.downsamplers.0.conv.${m[2]}`;
  if ((m = n.match(/^decoder\.up\.(\d+)\.block\.(\d+)\.(.*)$/))) return `decoder.up_blocks.${levels - 1 - Number(m[1])}.resnets.${m[2]}.${m[3]}`;
  if ((m = n.match(/^decoder\.up\.(\d+)\.upsample\.conv\.(.*)$/))) return `decoder.up_blocks.${levels - 1 - Number(m[1])}.upsamplers.0.conv.${m[2]}`;
  if ((m = n.match(/^(encoder|decoder)\.mid\.block_([12])\.(.*)$/))) return `${m[1]}.mid_block.resnets.${Number(m[2]) - 1}.${m[3]}`;
  if ((m = n.match(/^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)$/))) {
    const sub = { norm: 'group_norm', q: 'to_q', k: 'to_k', v: 'to_v', proj_out: 'to_out.0' }[m[2]]!;
    return `${m[1]}.mid_block.attentions.0.${sub}.${m[3]}`;
  }
  return n;
}

/** Which key layout a VAE checkpoint uses. */
export function detectVaeLayout(ckpt: Checkpoint): VaeLayout {
  if (ckpt.has('encoder.down.0.block.0.conv1.weight') || ckpt.has('decoder.up.0.block.0.conv1.weight')) return 'bfl';
  if (ckpt.has('encoder.down_blocks.0.resnets.0.conv1.weight') || ckpt.has('decoder.up_blocks.0.resnets.0.conv1.weight')) return 'diffusers';
  throw new Error(`${ckpt.files.map((f) => f.file).join(', ')}: not a FLUX.2 VAE checkpoint (neither BFL "encoder.down.0.block.0…" nor diffusers "encoder.down_blocks.0.resnets.0…" keys found)`);
}

/** Reads the architecture from the tensor shapes, so the tiny golden VAE and the real one load the same way. */
export function inferVaeConfig(ckpt: Checkpoint, layout: VaeLayout): Flux2VaeConfig {
  const levelKey = (i: number) => (layout === 'bfl' ? `encoder.down.${i}.block.0.conv1.weight` : `encoder.down_blocks.${i}.resnets.0.conv1.weight`);
  let levels = 0;
  while (ckpt.has(levelKey(levels))) levels++;
  if (levels === 0) throw new Error('VAE checkpoint has no encoder levels');
  const K = (n: string) => ckpt.info(vaeKey(n, layout, levels));
  const ch = K('encoder.conv_in.weight').shape[0];
  const chMult = Array.from({ length: levels }, (_, i) => K(`encoder.down.${i}.block.0.conv1.weight`).shape[0] / ch);
  let numResBlocks = 0;
  while (ckpt.has(vaeKey(`encoder.down.0.block.${numResBlocks}.conv1.weight`, layout, levels))) numResBlocks++;
  return {
    inChannels: K('encoder.conv_in.weight').shape[1],
    outChannels: K('decoder.conv_out.weight').shape[0],
    ch,
    chMult,
    numResBlocks,
    zChannels: K('decoder.conv_in.weight').shape[1],
  };
}

/**
 * Every tensor of a VAE of this config, with BFL names and shapes (PyTorch layout: conv [out, in, kh, kw]).
 * Used to write random checkpoints and to check that a file has everything the graphs need.
 */
export function vaeTensorShapes(c: Flux2VaeConfig): Array<[string, number[]]> {
  const out: Array<[string, number[]]> = [];
  const conv = (n: string, o: number, i: number, k: number) => out.push([`${n}.weight`, [o, i, k, k]], [`${n}.bias`, [o]]);
  const norm = (n: string, ch: number) => out.push([`${n}.weight`, [ch]], [`${n}.bias`, [ch]]);
  const resnet = (n: string, i: number, o: number) => {
    norm(`${n}.norm1`, i);
    conv(`${n}.conv1`, o, i, 3);
    norm(`${n}.norm2`, o);
    conv(`${n}.conv2`, o, o, 3);
    if (i !== o) conv(`${n}.nin_shortcut`, o, i, 1);
  };
  const attn = (n: string, ch: number) => {
    norm(`${n}.norm`, ch);
    for (const p of ['q', 'k', 'v', 'proj_out']) conv(`${n}.${p}`, ch, ch, 1);
  };
  const L = c.chMult.length;
  conv('encoder.conv_in', c.ch, c.inChannels, 3);
  let cin = c.ch;
  for (let i = 0; i < L; i++) {
    const cout = c.ch * c.chMult[i];
    for (let j = 0; j < c.numResBlocks; j++) {
      resnet(`encoder.down.${i}.block.${j}`, cin, cout);
      cin = cout;
    }
    if (i !== L - 1) conv(`encoder.down.${i}.downsample.conv`, cin, cin, 3);
  }
  resnet('encoder.mid.block_1', cin, cin);
  attn('encoder.mid.attn_1', cin);
  resnet('encoder.mid.block_2', cin, cin);
  norm('encoder.norm_out', cin);
  conv('encoder.conv_out', 2 * c.zChannels, cin, 3);
  conv('encoder.quant_conv', 2 * c.zChannels, 2 * c.zChannels, 1);
  conv('decoder.post_quant_conv', c.zChannels, c.zChannels, 1);
  cin = c.ch * c.chMult[L - 1];
  conv('decoder.conv_in', cin, c.zChannels, 3);
  resnet('decoder.mid.block_1', cin, cin);
  attn('decoder.mid.attn_1', cin);
  resnet('decoder.mid.block_2', cin, cin);
  for (let i = L - 1; i >= 0; i--) {
    const cout = c.ch * c.chMult[i];
    for (let j = 0; j <= c.numResBlocks; j++) {
      resnet(`decoder.up.${i}.block.${j}`, cin, cout);
      cin = cout;
    }
    if (i !== 0) conv(`decoder.up.${i}.upsample.conv`, cin, cin, 3);
  }
  norm('decoder.norm_out', cin);
  conv('decoder.conv_out', c.outChannels, cin, 3);
  out.push(['bn.running_mean', [4 * c.zChannels]], ['bn.running_var', [4 * c.zChannels]]);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Graph building blocks. Activations are NCHW float32 between ops; with `half` (GPU devices in fp16, see
// flux2-vae-gpu.ts) the convolutions and attention projections compute in fp16 and every weight is in-memory.

class VaeGraph {
  readonly half?: VaeHalfGraph;

  constructor(
    readonly g: Graph,
    private readonly ckpt: Checkpoint,
    private readonly layout: VaeLayout,
    private readonly levels: number,
    fp16: boolean,
  ) {
    if (fp16) this.half = new VaeHalfGraph(g);
  }

  info(bflName: string): TensorInfo {
    return this.ckpt.info(vaeKey(bflName, this.layout, this.levels));
  }

  w(bflName: string): Value {
    return this.half ? this.half.f32(this.info(bflName)) : this.g.weight(this.info(bflName), COMPUTE);
  }

  conv(x: Value, name: string, opts: { stride?: number; pads?: number[] } = {}): Value {
    const wi = this.info(`${name}.weight`);
    const k = wi.shape[2];
    const pads = opts.pads ?? Array(4).fill((k - 1) / 2);
    const attrs = { kernel_shape: [k, k], strides: [opts.stride ?? 1, opts.stride ?? 1], pads };
    if (this.half) return this.half.conv(x, wi, this.info(`${name}.bias`), attrs, name);
    return this.g.op('Conv', [x, this.w(`${name}.weight`), this.w(`${name}.bias`)], { kernel_shape: [k, k], strides: [opts.stride ?? 1, opts.stride ?? 1], pads }, { hint: name });
  }

  /**
   * GroupNorm(32 groups, eps 1e-6, affine) as InstanceNormalization over [B, 32, C/32·H·W] plus the per-channel
   * affine. ORT has no CPU kernel for GroupNormalization-21 and expands its function body into ~12 full-tensor
   * passes (casts, two ReduceMeans, …); InstanceNormalization is one native kernel and the reshapes are aliases
   * (measured on a 256² decode: 66 s vs 79 s best of 4, on a heavily shared machine).
   */
  norm(x: Value, name: string): Value {
    const g = this.g;
    const grouped = g.op('Reshape', [x, g.constI64([0, VAE_GROUPS, -1])]);
    const ones = g.constF32(new Float32Array(VAE_GROUPS).fill(1), [VAE_GROUPS], 'ones');
    const zeros = g.constF32(new Float32Array(VAE_GROUPS), [VAE_GROUPS], 'zeros');
    const normed = g.op('InstanceNormalization', [grouped, ones, zeros], { epsilon: { float: VAE_NORM_EPS } }, { hint: `${name}.groupnorm` });
    const shape = g.constI64([-1, 1, 1]);
    const scale = g.op('Reshape', [this.w(`${name}.weight`), shape]);
    const bias = g.op('Reshape', [this.w(`${name}.bias`), shape]);
    return g.op('Add', [g.op('Mul', [g.op('Reshape', [normed, g.op('Shape', [x])]), scale]), bias], {}, { hint: name });
  }

  swish(x: Value): Value {
    return this.g.op('Mul', [x, this.g.op('Sigmoid', [x])], {}, { hint: 'swish' });
  }

  resnet(x: Value, name: string): Value {
    let h = this.conv(this.swish(this.norm(x, `${name}.norm1`)), `${name}.conv1`);
    h = this.conv(this.swish(this.norm(h, `${name}.norm2`)), `${name}.conv2`);
    const shortcut = this.ckpt.has(vaeKey(`${name}.nin_shortcut.weight`, this.layout, this.levels)) ? this.conv(x, `${name}.nin_shortcut`) : x;
    return this.g.op('Add', [shortcut, h], {}, { hint: `${name}.out` });
  }

  /** A 1×1 conv applied to tokens [B, N, C]: both layouts' weights become a [C, C] matrix (conv [C,C,1,1] reshaped). */
  private tokenLinear(x: Value, name: string): Value {
    const wi = this.info(`${name}.weight`);
    if (this.half) return this.half.linear(x, wi, this.info(`${name}.bias`), name);
    let w = this.w(`${name}.weight`);
    if (wi.shape.length === 4) w = this.g.op('Reshape', [w, this.g.constI64([wi.shape[0], wi.shape[1]])]);
    const y = this.g.op('MatMul', [x, this.g.op('Transpose', [w], { perm: [1, 0] })]);
    return this.g.op('Add', [y, this.w(`${name}.bias`)], {}, { hint: name });
  }

  /**
   * Single-head self-attention over all H·W positions. ORT's MultiHeadAttention contrib op runs a flash-style
   * kernel on CPU (measured: 16 384 positions in 0.34 GB RSS instead of a 1 GiB score matrix), which is what lets
   * 2048² images through the mid block (65 536 positions: a 16 GiB score matrix otherwise).
   */
  attn(x: Value, name: string): Value {
    const g = this.g;
    const h = this.norm(x, `${name}.norm`);
    const tokens = g.op('Transpose', [g.op('Reshape', [h, g.constI64([0, 0, -1])])], { perm: [0, 2, 1] }, { hint: 'tokens' });
    const q = this.tokenLinear(tokens, `${name}.q`);
    const k = this.tokenLinear(tokens, `${name}.k`);
    const v = this.tokenLinear(tokens, `${name}.v`);
    const o = g.op('MultiHeadAttention', [q, k, v], { num_heads: 1 }, { domain: MS_DOMAIN, hint: `${name}.sdpa` });
    const p = this.tokenLinear(o, `${name}.proj_out`);
    const back = g.op('Reshape', [g.op('Transpose', [p], { perm: [0, 2, 1] }), g.op('Shape', [x])]);
    return g.op('Add', [x, back], {}, { hint: `${name}.out` });
  }

  /** BatchNorm statistics as [1, 128, 1, 1] mean and std = sqrt(var + 1e-4) (constant-folded by ORT). */
  bnStats(): { mean: Value; std: Value } {
    const g = this.g;
    const shape = g.constI64([1, -1, 1, 1]);
    const mean = g.op('Reshape', [this.w('bn.running_mean'), shape]);
    const std = g.op('Reshape', [g.op('Sqrt', [g.op('Add', [this.w('bn.running_var'), g.scalarF32(VAE_BN_EPS)])]), shape]);
    return { mean, std };
  }
}

function open(ckpt: Checkpoint, layout: VaeLayout, config: Flux2VaeConfig, name: string, fp16: boolean): VaeGraph {
  return new VaeGraph(new Graph(name), ckpt, layout, config.chMult.length, fp16);
}

/** A built graph, and for an fp16 graph the builder of its in-memory weights' bytes. */
export interface VaeGraphBuild {
  graph: Graph;
  half?: VaeHalfGraph;
}

/**
 * Encoder graph: `image` [B, 3, H, W] in [-1, 1] (H, W multiples of 16) → `latent` [B, 128, H/16, W/16]
 * (posterior mean, patchified, BatchNorm-normalised) and `moments` [B, 2z, H/8, W/8] (encoder output after
 * quant_conv, for conformance).
 */
export function buildVaeEncoder(ckpt: Checkpoint, layout: VaeLayout, config: Flux2VaeConfig, opts: { fp16?: boolean } = {}): VaeGraphBuild {
  const v = open(ckpt, layout, config, 'flux2_vae_encoder', opts.fp16 ?? false);
  const g = v.g;
  const L = config.chMult.length;
  let h = v.conv(g.input('image', 'float32', ['batch', config.inChannels, 'height', 'width']), 'encoder.conv_in');
  for (let i = 0; i < L; i++) {
    for (let j = 0; j < config.numResBlocks; j++) h = g.within(`down.${i}`, () => v.resnet(h, `encoder.down.${i}.block.${j}`));
    // Downsample: zero-pad right and bottom by one, 3×3 stride-2 conv (expressed as Conv's asymmetric pads)
    if (i !== L - 1) h = v.conv(h, `encoder.down.${i}.downsample.conv`, { stride: 2, pads: [0, 0, 1, 1] });
  }
  h = v.resnet(h, 'encoder.mid.block_1');
  h = v.attn(h, 'encoder.mid.attn_1');
  h = v.resnet(h, 'encoder.mid.block_2');
  h = v.conv(v.swish(v.norm(h, 'encoder.norm_out')), 'encoder.conv_out');
  const moments = v.conv(h, 'encoder.quant_conv');
  g.output(moments, 'moments', 'float32', ['batch', 2 * config.zChannels, 'h8', 'w8']);
  const zc = config.zChannels;
  const mean = g.op('Slice', [moments, g.constI64([0]), g.constI64([zc]), g.constI64([1])], {}, { hint: 'posterior_mean' });
  // 2×2 patchify with channel index c·4 + pi·2 + pj: SpaceToDepth orders channels (pi·2 + pj)·C + c, so a channel
  // gather reorders them.
  const s2d = g.op('SpaceToDepth', [mean], { blocksize: 2 });
  const perm = Array.from({ length: 4 * zc }, (_, k) => (k % 4) * zc + Math.floor(k / 4));
  const patched = g.op('Gather', [s2d, g.constI64(perm)], { axis: 1 }, { hint: 'patchify' });
  const { mean: bnMean, std } = v.bnStats();
  const latent = g.op('Div', [g.op('Sub', [patched, bnMean]), std], {}, { hint: 'bn_normalize' });
  g.output(latent, 'latent', 'float32', ['batch', 4 * zc, 'h16', 'w16']);
  return { graph: g, half: v.half };
}

/** Decoder graph: `latent` [B, 128, h, w] (normalised) → `image` [B, 3, 16h, 16w], not clamped. */
export function buildVaeDecoder(ckpt: Checkpoint, layout: VaeLayout, config: Flux2VaeConfig, opts: { fp16?: boolean } = {}): VaeGraphBuild {
  const v = open(ckpt, layout, config, 'flux2_vae_decoder', opts.fp16 ?? false);
  const g = v.g;
  const L = config.chMult.length;
  const z = g.input('latent', 'float32', ['batch', 4 * config.zChannels, 'h16', 'w16']);
  const { mean, std } = v.bnStats();
  const denorm = g.op('Add', [g.op('Mul', [z, std]), mean], {}, { hint: 'bn_denormalize' });
  // DepthToSpace in CRD mode reads channel c·4 + pi·2 + pj into pixel (2i + pi, 2j + pj): exactly the unpatchify.
  let h = g.op('DepthToSpace', [denorm], { blocksize: 2, mode: 'CRD' }, { hint: 'unpatchify' });
  h = v.conv(h, 'decoder.post_quant_conv');
  h = v.conv(h, 'decoder.conv_in');
  h = v.resnet(h, 'decoder.mid.block_1');
  h = v.attn(h, 'decoder.mid.attn_1');
  h = v.resnet(h, 'decoder.mid.block_2');
  for (let i = L - 1; i >= 0; i--) {
    for (let j = 0; j <= config.numResBlocks; j++) h = g.within(`up.${i}`, () => v.resnet(h, `decoder.up.${i}.block.${j}`));
    if (i !== 0) {
      // nearest ×2 (torch `interpolate(scale_factor=2, mode="nearest")` = asymmetric/floor), then 3×3 conv
      const up = g.op('Resize', [h, null, g.constF32([1, 1, 2, 2])], { mode: 'nearest', coordinate_transformation_mode: 'asymmetric', nearest_mode: 'floor' }, { hint: 'upsample' });
      h = v.conv(up, `decoder.up.${i}.upsample.conv`);
    }
  }
  h = v.conv(v.swish(v.norm(h, 'decoder.norm_out')), 'decoder.conv_out');
  g.output(h, 'image', 'float32', ['batch', config.outChannels, 'height', 'width']);
  return { graph: g, half: v.half };
}

// ---------------------------------------------------------------------------------------------------------------
// Runtime API

export interface VaeLoadOptions extends SessionConfig {
  /** Build/open only one direction (the text-to-image path never encodes). Default: both, opened lazily. */
  only?: 'encoder' | 'decoder';
}

export interface DecodeOptions {
  /**
   * Tiled decoding: the latent is cut into overlapping tiles of at most `maxTile` tokens per side (overlap at
   * least `overlap` tokens), each decoded alone and blended linearly. `'auto'` (default) tiles only outputs above
   * AUTO_TILE_ABOVE_PIXELS, where the untiled decoder's full-resolution activations (128–256 channels × H × W ×
   * 4 bytes each, several alive at once) would no longer fit comfortably in memory.
   */
  tiling?: 'auto' | 'always' | 'never';
  maxTile?: number;
  overlap?: number;
  /** Called after each tile with (done, total). */
  onTile?: (done: number, total: number) => void;
}

/**
 * Above this many output pixels the decoder tiles by default. Untiled, the peak is set by the last upsample: three
 * or four live 256-channel fp32 tensors at full resolution, ≈ 4 GiB per MP (≈ 16 GiB at 2048², too much beside
 * the other engineers' processes and the transformer's weights); tiles of ≤ 1536² stay under ≈ 10 GiB.
 * docs/benchmarks.md has the measured peaks.
 */
export const AUTO_TILE_ABOVE_PIXELS = 1536 * 1536;
/** Default largest tile side in latent tokens (96 tokens = 1536 px). */
export const DEFAULT_MAX_TILE = 96;
/**
 * Default least overlap between tiles in latent tokens (16 tokens = 256 px). Measured on the tiny golden VAE at
 * 512²: mean |Δ| vs untiled 0.0215 with 128 px, 0.0116 with 256 px (image range ±2.6); 2048² then costs 4 tiles of
 * 1152² (1.27× the untiled pixels) instead of 4 of 1088² (1.13×).
 */
export const DEFAULT_TILE_OVERLAP = 16;

export interface EncodeResult {
  latent: Float32Array;
  /** [B, 128, H/16, W/16] */
  dims: number[];
  moments?: Float32Array;
  momentsDims?: number[];
}

/** Finds the VAE weights: a .safetensors file, a folder holding one (`vae/`, or `ae.safetensors` in a model folder). */
export function resolveVaePath(p: string): string {
  const abs = path.resolve(p);
  if (!fs.existsSync(abs)) throw new Error(`VAE weights not found: ${abs}`);
  if (fs.statSync(abs).isFile()) return abs;
  for (const c of ['ae.safetensors', 'flux2-vae.safetensors', 'vae/diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.safetensors', 'vae']) {
    const f = path.join(abs, c);
    if (fs.existsSync(f)) return c === 'vae' ? resolveVaePath(f) : f;
  }
  return abs; // a folder of shards: Checkpoint.open handles it
}

export class Flux2VAE {
  private encoderSession?: ort.InferenceSession;
  private decoderSession?: ort.InferenceSession;
  /** The device the sessions run on. */
  device: Device = 'cpu';
  /**
   * What the convolutions and attention projections compute in: fp32 on the CPU; on a GPU device
   * `resolveComputeDtype` (fp16 unless asked otherwise). fp32 on a GPU runs the CPU's graph on the device.
   */
  computeDtype: ComputeDtype = 'fp32';
  private readonly overflows = { encoder: 0, decoder: 0 };

  private constructor(
    readonly ckpt: Checkpoint,
    readonly layout: VaeLayout,
    readonly config: Flux2VaeConfig,
    private readonly opts: VaeLoadOptions,
  ) {}

  /** Opens the checkpoint (BFL or diffusers layout, detected) and compiles the graphs it needs. */
  static async load(pathOrFolder: string, opts: VaeLoadOptions = {}): Promise<Flux2VAE> {
    const ckpt = Checkpoint.open(resolveVaePath(pathOrFolder));
    const layout = detectVaeLayout(ckpt);
    const config = inferVaeConfig(ckpt, layout);
    const missing = vaeTensorShapes(config)
      .map(([n]) => vaeKey(n, layout, config.chMult.length))
      .filter((n) => !ckpt.has(n));
    if (missing.length) throw new Error(`VAE checkpoint (${layout} layout) lacks ${missing.length} tensors, e.g. ${missing.slice(0, 3).join(', ')}`);
    const vae = new Flux2VAE(ckpt, layout, config, opts);
    vae.device = await resolveDevice(opts.device ?? defaultDevice());
    vae.computeDtype = resolveComputeDtype(vae.device, opts.gpuDtype);
    if (opts.only !== 'decoder') await vae.encoder();
    if (opts.only !== 'encoder') await vae.decoder();
    return vae;
  }

  /** Weight values beyond fp16's range, clamped to ±65504 when the open sessions' weights were converted (fp16 only). */
  get fp16Overflows(): number {
    return this.overflows.encoder + this.overflows.decoder;
  }

  private get weightFiles(): string[] {
    return this.ckpt.files.map((f) => f.file);
  }

  private async encoder(): Promise<ort.InferenceSession> {
    this.encoderSession ??= await this.openGraph('encoder', buildVaeEncoder);
    return this.encoderSession;
  }

  private async decoder(): Promise<ort.InferenceSession> {
    this.decoderSession ??= await this.openGraph('decoder', buildVaeDecoder);
    return this.decoderSession;
  }

  /**
   * fp32: the graph reads the checkpoint in place (the CPU's graph and cache key, also on a GPU in fp32). fp16: its
   * own graph and key, every weight converted in JS and handed over in memory (flux2-vae-gpu.ts); the graph is
   * built even when cached, since it lists the weights whose bytes the session needs.
   */
  private async openGraph(direction: 'encoder' | 'decoder', build: typeof buildVaeEncoder): Promise<ort.InferenceSession> {
    const name = `vae-${direction}`;
    const key = { config: this.config, layout: this.layout, v: VAE_GRAPH_VERSION };
    const session = { lowMemory: true, ...this.opts, device: this.device };
    if (this.computeDtype === 'fp32') return (await loadGraph(name, key, this.weightFiles, () => build(this.ckpt, this.layout, this.config).graph, session)).session;
    const built = build(this.ckpt, this.layout, this.config, { fp16: true });
    const stats = { fp16Overflows: 0 };
    const externalData = built.half!.externalData(stats);
    this.overflows[direction] = stats.fp16Overflows;
    return (await loadGraph(name, { ...key, gpu: `gpu-${this.computeDtype}` }, this.weightFiles, () => built.graph, { ...session, externalData })).session;
  }

  /** Pixels per latent token side: 2^(levels − 1) from the downsamplers × 2 from the patch (16 for FLUX.2). */
  get scale(): number {
    return 2 ** (this.config.chMult.length - 1) * 2;
  }

  /** BatchNorm running statistics (for pure-TS latent conversions). */
  bnStats(): { mean: Float32Array; var: Float32Array } {
    return { mean: readFloat32(this.ckpt.info('bn.running_mean')), var: readFloat32(this.ckpt.info('bn.running_var')) };
  }

  /** `image` NCHW in [-1, 1], H and W multiples of 16 → normalised patchified latent [B, 128, H/16, W/16]. */
  async encode(image: Float32Array, dims: readonly number[], opts: { withMoments?: boolean } = {}): Promise<EncodeResult> {
    const [b, c, hh, ww] = dims;
    if (dims.length !== 4 || c !== this.config.inChannels) throw new Error(`VAE encode expects [B, ${this.config.inChannels}, H, W], got [${dims.join(', ')}]`);
    if (hh % this.scale || ww % this.scale || hh === 0 || ww === 0) throw new Error(`VAE encode needs H and W to be positive multiples of ${this.scale}, got ${hh}×${ww}`);
    if (image.length !== b * c * hh * ww) throw new Error(`image has ${image.length} values, dims [${dims.join(', ')}] need ${b * c * hh * ww}`);
    const s = await this.encoder();
    const r = await s.run({ image: f32(image, dims) });
    const out: EncodeResult = { latent: r.latent.data as Float32Array, dims: r.latent.dims as number[] };
    this.checkFinite(out.latent, 'encoder');
    if (opts.withMoments) {
      out.moments = this.checkFinite(r.moments.data as Float32Array, 'encoder');
      out.momentsDims = r.moments.dims as number[];
    }
    return out;
  }

  /** Normalised latent [B, 128, h, w] → image [B, 3, 16h, 16w] (unclamped), tiled for large sizes. */
  async decode(latent: Float32Array, dims: readonly number[], opts: DecodeOptions = {}): Promise<{ image: Float32Array; dims: number[] }> {
    const [b, c, h, w] = dims;
    if (dims.length !== 4 || c !== 4 * this.config.zChannels) throw new Error(`VAE decode expects [B, ${4 * this.config.zChannels}, h, w], got [${dims.join(', ')}]`);
    if (latent.length !== b * c * h * w) throw new Error(`latent has ${latent.length} values, dims [${dims.join(', ')}] need ${b * c * h * w}`);
    const maxTile = opts.maxTile ?? DEFAULT_MAX_TILE;
    const overlap = opts.overlap ?? DEFAULT_TILE_OVERLAP;
    const tiling = opts.tiling ?? 'auto';
    const big = h * w * this.scale * this.scale > AUTO_TILE_ABOVE_PIXELS;
    if (tiling === 'never' || (tiling === 'auto' && !big) || (h <= maxTile && w <= maxTile)) {
      const s = await this.decoder();
      const r = await s.run({ latent: f32(latent, dims) });
      opts.onTile?.(1, 1);
      return { image: this.checkFinite(r.image.data as Float32Array, 'decoder'), dims: r.image.dims as number[] };
    }
    return decodeTiled((lat, d) => this.decodeUntiled(lat, d), latent, dims, { maxTile, overlap, scale: this.scale, outChannels: this.config.outChannels, onTile: opts.onTile });
  }

  private async decodeUntiled(latent: Float32Array, dims: number[]): Promise<Float32Array> {
    const s = await this.decoder();
    const r = await s.run({ latent: f32(latent, dims) });
    return this.checkFinite(r.image.data as Float32Array, 'decoder');
  }

  /**
   * fp16: the inputs of conv_in, the shortcut and upsample convs are the un-normalised residual stream, so an
   * overflow is possible (see throwIfOverflowed). The scan costs a few ms per megapixel.
   */
  private checkFinite(out: Float32Array, direction: 'encoder' | 'decoder'): Float32Array {
    return this.computeDtype === 'fp16' ? throwIfOverflowed(out, `flux2 VAE: the fp16 ${direction}`) : out;
  }

  async close(): Promise<void> {
    await this.encoderSession?.release();
    await this.decoderSession?.release();
    this.encoderSession = this.decoderSession = undefined;
  }
}

/**
 * Tiles covering [0, n): as few as possible of at most `maxTile` cells, overlapping by at least `overlap`, all the
 * same size and evenly spread (so no tile is a thin sliver with poor GroupNorm statistics).
 */
export function planTiles(n: number, maxTile: number, overlap: number): { starts: number[]; size: number } {
  if (n <= maxTile) return { starts: [0], size: n };
  if (overlap >= maxTile) throw new Error(`tile overlap ${overlap} must be smaller than the largest tile ${maxTile}`);
  const count = Math.ceil((n - overlap) / (maxTile - overlap));
  const size = Math.ceil((n + (count - 1) * overlap) / count);
  const stride = (n - size) / (count - 1);
  return { starts: Array.from({ length: count }, (_, i) => Math.round(i * stride)), size };
}

/**
 * Decodes latent tiles separately and blends them: in each overlap the weights ramp linearly from one tile to the
 * next, so seams fade rather than cut. Tiles see only their own GroupNorm statistics and attention context, so the
 * result differs slightly from the untiled decode (measured in the bench / tests).
 */
export async function decodeTiled(
  run: (latent: Float32Array, dims: number[]) => Promise<Float32Array>,
  latent: Float32Array,
  dims: readonly number[],
  o: { maxTile: number; overlap: number; scale: number; outChannels: number; onTile?: (done: number, total: number) => void },
): Promise<{ image: Float32Array; dims: number[] }> {
  const [B, C, h, w] = dims;
  const S = o.scale;
  const H = h * S;
  const W = w * S;
  const out = new Float32Array(B * o.outChannels * H * W);
  const weight = new Float32Array(H * W);
  const py = planTiles(h, o.maxTile, o.overlap);
  const px = planTiles(w, o.maxTile, o.overlap);
  const ys = py.starts;
  const xs = px.starts;
  const total = ys.length * xs.length;
  let done = 0;
  for (const y0 of ys) {
    for (const x0 of xs) {
      const th = py.size;
      const tw = px.size;
      const part = new Float32Array(B * C * th * tw);
      for (let b = 0; b < B; b++)
        for (let c = 0; c < C; c++)
          for (let y = 0; y < th; y++) {
            const src = ((b * C + c) * h + y0 + y) * w + x0;
            part.set(latent.subarray(src, src + tw), ((b * C + c) * th + y) * tw);
          }
      const img = await run(part, [B, C, th, tw]);
      const PH = th * S;
      const PW = tw * S;
      // linear cross-fades over the exact overlap with each neighbour: the two weights sum to 1 there
      const ramp = (i: number, n: number, before: number, after: number) => {
        let f = 1;
        if (before > 0) f = Math.min(f, (i + 0.5) / before);
        if (after > 0) f = Math.min(f, (n - i - 0.5) / after);
        return f;
      };
      const yi = ys.indexOf(y0);
      const xi = xs.indexOf(x0);
      const ovBefore = (starts: number[], k: number, size: number) => (k > 0 ? (starts[k - 1] + size - starts[k]) * S : 0);
      const ovAfter = (starts: number[], k: number, size: number) => (k < starts.length - 1 ? (starts[k] + size - starts[k + 1]) * S : 0);
      const wy = Float32Array.from({ length: PH }, (_, i) => ramp(i, PH, ovBefore(ys, yi, th), ovAfter(ys, yi, th)));
      const wx = Float32Array.from({ length: PW }, (_, i) => ramp(i, PW, ovBefore(xs, xi, tw), ovAfter(xs, xi, tw)));
      for (let y = 0; y < PH; y++) {
        const Y = y0 * S + y;
        for (let x = 0; x < PW; x++) weight[Y * W + x0 * S + x] += wy[y] * wx[x];
      }
      for (let b = 0; b < B; b++)
        for (let c = 0; c < o.outChannels; c++)
          for (let y = 0; y < PH; y++) {
            const Y = y0 * S + y;
            const dst = ((b * o.outChannels + c) * H + Y) * W + x0 * S;
            const src = ((b * o.outChannels + c) * PH + y) * PW;
            for (let x = 0; x < PW; x++) out[dst + x] += img[src + x] * wy[y] * wx[x];
          }
      o.onTile?.(++done, total);
    }
  }
  for (let b = 0; b < B; b++)
    for (let c = 0; c < o.outChannels; c++) {
      const base = (b * o.outChannels + c) * H * W;
      for (let i = 0; i < H * W; i++) out[base + i] /= weight[i];
    }
  return { image: out, dims: [B, o.outChannels, H, W] };
}

// ---------------------------------------------------------------------------------------------------------------
// Random checkpoints of any config (benchmarks, tiny test models)

/** Mulberry32: a small seeded PRNG, so random checkpoints are reproducible. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Writes a random-weight VAE of `config` in the BFL or diffusers layout. Conv weights are scaled like PyTorch's
 * default init (uniform ±1/√fan_in) so activations stay O(1) through the network; norms start at weight 1, bias 0;
 * BN statistics are plausible (mean ≈ 0, var ≈ 1).
 */
export function writeRandomVaeCheckpoint(file: string, config: Flux2VaeConfig = FLUX2_VAE_CONFIG, opts: { layout?: VaeLayout; seed?: number; dtype?: 'F32' | 'BF16' } = {}): void {
  const layout = opts.layout ?? 'bfl';
  const rand = rng(opts.seed ?? 0);
  const tensors: Record<string, TensorToWrite> = {};
  const shapes = new Map(vaeTensorShapes(config));
  for (const [name, shape0] of shapes) {
    let shape = shape0;
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    if (name === 'bn.running_var') data.forEach((_, i) => (data[i] = 0.5 + rand()));
    else if (name === 'bn.running_mean') data.forEach((_, i) => (data[i] = (rand() - 0.5) * 0.2));
    else if (/norm\d?\.weight$|norm_out\.weight$/.test(name)) data.fill(1);
    else if (/norm\d?\.bias$|norm_out\.bias$/.test(name)) data.fill(0);
    else {
      const ws = shapes.get(name.replace(/bias$/, 'weight'))!;
      const fanIn = ws[1] * ws[2] * ws[3];
      const bound = 1 / Math.sqrt(fanIn);
      for (let i = 0; i < n; i++) data[i] = (rand() * 2 - 1) * bound;
    }
    const key = vaeKey(name, layout, config.chMult.length);
    if (layout === 'diffusers' && /mid\.attn_1\.(q|k|v|proj_out)\.weight$/.test(name)) shape = [shape[0], shape[1]];
    tensors[key] = opts.dtype === 'BF16' ? { dtype: 'BF16', shape, data: f32ToBf16(data) } : { dtype: 'F32', shape, data };
  }
  writeSafetensors(file, tensors, { format: 'pt', klein_random: 'flux2-vae' });
}
