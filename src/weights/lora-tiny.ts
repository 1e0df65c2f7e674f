// Tiny random LoRAs for a (tiny) FLUX.2 model in every file format klein reads, named the way each trainer names
// them (docs/lora-formats.md). Each writer also returns the delta it means, per BFL weight, from its own name table
// (written independently of the loader's), so tests check the loader's mapping numerically.
import path from 'node:path';
import type { Flux2Config } from '../models/flux2-transformer.ts';
import { flux2BflShapes } from './flux2-layouts.ts';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16, writeSafetensors, type TensorToWrite } from './safetensors.ts';

export const TINY_LORA_FORMATS = ['diffusers', 'peft', 'ai-toolkit', 'kohya', 'onetrainer', 'diffsynth'] as const;
export type TinyLoraFormat = (typeof TINY_LORA_FORMATS)[number];

interface FormatSpec {
  naming: 'bfl' | 'diffusers';
  dtype: 'F32' | 'BF16' | 'F16';
  rank: number;
  /** Stored alpha (per-module tensor or diffusers metadata); absent: none stored, so alpha = rank. */
  alpha?: number;
  alphaIn: 'tensor' | 'metadata' | 'none';
  key: (module: string, part: 'down' | 'up' | 'alpha') => string;
  /** Modules (a suffix of their name) written with their own rank and alpha, as trainers' rank/alpha patterns do. */
  pattern?: { suffix: string; rank: number; alpha: number };
}

const peftKey = (prefix: string) => (m: string, part: 'down' | 'up' | 'alpha') => `${prefix}${m}.${part === 'down' ? 'lora_A.weight' : part === 'up' ? 'lora_B.weight' : 'alpha'}`;
const kohyaKey = (prefix: string) => (m: string, part: 'down' | 'up' | 'alpha') => `${prefix}${m.replaceAll('.', '_')}.${part === 'down' ? 'lora_down.weight' : part === 'up' ? 'lora_up.weight' : 'alpha'}`;

const SPECS: Record<TinyLoraFormat, FormatSpec> = {
  // diffusers `save_lora_weights`: transformer.-prefixed PEFT keys, alpha in lora_adapter_metadata
  diffusers: { naming: 'diffusers', dtype: 'BF16', rank: 4, alpha: 8, alphaIn: 'metadata', key: peftKey('transformer.'), pattern: { suffix: 'attn.to_out', rank: 2, alpha: 1 } },
  // PEFT adapter over the BFL model (diffusers reads base_model.model. as BFL names)
  peft: { naming: 'bfl', dtype: 'F32', rank: 3, alphaIn: 'none', key: peftKey('base_model.model.') },
  // ai-toolkit FLUX.2: BFL module names under diffusion_model., lora_A/lora_B, no alpha
  'ai-toolkit': { naming: 'bfl', dtype: 'BF16', rank: 4, alphaIn: 'none', key: peftKey('diffusion_model.') },
  // kohya sd-scripts / musubi-tuner: lora_unet_ + underscored BFL names, lora_down/lora_up + per-module alpha
  kohya: { naming: 'bfl', dtype: 'BF16', rank: 4, alpha: 2, alphaIn: 'tensor', key: kohyaKey('lora_unet_'), pattern: { suffix: 'linear1', rank: 3, alpha: 6 } },
  // kohya-style suffixes on underscored diffusers names (OneTrainer-style, ComfyUI's lora_transformer_)
  onetrainer: { naming: 'diffusers', dtype: 'F16', rank: 2, alpha: 4, alphaIn: 'tensor', key: kohyaKey('lora_transformer_') },
  // DiffSynth-Studio: bare diffusers module names, lora_A/lora_B, no alpha
  diffsynth: { naming: 'diffusers', dtype: 'F32', rank: 2, alphaIn: 'none', key: peftKey('') },
};

/** A module a writer adapts, with the BFL weight rows it means. */
interface Planned {
  module: string;
  weight: string;
  rows?: [number, number];
  swapHalves?: boolean;
}

