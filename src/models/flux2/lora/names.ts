// What a LoRA module name in a FLUX.2 LoRA file adapts, in klein's own (BFL) weight names. LoRA files for FLUX.2 name
// their modules in one of two vocabularies — BFL (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`) or
// diffusers (`transformer_blocks.N.attn.to_q`, `single_transformer_blocks.N.attn.to_qkv_mlp_proj`) — behind a
// trainer-specific prefix, dotted or with dots turned into underscores (kohya). See docs/lora-formats.md for the
// files in circulation and the sources this table was read from.
import type { Flux2Config } from '../config.ts';

/** What one module name refers to. */
export type ModuleClass =
  | { kind: 'target'; target: ModuleTarget; naming: 'bfl' | 'diffusers' }
  /** A FLUX.1 module (names or layers FLUX.2 does not have). */
  | { kind: 'flux1'; why: string }
  /** A text-encoder module: klein applies transformer LoRAs only. */
  | { kind: 'text_encoder' }
  /** A block index the model does not have (a LoRA for a deeper model). */
  | { kind: 'out_of_range'; block: 'double' | 'single'; index: number }
  /** guidance_in: FLUX.2 [dev] (and FLUX.1) embed guidance, klein has no such layer. */
  | { kind: 'guidance' }
  | { kind: 'unknown' };

export interface ModuleTarget {
  /** BFL weight name of the adapted Linear, e.g. `double_blocks.0.img_attn.qkv.weight`. */
  weight: string;
  /** Rows `[start, end)` of that weight the module's output covers (a diffusers to_q/to_k/to_v of a fused qkv). */
  rows?: [number, number];
  /** The module's output rows are the weight's rows with the two halves exchanged (diffusers `norm_out.linear`). */
  swapHalves?: boolean;
}

/** Where the module name starts after a trainer prefix, and whether its dots became underscores. */
interface Prefix {
  prefix: string;
  underscored: boolean;
  textEncoder?: boolean;
}

// Longest first: `lora_te1_` before `lora_te_`, `model.diffusion_model.` before `diffusion_model.`.
const PREFIXES: Prefix[] = [
  { prefix: 'model.diffusion_model.', underscored: false },
  { prefix: 'base_model.model.', underscored: false },
  { prefix: 'diffusion_model.', underscored: false },
  { prefix: 'transformer.', underscored: false },
  { prefix: 'lora_transformer_', underscored: true },
  { prefix: 'lora_unet_', underscored: true },
  { prefix: 'lycoris_', underscored: true },
  ...['text_encoders.', 'text_encoder_2.', 'text_encoder.', 'te1.', 'te2.', 'te.'].map((prefix) => ({ prefix, underscored: false, textEncoder: true })),
  ...['lora_te1_', 'lora_te2_', 'lora_te3_', 'lora_te_'].map((prefix) => ({ prefix, underscored: true, textEncoder: true })),
];

/** Qwen3 (and other LLM) layer names: a PEFT adapter on the text encoder. */
const TEXT_ENCODER_BODY = /^(model\.)?layers\.\d+\.(self_attn|mlp)\./;

type Resolve = (m: RegExpExecArray, cfg: Flux2Config) => ModuleClass;

interface Rule {
  /** Dotted module name; `\.` also matches `_` for underscored names. */
  source: string;
  resolve: Resolve;
}

const bfl = (weight: string, extra: Partial<ModuleTarget> = {}): ModuleClass => ({ kind: 'target', naming: 'bfl', target: { weight, ...extra } });
const dif = (weight: string, extra: Partial<ModuleTarget> = {}): ModuleClass => ({ kind: 'target', naming: 'diffusers', target: { weight, ...extra } });
const flux1 = (why: string): Resolve => () => ({ kind: 'flux1', why });

/** Checks a block index against the model before resolving. */
function inDouble(m: RegExpExecArray, cfg: Flux2Config, then: (i: number) => ModuleClass): ModuleClass {
  const i = Number(m[1]);
  return i < cfg.depth ? then(i) : { kind: 'out_of_range', block: 'double', index: i };
}
function inSingle(m: RegExpExecArray, cfg: Flux2Config, then: (i: number) => ModuleClass): ModuleClass {
  const i = Number(m[1]);
  return i < cfg.depthSingleBlocks ? then(i) : { kind: 'out_of_range', block: 'single', index: i };
}
const guidance = (cfg: Flux2Config, weight: string, naming: 'bfl' | 'diffusers'): ModuleClass =>
  cfg.useGuidanceEmbed ? (naming === 'bfl' ? bfl(weight) : dif(weight)) : { kind: 'guidance' };

const QKV_PART: Record<string, { stream: 'img' | 'txt'; k: number }> = {
  to_q: { stream: 'img', k: 0 }, to_k: { stream: 'img', k: 1 }, to_v: { stream: 'img', k: 2 },
  add_q_proj: { stream: 'txt', k: 0 }, add_k_proj: { stream: 'txt', k: 1 }, add_v_proj: { stream: 'txt', k: 2 },
};

