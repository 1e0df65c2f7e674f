// FLUX.2 transformer checkpoints come in two key layouts (spec §3.2–3.3):
//  * BFL: `flux-2-klein-4b.safetensors` (and the golden `transformer/model.safetensors`), fused q|k|v weights;
//  * diffusers: a `transformer/` folder with `config.json` and `diffusion_pytorch_model*.safetensors` (maybe sharded),
//    where the fused qkv of double blocks is split into to_q/to_k/to_v and the final adaLN halves are swapped.
// The model is written against BFL names. This module maps every BFL weight to the tensor(s) that hold it in the
// file actually opened; a weight split by diffusers is returned as row blocks that the graph concatenates, and a
// reordered weight as row *views* into the stored tensor (contiguous rows are contiguous bytes), so nothing is
// ever converted or written.
import fs from 'node:fs';
import path from 'node:path';
import { Checkpoint, type TensorInfo } from '../../weights/safetensors.ts';
import { rowSlice } from '../../weights/weight-ref.ts';
import type { ModelWeights } from '../../graph/nn/layers.ts';
import type { Flux2Config } from './config.ts';

export type Flux2Layout = 'bfl' | 'diffusers';

/** Raised for a checkpoint that is not a FLUX.2 transformer or does not match its config. */
export class Flux2CheckpointError extends Error {
  override name = 'Flux2CheckpointError';
}

/** Every BFL tensor of a config with its shape, in checkpoint order (spec §3.2). */
export function flux2BflShapes(cfg: Flux2Config): Array<{ name: string; shape: number[] }> {
  const H = cfg.hiddenSize;
  const hd = H / cfg.numHeads;
  const mlp = Math.round(H * cfg.mlpRatio);
  const out: Array<{ name: string; shape: number[] }> = [];
  const add = (name: string, shape: number[]) => out.push({ name, shape });
  add('img_in.weight', [H, cfg.inChannels]);
  add('txt_in.weight', [H, cfg.contextInDim]);
  add('time_in.in_layer.weight', [H, 256]);
  add('time_in.out_layer.weight', [H, H]);
  if (cfg.useGuidanceEmbed) {
    add('guidance_in.in_layer.weight', [H, 256]);
    add('guidance_in.out_layer.weight', [H, H]);
  }
  add('double_stream_modulation_img.lin.weight', [6 * H, H]);
  add('double_stream_modulation_txt.lin.weight', [6 * H, H]);
  add('single_stream_modulation.lin.weight', [3 * H, H]);
  for (let i = 0; i < cfg.depth; i++) {
    for (const s of ['img', 'txt']) {
      add(`double_blocks.${i}.${s}_attn.qkv.weight`, [3 * H, H]);
      add(`double_blocks.${i}.${s}_attn.norm.query_norm.scale`, [hd]);
      add(`double_blocks.${i}.${s}_attn.norm.key_norm.scale`, [hd]);
      add(`double_blocks.${i}.${s}_attn.proj.weight`, [H, H]);
      add(`double_blocks.${i}.${s}_mlp.0.weight`, [2 * mlp, H]);
      add(`double_blocks.${i}.${s}_mlp.2.weight`, [H, mlp]);
    }
  }
  for (let i = 0; i < cfg.depthSingleBlocks; i++) {
    add(`single_blocks.${i}.linear1.weight`, [3 * H + 2 * mlp, H]);
    add(`single_blocks.${i}.linear2.weight`, [H, H + mlp]);
    add(`single_blocks.${i}.norm.query_norm.scale`, [hd]);
    add(`single_blocks.${i}.norm.key_norm.scale`, [hd]);
  }
  add('final_layer.adaLN_modulation.1.weight', [2 * H, H]);
  add('final_layer.linear.weight', [cfg.inChannels, H]);
  return out;
}

/**
 * How a BFL weight is stored in diffusers: its name, or the diffusers tensors whose rows concatenate to it
 * (`parts`), or `swapHalves` (the BFL rows are the diffusers rows with the two halves exchanged).
 */
type DiffusersSource = { parts: string[] } | { swapHalves: string };

