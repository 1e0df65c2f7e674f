// FLUX.2 VAE checkpoints come in two key layouts: BFL `ae.safetensors` (and the golden `vae/model.safetensors`) and
// diffusers `vae/diffusion_pytorch_model.safetensors`, where resnets and samplers are renamed, the quant convs sit
// at the top level, the decoder's levels are numbered the other way round and the attention's 1×1 convolutions are
// stored as [C, C] matrices. The model is written against BFL names; `VaeWeights` maps each to the stored tensor.
import fs from 'node:fs';
import path from 'node:path';
import { Checkpoint, type TensorInfo } from '../../weights/safetensors.ts';
import type { ModelWeights } from '../../graph/nn/layers.ts';
import { FLUX2_VAE_CONFIG, type Flux2VaeConfig } from './config.ts';

export type VaeLayout = 'bfl' | 'diffusers';

/** Raised for a file that is not a FLUX.2 VAE or lacks some of its weights. */
export class VaeCheckpointError extends Error {
  override name = 'VaeCheckpointError';
}

const ATTENTION_NAMES: Record<string, string> = { norm: 'group_norm', q: 'to_q', k: 'to_k', v: 'to_v', proj_out: 'to_out.0' };

/**
 * The diffusers name of a BFL VAE tensor (DF `convert_flux2_to_diffusers.py`): resnets and samplers renamed, the
 * quant convs moved to the top level, and the decoder's levels numbered the other way round.
 */
export function vaeKey(bflName: string, layout: VaeLayout, levels = FLUX2_VAE_CONFIG.chMult.length): string {
  if (layout === 'bfl') return bflName;
  if (bflName.startsWith('encoder.quant_conv.') || bflName.startsWith('decoder.post_quant_conv.')) return bflName.slice(bflName.indexOf('.') + 1);
  const n = bflName.replace(/\.norm_out\./, '.conv_norm_out.').replace(/\.nin_shortcut\./, '.conv_shortcut.');
  let m: RegExpMatchArray | null;
  if ((m = n.match(/^encoder\.down\.(\d+)\.block\.(\d+)\.(.*)$/))) return `encoder.down_blocks.${m[1]}.resnets.${m[2]}.${m[3]}`;
  if ((m = n.match(/^encoder\.down\.(\d+)\.downsample\.conv\.(.*)$/))) return `encoder.down_blocks.${m[1]}.downsamplers.0.conv.${m[2]}`;
  if ((m = n.match(/^decoder\.up\.(\d+)\.block\.(\d+)\.(.*)$/))) return `decoder.up_blocks.${levels - 1 - Number(m[1])}.resnets.${m[2]}.${m[3]}`;
  if ((m = n.match(/^decoder\.up\.(\d+)\.upsample\.conv\.(.*)$/))) return `decoder.up_blocks.${levels - 1 - Number(m[1])}.upsamplers.0.conv.${m[2]}`;
  if ((m = n.match(/^(encoder|decoder)\.mid\.block_([12])\.(.*)$/))) return `${m[1]}.mid_block.resnets.${Number(m[2]) - 1}.${m[3]}`;
  if ((m = n.match(/^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)$/))) return `${m[1]}.mid_block.attentions.0.${ATTENTION_NAMES[m[2]]}.${m[3]}`;
  return n;
}

/** Which key layout a VAE checkpoint uses. */
export function detectVaeLayout(ckpt: Checkpoint): VaeLayout {
  if (ckpt.has('encoder.down.0.block.0.conv1.weight') || ckpt.has('decoder.up.0.block.0.conv1.weight')) return 'bfl';
  if (ckpt.has('encoder.down_blocks.0.resnets.0.conv1.weight') || ckpt.has('decoder.up_blocks.0.resnets.0.conv1.weight')) return 'diffusers';
  throw new VaeCheckpointError(`${ckpt.files.map((f) => f.file).join(', ')}: not a FLUX.2 VAE checkpoint (neither BFL "encoder.down.0.block.0…" nor diffusers "encoder.down_blocks.0.resnets.0…" keys found)`);
}

