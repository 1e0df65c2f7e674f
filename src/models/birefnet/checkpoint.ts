// BiRefNet checkpoints: the reference's state-dict layout (the HF `model.safetensors` files), read by key name.
// DataParallel (`module.`) and torch.compile (`_orig_mod.`) prefixes are stripped, as the reference
// `check_state_dict` does; nothing else is renamed.
import { Checkpoint, type TensorInfo } from '../../weights/safetensors.ts';
import type { ModelWeights } from '../../graph/nn/layers.ts';
import { BiRefNetError, inferBiRefNetConfig, type BiRefNetConfig, type ShapeSource } from './config.ts';

/** The checkpoint's tensors by reference key name. */
export class BiRefNetWeights implements ModelWeights, ShapeSource {
  private readonly byKey = new Map<string, TensorInfo>();

  constructor(readonly ckpt: Checkpoint) {
    for (const name of ckpt.names) this.byKey.set(name.replace(/^(module\.|_orig_mod\.)+/, ''), ckpt.info(name));
  }

  has(key: string): boolean {
    return this.byKey.has(key);
  }

  parts(key: string): TensorInfo[] {
    const t = this.byKey.get(key);
    if (!t) throw new BiRefNetError(`not a BiRefNet checkpoint (or an unsupported variant): tensor ${key} is missing in ${this.files.join(', ')}`);
    return [t];
  }

  shape(key: string): number[] {
    return this.parts(key)[0].shape;
  }

  get files(): string[] {
    return this.ckpt.files.map((f) => f.file);
  }
}

/** Opens a checkpoint (file, folder or sharded index) and reads its geometry; a foreign file is a BiRefNetError. */
export function openBiRefNetCheckpoint(folderOrFile: string): { weights: BiRefNetWeights; config: BiRefNetConfig } {
  let ckpt: Checkpoint;
  try {
    ckpt = Checkpoint.open(folderOrFile);
  } catch (e) {
    throw new BiRefNetError(`cannot open BiRefNet weights at ${folderOrFile}: ${(e as Error).message}`);
  }
  const weights = new BiRefNetWeights(ckpt);
  return { weights, config: inferBiRefNetConfig(weights) };
}

type Entry = [string, number[], 'F32' | 'I64'];

/** The Swin backbone's entries (`bb.*`). */
function backboneShapes(cfg: BiRefNetConfig, add: (k: string, s: number[], t?: 'F32' | 'I64') => void): void {
  const ln = (p: string, c: number) => { add(`${p}.weight`, [c]); add(`${p}.bias`, [c]); };
  const E = cfg.embedDim, ws = cfg.windowSize;
  add('bb.patch_embed.proj.weight', [E, 3, 4, 4]);
  add('bb.patch_embed.proj.bias', [E]);
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
}

/** The squeeze module's and decoder's entries. */
function decoderShapes(cfg: BiRefNetConfig, add: (k: string, s: number[], t?: 'F32' | 'I64') => void): void {
  const convw = (p: string, cin: number, cout: number, k: number, bias = true) => { add(`${p}.weight`, [cout, cin, k, k]); if (bias) add(`${p}.bias`, [cout]); };
  const bnw = (p: string, c: number) => { for (const n of ['weight', 'bias', 'running_mean', 'running_var']) add(`${p}.${n}`, [c]); add(`${p}.num_batches_tracked`, [], 'I64'); };
  const E = cfg.embedDim, P = cfg.asppPlanes, I = cfg.decInter;
  const lat = [8, 4, 2, 1].map((m) => 2 * E * m); // ×2: the 'cat' multi-scale input
  const decBlk = (p: string, cin: number, cout: number) => {
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
  decBlk('squeeze_module.0', lat[0] + lat[1] + lat[2] + lat[3], lat[0]);
  const iptOut = [lat[0] / 8, lat[0] / 8, lat[1] / 8, lat[2] / 8, lat[3] / 8];
  [3072, 768, 192, 48, 3].forEach((cin, i) => { convw(`decoder.ipt_blk${5 - i}.conv1`, cin, cfg.iptInter, 3); convw(`decoder.ipt_blk${5 - i}.conv_out`, cfg.iptInter, iptOut[i], 3); });
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
}

/**
 * Every state-dict entry of the reference `BiRefNet` for a geometry, with shapes, in module order (the key set of
 * the HF `model.safetensors` files, training-only heads and buffers included).
 */
export function biRefNetStateDictShapes(cfg: BiRefNetConfig): Entry[] {
  const out: Entry[] = [];
  const add = (k: string, s: number[], t: 'F32' | 'I64' = 'F32') => out.push([k, s, t]);
  backboneShapes(cfg, add);
  decoderShapes(cfg, add);
  return out;
}