const RULES: Rule[] = [
  // ---- BFL names (klein's own; ai-toolkit, musubi-tuner/kohya, BFL-style PEFT)
  { source: 'img_in', resolve: () => bfl('img_in.weight') },
  { source: 'txt_in', resolve: () => bfl('txt_in.weight') },
  { source: 'time_in\\.(in|out)_layer', resolve: (m) => bfl(`time_in.${m[1]}_layer.weight`) },
  { source: 'guidance_in\\.(in|out)_layer', resolve: (m, c) => guidance(c, `guidance_in.${m[1]}_layer.weight`, 'bfl') },
  { source: '(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\\.lin', resolve: (m) => bfl(`${m[1]}.lin.weight`) },
  { source: 'double_blocks\\.(\\d+)\\.(img|txt)_attn\\.(qkv|proj)', resolve: (m, c) => inDouble(m, c, (i) => bfl(`double_blocks.${i}.${m[2]}_attn.${m[3]}.weight`)) },
  { source: 'double_blocks\\.(\\d+)\\.(img|txt)_mlp\\.(0|2)', resolve: (m, c) => inDouble(m, c, (i) => bfl(`double_blocks.${i}.${m[2]}_mlp.${m[3]}.weight`)) },
  { source: 'single_blocks\\.(\\d+)\\.linear(1|2)', resolve: (m, c) => inSingle(m, c, (i) => bfl(`single_blocks.${i}.linear${m[2]}.weight`)) },
  { source: 'final_layer\\.linear', resolve: () => bfl('final_layer.linear.weight') },
  { source: 'final_layer\\.adaLN_modulation\\.1', resolve: () => bfl('final_layer.adaLN_modulation.1.weight') },
  // FLUX.1 has per-block modulation and a pooled-vector embedder; FLUX.2 shares three modulation Linears
  { source: 'double_blocks\\.(\\d+)\\.(img|txt)_mod\\.lin', resolve: flux1('per-block modulation (img_mod/txt_mod)') },
  { source: 'single_blocks\\.(\\d+)\\.modulation\\.lin', resolve: flux1('per-block modulation (single_blocks.N.modulation)') },
  { source: 'vector_in\\.(in|out)_layer', resolve: flux1('the pooled CLIP vector embedder (vector_in)') },

  // ---- diffusers names (Flux2Transformer2DModel; diffusers/PEFT trainers, DiffSynth-Studio, OneTrainer-style)
  { source: 'x_embedder', resolve: () => dif('img_in.weight') },
  { source: 'context_embedder', resolve: () => dif('txt_in.weight') },
  { source: 'time_guidance_embed\\.timestep_embedder\\.linear_(1|2)', resolve: (m) => dif(`time_in.${m[1] === '1' ? 'in' : 'out'}_layer.weight`) },
  { source: 'time_guidance_embed\\.guidance_embedder\\.linear_(1|2)', resolve: (m, c) => guidance(c, `guidance_in.${m[1] === '1' ? 'in' : 'out'}_layer.weight`, 'diffusers') },
  { source: '(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\\.linear', resolve: (m) => dif(`${m[1]}.lin.weight`) },
  {
    source: 'transformer_blocks\\.(\\d+)\\.attn\\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)',
    resolve: (m, c) =>
      inDouble(m, c, (i) => {
        const { stream, k } = QKV_PART[m[2]];
        const H = c.hiddenSize;
        return dif(`double_blocks.${i}.${stream}_attn.qkv.weight`, { rows: [k * H, (k + 1) * H] });
      }),
  },
  { source: 'transformer_blocks\\.(\\d+)\\.attn\\.to_out\\.0', resolve: (m, c) => inDouble(m, c, (i) => dif(`double_blocks.${i}.img_attn.proj.weight`)) },
  { source: 'transformer_blocks\\.(\\d+)\\.attn\\.to_add_out', resolve: (m, c) => inDouble(m, c, (i) => dif(`double_blocks.${i}.txt_attn.proj.weight`)) },
  {
    source: 'transformer_blocks\\.(\\d+)\\.(ff|ff_context)\\.linear_(in|out)',
    resolve: (m, c) => inDouble(m, c, (i) => dif(`double_blocks.${i}.${m[2] === 'ff' ? 'img' : 'txt'}_mlp.${m[3] === 'in' ? 0 : 2}.weight`)),
  },
  { source: 'single_transformer_blocks\\.(\\d+)\\.attn\\.to_qkv_mlp_proj', resolve: (m, c) => inSingle(m, c, (i) => dif(`single_blocks.${i}.linear1.weight`)) },
  { source: 'single_transformer_blocks\\.(\\d+)\\.attn\\.to_out', resolve: (m, c) => inSingle(m, c, (i) => dif(`single_blocks.${i}.linear2.weight`)) },
  { source: 'proj_out', resolve: () => dif('final_layer.linear.weight') },
  // diffusers' AdaLayerNormContinuous splits scale|shift, BFL's final layer shift|scale (spec §1.2)
  { source: 'norm_out\\.linear', resolve: () => dif('final_layer.adaLN_modulation.1.weight', { swapHalves: true }) },
  // FluxTransformer2DModel (FLUX.1) module names that Flux2Transformer2DModel does not have
  { source: 'transformer_blocks\\.(\\d+)\\.(norm1|norm1_context)\\.linear', resolve: flux1('per-block modulation (norm1.linear)') },
  { source: 'transformer_blocks\\.(\\d+)\\.(ff|ff_context)\\.net\\.(0\\.proj|2)', resolve: flux1('GELU feed-forward (ff.net.0.proj / ff.net.2)') },
  { source: 'single_transformer_blocks\\.(\\d+)\\.(norm\\.linear|proj_mlp|proj_out|attn\\.to_q|attn\\.to_k|attn\\.to_v)', resolve: flux1('unfused single-block projections (proj_mlp / proj_out / attn.to_q)') },
  { source: 'time_text_embed\\..+', resolve: flux1('time_text_embed') },
];

