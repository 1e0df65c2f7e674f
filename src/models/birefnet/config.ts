// BiRefNet (github.com/ZhengPeng7/BiRefNet, MIT) hyperparameters. One forward serves every public checkpoint
// (general, matting, HR, lite, dynamic, RMBG-2.0): each width is read off the weight shapes (`inferBiRefNetConfig`),
// so the Swin-L, Swin-T and tiny test geometries all load without a variant switch.
import path from 'node:path';
import { UserError } from '../../errors.ts';

/** Geometry of a BiRefNet checkpoint. */
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

/** The published geometries, plus the tiny one of the golden vectors (`shared/golden/birefnet`). */
export const BIREFNET_CONFIGS = {
  /** BiRefNet, BiRefNet-matting, BiRefNet_HR(-matting), RMBG-2.0: Swin-L. */
  full: { embedDim: 192, depths: [2, 2, 18, 2], numHeads: [6, 12, 24, 48], windowSize: 12, asppPlanes: 256, decInter: 64, iptInter: 64, gdtChannels: 16 },
  /** BiRefNet_lite: Swin-T, same decoder. */
  lite: { embedDim: 96, depths: [2, 2, 6, 2], numHeads: [3, 6, 12, 24], windowSize: 7, asppPlanes: 256, decInter: 64, iptInter: 64, gdtChannels: 16 },
  /** The golden tiny config: the reference's hard-coded decoder widths shrunk, window 7. */
  tiny: { embedDim: 8, depths: [2, 2, 2, 2], numHeads: [2, 4, 8, 16], windowSize: 7, asppPlanes: 16, decInter: 8, iptInter: 8, gdtChannels: 16 },
} satisfies Record<string, BiRefNetConfig>;

export const LN_EPS = 1e-5;
export const BN_EPS = 1e-5;

/** Model input of the fixed-resolution checkpoints (HR variants: 2048). */
export const DEFAULT_INPUT_SIZE = 1024;

/**
 * The model input: a square side, `[height, width]`, or `'dynamic'` (the image's own size rounded to a multiple of
 * 32, for BiRefNet_dynamic).
 */
export type InputSize = number | [number, number] | 'dynamic';

/** A checkpoint that is not a BiRefNet (Swin) one, or an input the model cannot take. */
export class BiRefNetError extends UserError {
  override name = 'BiRefNetError';
}

/** What config inference reads: weight presence and shapes by canonical name. */
export interface ShapeSource {
  has(name: string): boolean;
  shape(name: string): number[];
}

/** Blocks and heads of each Swin stage, and the common window, from the relative-position tables. */
function swinStages(w: ShapeSource): Pick<BiRefNetConfig, 'depths' | 'numHeads' | 'windowSize'> {
  const depths: number[] = [];
  const numHeads: number[] = [];
  let windowSize = 0;
  for (let s = 0; w.has(`bb.layers.${s}.blocks.0.norm1.weight`); s++) {
    let d = 0;
    while (w.has(`bb.layers.${s}.blocks.${d}.norm1.weight`)) d++;
    depths.push(d);
    const table = w.shape(`bb.layers.${s}.blocks.0.attn.relative_position_bias_table`);
    numHeads.push(table[1]);
    const ws = (Math.sqrt(table[0]) + 1) / 2;
    if (!Number.isInteger(ws) || (windowSize && ws !== windowSize)) throw new BiRefNetError(`unexpected relative_position_bias_table shape ${JSON.stringify(table)} in stage ${s}`);
    windowSize = ws;
  }
  return { depths, numHeads, windowSize };
}

/** Reads the geometry off the weight shapes; throws a clear error for anything that is not a BiRefNet (Swin) checkpoint. */
export function inferBiRefNetConfig(w: ShapeSource): BiRefNetConfig {
  const embedDim = w.shape('bb.patch_embed.proj.weight')[0];
  const { depths, numHeads, windowSize } = swinStages(w);
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
    asppPlanes: w.shape('squeeze_module.0.dec_att.aspp1.atrous_conv.regular_conv.weight')[0],
    decInter: w.shape('squeeze_module.0.conv_in.weight')[0],
    iptInter: w.shape('decoder.ipt_blk5.conv1.weight')[0],
    gdtChannels: w.shape('decoder.gdt_convs_4.0.weight')[0],
  };
}

/** 'full' (Swin-L), 'lite' (Swin-T) or 'custom' (another geometry, e.g. the tiny test one). */
export type BiRefNetGeometry = 'full' | 'lite' | 'custom';

export function geometryOf(c: BiRefNetConfig): BiRefNetGeometry {
  if (c.embedDim === 192 && c.windowSize === 12) return 'full';
  if (c.embedDim === 96 && c.windowSize === 7) return 'lite';
  return 'custom';
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

/** `[height, width]` of a fixed input size, checked (Swin's patch grids need multiples of 32). */
export function fixedInputSize(s: number | [number, number]): [number, number] {
  const [h, w] = typeof s === 'number' ? [s, s] : s;
  if (!Number.isInteger(h) || !Number.isInteger(w) || h % 32 || w % 32 || h <= 0 || w <= 0) throw new BiRefNetError(`BiRefNet input size must be a positive multiple of 32, got ${w}×${h}`);
  return [h, w];
}