const DIFFUSERS_RENAMES: Array<[RegExp, string]> = [
  [/^img_in\./, 'x_embedder.'],
  [/^txt_in\./, 'context_embedder.'],
  [/^time_in\.in_layer\./, 'time_guidance_embed.timestep_embedder.linear_1.'],
  [/^time_in\.out_layer\./, 'time_guidance_embed.timestep_embedder.linear_2.'],
  [/^guidance_in\.in_layer\./, 'time_guidance_embed.guidance_embedder.linear_1.'],
  [/^guidance_in\.out_layer\./, 'time_guidance_embed.guidance_embedder.linear_2.'],
  [/^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.lin\./, '$1.linear.'],
  [/^double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale$/, 'transformer_blocks.$1.attn.norm_q.weight'],
  [/^double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale$/, 'transformer_blocks.$1.attn.norm_k.weight'],
  [/^double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale$/, 'transformer_blocks.$1.attn.norm_added_q.weight'],
  [/^double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale$/, 'transformer_blocks.$1.attn.norm_added_k.weight'],
  [/^double_blocks\.(\d+)\.img_attn\.proj\./, 'transformer_blocks.$1.attn.to_out.0.'],
  [/^double_blocks\.(\d+)\.txt_attn\.proj\./, 'transformer_blocks.$1.attn.to_add_out.'],
  [/^double_blocks\.(\d+)\.img_mlp\.0\./, 'transformer_blocks.$1.ff.linear_in.'],
  [/^double_blocks\.(\d+)\.img_mlp\.2\./, 'transformer_blocks.$1.ff.linear_out.'],
  [/^double_blocks\.(\d+)\.txt_mlp\.0\./, 'transformer_blocks.$1.ff_context.linear_in.'],
  [/^double_blocks\.(\d+)\.txt_mlp\.2\./, 'transformer_blocks.$1.ff_context.linear_out.'],
  [/^single_blocks\.(\d+)\.linear1\./, 'single_transformer_blocks.$1.attn.to_qkv_mlp_proj.'],
  [/^single_blocks\.(\d+)\.linear2\./, 'single_transformer_blocks.$1.attn.to_out.'],
  [/^single_blocks\.(\d+)\.norm\.query_norm\.scale$/, 'single_transformer_blocks.$1.attn.norm_q.weight'],
  [/^single_blocks\.(\d+)\.norm\.key_norm\.scale$/, 'single_transformer_blocks.$1.attn.norm_k.weight'],
  [/^final_layer\.linear\./, 'proj_out.'],
];

/** The diffusers tensor(s) holding BFL weight `bfl` (DF `convert_flux2_to_diffusers.py`, spec §3.3). */
export function diffusersSource(bfl: string): DiffusersSource {
  const qkv = /^double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.weight$/.exec(bfl);
  if (qkv) {
    const p = `transformer_blocks.${qkv[1]}.attn.`;
    return { parts: qkv[2] === 'img' ? [`${p}to_q.weight`, `${p}to_k.weight`, `${p}to_v.weight`] : [`${p}add_q_proj.weight`, `${p}add_k_proj.weight`, `${p}add_v_proj.weight`] };
  }
  if (bfl === 'final_layer.adaLN_modulation.1.weight') return { swapHalves: 'norm_out.linear.weight' };
  for (const [re, to] of DIFFUSERS_RENAMES) if (re.test(bfl)) return { parts: [bfl.replace(re, to)] };
  throw new Error(`no diffusers name for FLUX.2 weight ${bfl}`);
}

/** Names of the tensors that hold BFL weight `bfl` in a checkpoint of the given layout. */
export function storedNames(layout: Flux2Layout, bfl: string): string[] {
  if (layout === 'bfl') return [bfl];
  const s = diffusersSource(bfl);
  return 'parts' in s ? s.parts : [s.swapHalves];
}

/**
 * The weights of one FLUX.2 transformer checkpoint, addressed by BFL name. `get(name)` returns the row blocks
 * that, concatenated along axis 0, give the BFL tensor (one block for every weight of a BFL checkpoint).
 */
export class Flux2Weights implements ModelWeights {
  constructor(readonly checkpoint: Checkpoint, readonly layout: Flux2Layout, readonly config: Flux2Config) {}

  has(bfl: string): boolean {
    try {
      return storedNames(this.layout, bfl).every((n) => this.checkpoint.has(n));
    } catch {
      return false; // not a FLUX.2 weight name at all
    }
  }

