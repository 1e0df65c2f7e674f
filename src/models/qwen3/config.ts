// Qwen3 hyperparameters (HF `Qwen3Config`, config.json) as the FLUX.2 [klein] text encoder uses them: Qwen3-4B for
// klein 4B, Qwen3-8B for klein 9B, and the golden tiny model differ only in these numbers.
import fs from 'node:fs';
import path from 'node:path';
import { UserError } from '../../errors.ts';

export interface Qwen3Config {
  hiddenSize: number;
  intermediateSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  numKeyValueHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  vocabSize: number;
  tieWordEmbeddings: boolean;
  attentionBias: boolean;
}

/** A text-encoder folder klein cannot use as it is (config.json, missing or misshapen weights): the user can fix it. */
export class Qwen3ConfigError extends UserError {
  override name = 'Qwen3ConfigError';
  constructor(message: string) {
    super(message, 'invalid_model');
  }
}

/**
 * The hidden states FLUX.2 [klein] stacks into its text context (spec §4; HF indexing: 0 = embeddings, k = raw output
 * of decoder layer k, the last index = after the final norm).
 */
export const KLEIN_OUTPUT_LAYERS = [9, 18, 27] as const;

/**
 * fp16 on a GPU: `down_proj` — the one projection whose input (SwiGLU's product) is not RMS-normalised and whose
 * output feeds LLMs' "massive activation" channels — computes this much smaller and is scaled back in fp32.
 */
export const DOWN_PROJ_HEADROOM = 2 ** -6;

/** The Linears fast mode computes in int8: every projection of the decoder layers (96 % of the FLOPs). */
export function isProjection(name: string): boolean {
  return /^layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$/.test(name);
}

/** Deepest decoder layer (1-based count) the requested hidden states need. */
export function layersNeeded(o: { outputLayers: readonly number[]; hiddenStates?: readonly number[] }): number {
  return Math.max(0, ...o.outputLayers, ...(o.hiddenStates ?? []));
}

function num(raw: Record<string, unknown>, key: string, fallback?: number): number {
  const v = raw[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new Qwen3ConfigError(`config.json: ${key} must be a number, got ${JSON.stringify(raw[key])}`);
  return v;
}

/** Reads an HF `Qwen3Config` (config.json as a parsed object). */
export function parseQwen3Config(raw: Record<string, unknown>): Qwen3Config {
  if (raw.model_type !== undefined && raw.model_type !== 'qwen3') {
    throw new Qwen3ConfigError(`config.json: model_type is ${JSON.stringify(raw.model_type)}, expected "qwen3" (FLUX.2 [klein] uses Qwen3-4B / Qwen3-8B)`);
  }
  const hiddenSize = num(raw, 'hidden_size');
  const numAttentionHeads = num(raw, 'num_attention_heads');
  // newer transformers configs move rope settings into rope_parameters
  const ropeParams = (raw.rope_parameters ?? null) as Record<string, unknown> | null;
  const ropeScaling = (raw.rope_scaling ?? null) as Record<string, unknown> | null;
  const ropeType = ropeScaling?.rope_type ?? ropeScaling?.type ?? ropeParams?.rope_type ?? 'default';
  if (ropeType !== 'default') throw new Qwen3ConfigError(`config.json: rope scaling ${JSON.stringify(ropeType)} is not supported (Qwen3-4B/8B use plain RoPE)`);
  const ropeTheta = typeof raw.rope_theta === 'number' ? raw.rope_theta : num(ropeParams ?? {}, 'rope_theta', 1e6);
  if (raw.hidden_act !== undefined && raw.hidden_act !== 'silu') throw new Qwen3ConfigError(`config.json: hidden_act ${JSON.stringify(raw.hidden_act)} is not supported (Qwen3 uses silu)`);
  const cfg: Qwen3Config = {
    hiddenSize,
    intermediateSize: num(raw, 'intermediate_size'),
    numHiddenLayers: num(raw, 'num_hidden_layers'),
    numAttentionHeads,
    numKeyValueHeads: num(raw, 'num_key_value_heads', numAttentionHeads),
    headDim: num(raw, 'head_dim', hiddenSize / numAttentionHeads),
    rmsNormEps: num(raw, 'rms_norm_eps', 1e-6),
    ropeTheta,
    vocabSize: num(raw, 'vocab_size'),
    tieWordEmbeddings: raw.tie_word_embeddings !== false,
    attentionBias: raw.attention_bias === true,
  };
  for (const k of ['hiddenSize', 'intermediateSize', 'numHiddenLayers', 'numAttentionHeads', 'numKeyValueHeads', 'headDim', 'vocabSize'] as const) {
    if (!Number.isInteger(cfg[k]) || cfg[k] < 1) throw new Qwen3ConfigError(`config.json: ${k} must be a positive integer, got ${cfg[k]}`);
  }
  if (cfg.numAttentionHeads % cfg.numKeyValueHeads !== 0) {
    throw new Qwen3ConfigError(`config.json: num_attention_heads ${cfg.numAttentionHeads} is not a multiple of num_key_value_heads ${cfg.numKeyValueHeads}`);
  }
  if (cfg.headDim % 2 !== 0) throw new Qwen3ConfigError(`config.json: head_dim ${cfg.headDim} must be even for RoPE`);
  return cfg;
}

export function readQwen3Config(folder: string): Qwen3Config {
  const file = path.join(folder, 'config.json');
  let raw: Record<string, unknown>;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new Qwen3ConfigError(`cannot read ${file}: ${(e as Error).message}`);
  }
  return parseQwen3Config(raw);
}

/** Multiply-adds ×2 of one forward over `batch × seq` tokens through `layers` decoder layers (full attention matrix). */
export function qwen3Flops(c: Qwen3Config, layers: number, batch: number, seq: number): number {
  const H = c.hiddenSize;
  const q = c.numAttentionHeads * c.headDim;
  const kv = c.numKeyValueHeads * c.headDim;
  const proj = H * (q + 2 * kv) + q * H + 3 * H * c.intermediateSize;
  const attn = 2 * c.numAttentionHeads * seq * c.headDim; // QKᵀ and PV per query token
  return 2 * layers * batch * seq * (proj + attn);
}