const COMPILED = RULES.map((r) => ({
  dotted: new RegExp(`^${r.source}$`),
  underscored: new RegExp(`^${r.source.replaceAll('\\.', '[._]')}$`),
  resolve: r.resolve,
}));

/** Classifies a module name (a tensor key without its `.lora_A.weight`-like suffix) for a model config. */
export function classifyModule(module: string, cfg: Flux2Config): ModuleClass {
  const p = PREFIXES.find((x) => module.startsWith(x.prefix));
  if (p?.textEncoder) return { kind: 'text_encoder' };
  const body = p ? module.slice(p.prefix.length) : module;
  if (TEXT_ENCODER_BODY.test(body)) return { kind: 'text_encoder' };
  for (const r of COMPILED) {
    const m = (p?.underscored ? r.underscored : r.dotted).exec(body);
    if (m) return r.resolve(m, cfg);
  }
  return { kind: 'unknown' };
}

/** The trainer prefix a key starts with ('' when bare), for describing a file's format. */
export function keyPrefix(key: string): string {
  return PREFIXES.find((x) => key.startsWith(x.prefix))?.prefix ?? '';
}

export type LoraPart = 'down' | 'up' | 'alpha';

/** Suffixes of the tensors of one plain LoRA module: PEFT/diffusers lora_A/lora_B, kohya lora_down/lora_up/alpha. */
const PART_SUFFIXES: Array<[string, LoraPart]> = [
  ['.lora_A.weight', 'down'],
  ['.lora_B.weight', 'up'],
  ['.lora_down.weight', 'down'],
  ['.lora_up.weight', 'up'],
  ['.alpha', 'alpha'],
];

/**
 * Tensors of adapter types other than plain LoRA, and what to call them in a refusal. `alone: false` marks names a
 * full checkpoint also has (norm scales, biases): they mean a patch only beside LoRA tensors.
 */
const OTHER_ADAPTERS: Array<{ re: RegExp; what: string; alone: boolean }> = [
  { re: /\.(dora_scale|lora_magnitude_vector)(\.weight)?$/, what: 'DoRA (weight-decomposed LoRA)', alone: true },
  { re: /\.hada_(w[12]_[ab]|t[12])$/, what: 'LoHa (LyCORIS)', alone: true },
  { re: /\.lokr_(w[12](_[ab])?|t2)$/, what: 'LoKr (LyCORIS)', alone: true },
  { re: /\.lora_mid\.weight$/, what: 'LoCon with a mid weight', alone: true },
  { re: /\.(lora_B\.bias|diff_b|diff|set_weight)$/, what: 'full weight/bias patch (diff, diff_b, lora_B.bias)', alone: true },
  { re: /\.(a1|a2|b1|b2)\.weight$|\.(w_norm|b_norm)$/, what: 'GLoRA / norm patch', alone: true },
  { re: /\.(scale|norm_q\.weight|norm_k\.weight|bias)$/, what: 'norm-scale or bias patch (BFL control LoRAs)', alone: false },
];

export type ParsedKey =
  | { kind: 'part'; module: string; part: LoraPart }
  | { kind: 'other_adapter'; what: string; alone: boolean }
  | { kind: 'unknown' };

/** Splits a tensor key into module name and LoRA part, or says which unsupported adapter type it belongs to. */
export function parseKey(key: string): ParsedKey {
  for (const [suffix, part] of PART_SUFFIXES) if (key.endsWith(suffix)) return { kind: 'part', module: key.slice(0, -suffix.length), part };
  for (const { re, what, alone } of OTHER_ADAPTERS) if (re.test(key)) return { kind: 'other_adapter', what, alone };
  return { kind: 'unknown' };
}