function plan(naming: 'bfl' | 'diffusers', cfg: Flux2Config): Planned[] {
  const H = cfg.hiddenSize;
  const out: Planned[] = [];
  for (let i = 0; i < cfg.depth; i++) {
    const d = `double_blocks.${i}`;
    if (naming === 'bfl') {
      for (const s of ['img', 'txt']) {
        for (const m of [`${s}_attn.qkv`, `${s}_attn.proj`, `${s}_mlp.0`, `${s}_mlp.2`]) out.push({ module: `${d}.${m}`, weight: `${d}.${m}.weight` });
      }
      continue;
    }
    const t = `transformer_blocks.${i}`;
    ['to_q', 'to_k', 'to_v'].forEach((m, k) => out.push({ module: `${t}.attn.${m}`, weight: `${d}.img_attn.qkv.weight`, rows: [k * H, (k + 1) * H] }));
    ['add_q_proj', 'add_k_proj', 'add_v_proj'].forEach((m, k) => out.push({ module: `${t}.attn.${m}`, weight: `${d}.txt_attn.qkv.weight`, rows: [k * H, (k + 1) * H] }));
    out.push({ module: `${t}.attn.to_out.0`, weight: `${d}.img_attn.proj.weight` }, { module: `${t}.attn.to_add_out`, weight: `${d}.txt_attn.proj.weight` });
    out.push({ module: `${t}.ff.linear_in`, weight: `${d}.img_mlp.0.weight` }, { module: `${t}.ff.linear_out`, weight: `${d}.img_mlp.2.weight` });
    out.push({ module: `${t}.ff_context.linear_in`, weight: `${d}.txt_mlp.0.weight` }, { module: `${t}.ff_context.linear_out`, weight: `${d}.txt_mlp.2.weight` });
  }
  for (let i = 0; i < cfg.depthSingleBlocks; i++) {
    const s = `single_blocks.${i}`;
    if (naming === 'bfl') out.push({ module: `${s}.linear1`, weight: `${s}.linear1.weight` }, { module: `${s}.linear2`, weight: `${s}.linear2.weight` });
    else {
      const t = `single_transformer_blocks.${i}.attn`;
      out.push({ module: `${t}.to_qkv_mlp_proj`, weight: `${s}.linear1.weight` }, { module: `${t}.to_out`, weight: `${s}.linear2.weight` });
    }
  }
  if (naming === 'bfl') out.push({ module: 'double_stream_modulation_img.lin', weight: 'double_stream_modulation_img.lin.weight' }, { module: 'final_layer.adaLN_modulation.1', weight: 'final_layer.adaLN_modulation.1.weight' });
  else out.push({ module: 'context_embedder', weight: 'txt_in.weight' }, { module: 'norm_out.linear', weight: 'final_layer.adaLN_modulation.1.weight', swapHalves: true });
  return out;
}