  parts(bfl: string): TensorInfo[] {
    if (this.layout === 'bfl') return [this.checkpoint.info(bfl)];
    const src = diffusersSource(bfl);
    if ('parts' in src) return src.parts.map((n) => this.checkpoint.info(n));
    const t = this.checkpoint.info(src.swapHalves);
    const half = t.shape[0] / 2;
    return [rowSlice(t, half, 2 * half), rowSlice(t, 0, half)];
  }

  /** Files the graph will reference. */
  get files(): string[] {
    return this.checkpoint.files.map((f) => f.file);
  }

  /** Checks that every weight the config needs exists with the right shape (and that nothing unexpected does). */
  validate(): void {
    const expected = flux2BflShapes(this.config);
    for (const { name, shape } of expected) {
      let parts: TensorInfo[];
      try {
        parts = this.parts(name);
      } catch (e) {
        throw new Flux2CheckpointError(`${this.describe()}: ${(e as Error).message}`);
      }
      const rows = parts.reduce((n, p) => n + p.shape[0], 0);
      const got = [rows, ...parts[0].shape.slice(1)];
      if (parts.some((p) => JSON.stringify(p.shape.slice(1)) !== JSON.stringify(parts[0].shape.slice(1))) || JSON.stringify(got) !== JSON.stringify(shape)) {
        throw new Flux2CheckpointError(`${this.describe()}: weight ${parts.map((p) => p.name).join(' + ')} has shape ${JSON.stringify(parts.map((p) => p.shape))}, the config needs ${JSON.stringify(shape)} for ${name}`);
      }
      for (const p of parts) {
        if (!['F32', 'BF16', 'F16'].includes(p.dtype)) {
          throw new Flux2CheckpointError(`${this.describe()}: weight ${p.name} has dtype ${p.dtype}${p.dtype.startsWith('F8') ? ' (float8 checkpoints are not supported yet; use the bf16 checkpoint)' : ''}; expected BF16, F16 or F32`);
        }
      }
    }
    const known = new Set(expected.flatMap((e) => this.sourceNames(e.name)));
    const extra = this.checkpoint.names.filter((n) => !known.has(n));
    if (extra.length) throw new Flux2CheckpointError(`${this.describe()}: ${extra.length} tensor(s) not part of a FLUX.2 transformer with this config, e.g. ${extra.slice(0, 3).join(', ')} (more blocks than the config says, or another model?)`);
  }

  /** Names of the stored tensors that hold BFL weight `bfl`. */
  sourceNames(bfl: string): string[] {
    return storedNames(this.layout, bfl);
  }

  describe(): string {
    return `FLUX.2 transformer checkpoint ${this.files.length === 1 ? this.files[0] : path.dirname(this.files[0])} (${this.layout} layout)`;
  }
}

/** Where the transformer weights and config of `p` are: a file, a BFL folder, a diffusers `transformer/` folder. */
export interface Flux2Location {
  /** A `.safetensors` file or `.safetensors.index.json`. */
  weights: string;
  /** `config.json` beside the weights, if any. */
  configFile?: string;
}

/**
 * Resolves a user path: a `.safetensors` file; a folder with `config.json` and `model.safetensors` (BFL, like the
 * golden) or `diffusion_pytorch_model*.safetensors` (diffusers, maybe sharded with an index); or a model repo
 * folder with a `transformer/` subfolder. Other `.safetensors` files in the folder (golden cases) are ignored.
 */