/** Reads the architecture from the tensor shapes, so the tiny golden VAE and the real one load the same way. */
export function inferVaeConfig(ckpt: Checkpoint, layout: VaeLayout): Flux2VaeConfig {
  const levelKey = (i: number) => (layout === 'bfl' ? `encoder.down.${i}.block.0.conv1.weight` : `encoder.down_blocks.${i}.resnets.0.conv1.weight`);
  let levels = 0;
  while (ckpt.has(levelKey(levels))) levels++;
  if (levels === 0) throw new VaeCheckpointError(`${ckpt.files[0].file}: VAE checkpoint has no encoder levels`);
  const shape = (n: string) => ckpt.info(vaeKey(n, layout, levels)).shape;
  const ch = shape('encoder.conv_in.weight')[0];
  let numResBlocks = 0;
  while (ckpt.has(vaeKey(`encoder.down.0.block.${numResBlocks}.conv1.weight`, layout, levels))) numResBlocks++;
  return {
    inChannels: shape('encoder.conv_in.weight')[1],
    outChannels: shape('decoder.conv_out.weight')[0],
    ch,
    chMult: Array.from({ length: levels }, (_, i) => shape(`encoder.down.${i}.block.0.conv1.weight`)[0] / ch),
    numResBlocks,
    zChannels: shape('decoder.conv_in.weight')[1],
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
  const mid = (n: string, ch: number) => {
    resnet(`${n}.block_1`, ch, ch);
    norm(`${n}.attn_1.norm`, ch);
    for (const p of ['q', 'k', 'v', 'proj_out']) conv(`${n}.attn_1.${p}`, ch, ch, 1);
    resnet(`${n}.block_2`, ch, ch);
  };
  const L = c.chMult.length;
  conv('encoder.conv_in', c.ch, c.inChannels, 3);
  let cin = c.ch;
  for (let i = 0; i < L; i++) {
    for (let j = 0; j < c.numResBlocks; j++, cin = c.ch * c.chMult[i]) resnet(`encoder.down.${i}.block.${j}`, cin, c.ch * c.chMult[i]);
    if (i !== L - 1) conv(`encoder.down.${i}.downsample.conv`, cin, cin, 3);
  }
  mid('encoder.mid', cin);
  norm('encoder.norm_out', cin);
  conv('encoder.conv_out', 2 * c.zChannels, cin, 3);
  conv('encoder.quant_conv', 2 * c.zChannels, 2 * c.zChannels, 1);
  conv('decoder.post_quant_conv', c.zChannels, c.zChannels, 1);
  cin = c.ch * c.chMult[L - 1];
  conv('decoder.conv_in', cin, c.zChannels, 3);
  mid('decoder.mid', cin);
  for (let i = L - 1; i >= 0; i--) {
    for (let j = 0; j <= c.numResBlocks; j++, cin = c.ch * c.chMult[i]) resnet(`decoder.up.${i}.block.${j}`, cin, c.ch * c.chMult[i]);
    if (i !== 0) conv(`decoder.up.${i}.upsample.conv`, cin, cin, 3);
  }
  norm('decoder.norm_out', cin);
  conv('decoder.conv_out', c.outChannels, cin, 3);
  out.push(['bn.running_mean', [4 * c.zChannels]], ['bn.running_var', [4 * c.zChannels]]);
  return out;
}

/** The attention's 1×1 projections: diffusers stores them as [C, C], BFL as [C, C, 1, 1]. */
export function isAttentionProjection(bflName: string): boolean {
  return /\.mid\.attn_1\.(q|k|v|proj_out)\.weight$/.test(bflName);
}

/** The weights of one FLUX.2 VAE checkpoint, addressed by BFL name. */
export class VaeWeights implements ModelWeights {
  constructor(readonly checkpoint: Checkpoint, readonly layout: VaeLayout, readonly config: Flux2VaeConfig) {}

  stored(bfl: string): string {
    return vaeKey(bfl, this.layout, this.config.chMult.length);
  }

  has(bfl: string): boolean {
    return this.checkpoint.has(this.stored(bfl));
  }

  parts(bfl: string): TensorInfo[] {
    return [this.checkpoint.info(this.stored(bfl))];
  }

  get files(): string[] {
    return this.checkpoint.files.map((f) => f.file);
  }

  /** Checks that every weight the config needs exists, is a float tensor and has its shape. */
  validate(): void {
    const expected = vaeTensorShapes(this.config);
    const missing = expected.filter(([n]) => !this.has(n)).map(([n]) => this.stored(n));
    if (missing.length) throw new VaeCheckpointError(`${this.describe()} lacks ${missing.length} tensor(s), e.g. ${missing.slice(0, 3).join(', ')}`);
    for (const [name, shape] of expected) {
      const t = this.checkpoint.info(this.stored(name));
      const want = this.layout === 'diffusers' && isAttentionProjection(name) ? shape.slice(0, 2) : shape;
      if (JSON.stringify(t.shape) !== JSON.stringify(want)) throw new VaeCheckpointError(`${this.describe()}: ${t.name} has shape ${JSON.stringify(t.shape)}, expected ${JSON.stringify(want)}`);
      if (!['F32', 'BF16', 'F16'].includes(t.dtype)) throw new VaeCheckpointError(`${this.describe()}: ${t.name} has dtype ${t.dtype}; expected F32, BF16 or F16`);
    }
  }

  describe(): string {
    return `FLUX.2 VAE checkpoint ${this.files.length === 1 ? this.files[0] : path.dirname(this.files[0])} (${this.layout} layout)`;
  }
}

/** Finds the VAE weights: a .safetensors file, a folder holding one (`vae/`, or `ae.safetensors` in a model folder). */
export function locateVae(p: string): string {
  const abs = path.resolve(p);
  if (!fs.existsSync(abs)) throw new VaeCheckpointError(`VAE weights not found: ${abs}`);
  if (fs.statSync(abs).isFile()) return abs;
  for (const c of ['ae.safetensors', 'flux2-vae.safetensors', 'vae/diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.safetensors', 'vae']) {
    const f = path.join(abs, c);
    if (fs.existsSync(f)) return c === 'vae' ? locateVae(f) : f;
  }
  return abs; // a folder of shards: Checkpoint.open handles it
}

/** Opens a FLUX.2 VAE checkpoint in either layout, reads its config off the shapes and checks every weight. */
export function openVaeCheckpoint(p: string): VaeWeights {
  const ckpt = Checkpoint.open(locateVae(p));
  const layout = detectVaeLayout(ckpt);
  const w = new VaeWeights(ckpt, layout, inferVaeConfig(ckpt, layout));
  w.validate();
  return w;
}