/** mulberry32: small, seeded, the same on every platform. */
function uniform(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Values as the file will hold them (rounded to its dtype), so the expected delta is exact. */
function stored(values: Float32Array, dtype: FormatSpec['dtype']): { data: Float32Array | Uint16Array; exact: Float32Array } {
  if (dtype === 'F32') return { data: values, exact: values };
  if (dtype === 'BF16') {
    const bits = f32ToBf16(values);
    return { data: bits, exact: bf16ToF32(bits) };
  }
  const bits = f32ToF16(values);
  return { data: bits, exact: f16ToF32(bits) };
}

export interface TinyLoraOptions {
  seed?: number;
  /** Override every module's rank. */
  rank?: number;
  /** Override the stored alpha (formats that store none keep alpha = rank). */
  alpha?: number;
  /** Compute `expected` (dense deltas; default true — leave off for real-size benchmark files). */
  expected?: boolean;
}

export interface TinyLora {
  format: TinyLoraFormat;
  file: string;
  modules: number;
  rank: number;
  /** Alpha of the modules without a pattern (= rank where the format stores none). */
  alpha: number;
  /** What the file means: per BFL weight, the dense delta (alpha/rank)·B·A `[rows, in]` at scale 1. */
  expected: Map<string, Float64Array>;
}

/** Writes one tiny random LoRA of `format` for `cfg` to `file`. */
export function writeTinyLora(file: string, format: TinyLoraFormat, cfg: Flux2Config, opts: TinyLoraOptions = {}): TinyLora {
  const spec = SPECS[format];
  const shapes = new Map(flux2BflShapes(cfg).map((s) => [s.name, s.shape]));
  const next = uniform(((opts.seed ?? 0) + 1) * 7919 + TINY_LORA_FORMATS.indexOf(format));
  const tensors: Record<string, TensorToWrite> = {};
  const expected = new Map<string, Float64Array>();
  const alphaPattern: Record<string, number> = {};
  const rankPattern: Record<string, number> = {};
  const baseRank = opts.rank ?? spec.rank;
  const baseAlpha = spec.alphaIn === 'none' ? baseRank : (opts.alpha ?? spec.alpha ?? baseRank);
  const planned = plan(spec.naming, cfg);
  for (const p of planned) {
    const [rows, inF] = shapes.get(p.weight)!;
    const own = spec.pattern && opts.rank === undefined && opts.alpha === undefined && p.module.endsWith(spec.pattern.suffix) ? spec.pattern : undefined;
    const r = own?.rank ?? baseRank;
    const alpha = spec.alphaIn === 'none' ? r : (own?.alpha ?? baseAlpha);
    if (own) {
      alphaPattern[p.module] = own.alpha;
      rankPattern[p.module] = own.rank;
    }
    const out = p.rows ? p.rows[1] - p.rows[0] : rows;
    const aAmp = Math.sqrt(3 / inF);
    const bAmp = 0.5 / Math.sqrt(r);
    const down = stored(Float32Array.from({ length: r * inF }, () => (next() * 2 - 1) * aAmp), spec.dtype);
    const up = stored(Float32Array.from({ length: out * r }, () => (next() * 2 - 1) * bAmp), spec.dtype);
    tensors[spec.key(p.module, 'down')] = { dtype: spec.dtype, shape: [r, inF], data: down.data };
    tensors[spec.key(p.module, 'up')] = { dtype: spec.dtype, shape: [out, r], data: up.data };
    if (spec.alphaIn === 'tensor') tensors[spec.key(p.module, 'alpha')] = { dtype: 'F32', shape: [], data: Float32Array.of(alpha) };
    if (opts.expected === false) continue;
    const dense = expected.get(p.weight) ?? new Float64Array(rows * inF);
    for (let i = 0; i < out; i++) {
      // diffusers norm_out rows are scale|shift, BFL's shift|scale
      const bflRow = p.swapHalves ? (i + rows / 2) % rows : (p.rows?.[0] ?? 0) + i;
      for (let k = 0; k < r; k++) {
        const c = (alpha / r) * up.exact[i * r + k];
        for (let j = 0; j < inF; j++) dense[bflRow * inF + j] += c * down.exact[k * inF + j];
      }
    }
    expected.set(p.weight, dense);
  }
  const metadata: Record<string, string> = { format: 'pt', klein_tiny_lora: JSON.stringify({ format, seed: opts.seed ?? 0, note: 'random weights for tests' }) };
  if (spec.alphaIn === 'metadata') {
    metadata.lora_adapter_metadata = JSON.stringify({
      'transformer.r': baseRank,
      'transformer.lora_alpha': baseAlpha,
      'transformer.alpha_pattern': alphaPattern,
      'transformer.rank_pattern': rankPattern,
      'transformer.target_modules': [...new Set(planned.map((p) => p.module.split('.').slice(-1)[0]))],
      'transformer.use_dora': false,
      'transformer.use_rslora': false,
    });
  }
  if (spec.alphaIn === 'tensor') Object.assign(metadata, { ss_network_dim: String(baseRank), ss_network_alpha: String(baseAlpha), ss_base_model_version: 'flux2_klein' });
  writeSafetensors(file, tensors, metadata);
  return { format, file, modules: planned.length, rank: baseRank, alpha: baseAlpha, expected };
}

/** Writes one tiny LoRA per format into `dir` as `<format>.safetensors`. */
export function writeTinyLoras(dir: string, cfg: Flux2Config, opts: TinyLoraOptions & { formats?: readonly TinyLoraFormat[] } = {}): TinyLora[] {
  return (opts.formats ?? TINY_LORA_FORMATS).map((f) => writeTinyLora(path.join(dir, `${f}.safetensors`), f, cfg, opts));
}