export function locateFlux2(p: string): Flux2Location {
  const abs = path.resolve(p);
  if (!fs.existsSync(abs)) throw new Flux2CheckpointError(`transformer checkpoint not found: ${abs}`);
  if (!fs.statSync(abs).isDirectory()) {
    const cfg = path.join(path.dirname(abs), 'config.json');
    return { weights: abs, configFile: fs.existsSync(cfg) && path.basename(abs) !== 'config.json' ? cfg : undefined };
  }
  const entries = fs.readdirSync(abs).sort();
  const cfg = entries.includes('config.json') ? path.join(abs, 'config.json') : undefined;
  const pick =
    entries.find((e) => /^diffusion_pytorch_model.*\.safetensors\.index\.json$/.test(e)) ??
    entries.find((e) => /^diffusion_pytorch_model\.safetensors$/.test(e)) ??
    entries.find((e) => /^model.*\.safetensors\.index\.json$/.test(e)) ??
    entries.find((e) => /^model\.safetensors$/.test(e)) ??
    entries.find((e) => /^flux-?2.*\.safetensors$/i.test(e));
  if (pick) return { weights: path.join(abs, pick), configFile: cfg };
  if (entries.includes('transformer') && fs.statSync(path.join(abs, 'transformer')).isDirectory()) return locateFlux2(path.join(abs, 'transformer'));
  const st = entries.filter((e) => e.endsWith('.safetensors'));
  if (st.length === 1) return { weights: path.join(abs, st[0]), configFile: cfg };
  throw new Flux2CheckpointError(`no FLUX.2 transformer weights in ${abs}: expected model.safetensors, diffusion_pytorch_model*.safetensors (+ index), flux-2-*.safetensors or a transformer/ folder`);
}

export function detectFlux2Layout(ckpt: Checkpoint): Flux2Layout {
  if (ckpt.has('img_in.weight')) return 'bfl';
  if (ckpt.has('x_embedder.weight')) return 'diffusers';
  const sample = ckpt.names.slice(0, 3).join(', ');
  throw new Flux2CheckpointError(`${ckpt.files.map((f) => f.file).join(', ')} is not a FLUX.2 transformer checkpoint (neither img_in.weight nor x_embedder.weight; first keys: ${sample})`);
}

/** Config from a BFL params JSON (`Klein4BParams` field names) or a diffusers `Flux2Transformer2DModel` config. */
export function parseFlux2ConfigJson(json: Record<string, unknown>, source: string): Flux2Config {
  const num = (k: string): number => {
    const v = json[k];
    if (typeof v !== 'number' || !Number.isFinite(v)) throw new Flux2CheckpointError(`${source}: "${k}" must be a number, found ${JSON.stringify(v)}`);
    return v;
  };
  const axes = (k: string): number[] => {
    const v = json[k];
    if (!Array.isArray(v) || !v.every((d) => Number.isInteger(d) && d > 0)) throw new Flux2CheckpointError(`${source}: "${k}" must be a list of positive integers`);
    return v as number[];
  };
  if ('hidden_size' in json) {
    return {
      inChannels: num('in_channels'),
      contextInDim: num('context_in_dim'),
      hiddenSize: num('hidden_size'),
      numHeads: num('num_heads'),
      depth: num('depth'),
      depthSingleBlocks: num('depth_single_blocks'),
      axesDim: axes('axes_dim'),
      theta: num('theta'),
      mlpRatio: num('mlp_ratio'),
      useGuidanceEmbed: json.use_guidance_embed === true,
    };
  }
  if ('num_attention_heads' in json) {
    if ('patch_size' in json && json.patch_size !== 1) throw new Flux2CheckpointError(`${source}: patch_size ${JSON.stringify(json.patch_size)} is not supported (FLUX.2 uses 1)`);
    if (json.out_channels != null && json.out_channels !== json.in_channels) throw new Flux2CheckpointError(`${source}: out_channels ≠ in_channels is not supported`);
    const heads = num('num_attention_heads');
    return {
      inChannels: num('in_channels'),
      contextInDim: num('joint_attention_dim'),
      hiddenSize: heads * num('attention_head_dim'),
      numHeads: heads,
      depth: num('num_layers'),
      depthSingleBlocks: num('num_single_layers'),
      axesDim: axes('axes_dims_rope'),
      theta: num('rope_theta'),
      mlpRatio: num('mlp_ratio'),
      useGuidanceEmbed: json.guidance_embeds === true,
    };
  }
  throw new Flux2CheckpointError(`${source}: neither a BFL FLUX.2 params file (hidden_size, …) nor a diffusers Flux2Transformer2DModel config (num_attention_heads, …)`);
}

/**
 * Config read off the tensor shapes, for a bare BFL file such as `flux-2-klein-4b.safetensors` that ships without
 * one. RoPE axes and theta are not visible in the shapes: every FLUX.2 model uses 4 equal axes and theta 2000.
 */
export function inferFlux2Config(ckpt: Checkpoint, layout: Flux2Layout): Flux2Config {
  const n = (bfl: string) => storedNames(layout, bfl)[0];
  const shape = (bfl: string) => ckpt.info(n(bfl)).shape;
  const [H, inChannels] = shape('img_in.weight');
  const contextInDim = shape('txt_in.weight')[1];
  const hd = shape('single_blocks.0.norm.query_norm.scale')[0];
  const mlp = shape('double_blocks.0.img_mlp.2.weight')[1];
  const count = (re: RegExp) => new Set(ckpt.names.map((k) => re.exec(k)?.[1]).filter((x) => x !== undefined)).size;
  const depth = count(layout === 'bfl' ? /^double_blocks\.(\d+)\./ : /^transformer_blocks\.(\d+)\./);
  const depthSingleBlocks = count(layout === 'bfl' ? /^single_blocks\.(\d+)\./ : /^single_transformer_blocks\.(\d+)\./);
  return {
    inChannels,
    contextInDim,
    hiddenSize: H,
    numHeads: H / hd,
    depth,
    depthSingleBlocks,
    axesDim: [hd / 4, hd / 4, hd / 4, hd / 4],
    theta: 2000,
    mlpRatio: mlp / H,
    useGuidanceEmbed: ckpt.has(n('guidance_in.in_layer.weight')),
  };
}

/** Opens a FLUX.2 transformer checkpoint in either layout, with its config, and checks every weight's shape. */
export function openFlux2Checkpoint(p: string): Flux2Weights {
  const loc = locateFlux2(p);
  const ckpt = Checkpoint.open(loc.weights);
  const layout = detectFlux2Layout(ckpt);
  let config: Flux2Config;
  if (loc.configFile) {
    let json: Record<string, unknown>;
    try {
      json = JSON.parse(fs.readFileSync(loc.configFile, 'utf8'));
    } catch (e) {
      throw new Flux2CheckpointError(`${loc.configFile}: not valid JSON: ${(e as Error).message}`);
    }
    config = parseFlux2ConfigJson(json, loc.configFile);
  } else if (ckpt.files[0].metadata.flux2_config) {
    // written by writeRandomFlux2Checkpoint (tiny test models whose RoPE axes shapes cannot reveal)
    config = parseConfigMetadata(ckpt.files[0].metadata.flux2_config, loc.weights);
  } else {
    config = inferFlux2Config(ckpt, layout);
  }
  checkConfig(config, loc.configFile ?? loc.weights);
  const w = new Flux2Weights(ckpt, layout, config);
  w.validate();
  return w;
}

function parseConfigMetadata(text: string, source: string): Flux2Config {
  let c: Flux2Config;
  try {
    c = JSON.parse(text);
  } catch (e) {
    throw new Flux2CheckpointError(`${source}: metadata flux2_config is not valid JSON: ${(e as Error).message}`);
  }
  const keys: Array<keyof Flux2Config> = ['inChannels', 'contextInDim', 'hiddenSize', 'numHeads', 'depth', 'depthSingleBlocks', 'axesDim', 'theta', 'mlpRatio', 'useGuidanceEmbed'];
  const missing = keys.filter((k) => !(k in c));
  if (missing.length) throw new Flux2CheckpointError(`${source}: metadata flux2_config lacks ${missing.join(', ')}`);
  return c;
}

/** Rejects configs the graph cannot express (spec §2.1: the axes must tile the head's dims in pairs). */
export function checkConfig(c: Flux2Config, source: string): void {
  const hd = c.hiddenSize / c.numHeads;
  if (!Number.isInteger(hd) || hd % 2 !== 0) throw new Flux2CheckpointError(`${source}: hidden size ${c.hiddenSize} / ${c.numHeads} heads is not an even head dim`);
  const sum = c.axesDim.reduce((a, b) => a + b, 0);
  if (sum !== hd || c.axesDim.some((d) => d % 2 !== 0)) throw new Flux2CheckpointError(`${source}: RoPE axes ${JSON.stringify(c.axesDim)} must be even and sum to the head dim ${hd}`);
  if (!Number.isInteger(c.hiddenSize * c.mlpRatio)) throw new Flux2CheckpointError(`${source}: mlp_ratio ${c.mlpRatio} × hidden ${c.hiddenSize} is not an integer`);
}
