// Stress fixtures for int8 fast mode (issue 21): turn the random weights of a named FLUX.2 or Qwen3 tensor into
// weights whose activations carry the outliers real checkpoints have, so the int8 scheme is tested against them
// without the real weights (which cannot be downloaded here). Three kinds, each a few fixed channels:
//
// (a) Outlier feature channels in Linear inputs, ×20–100 on every token. LLM.int8() (Dettmers et al. 2022) found a
//     few systematic "outlier features" (the same hidden dims in every layer, up to ~20× and beyond) in the inputs of
//     transformer Linears; SmoothQuant (Xiao et al. 2023) shows per-channel activation maxima of ~70 against ~1 for
//     the rest, and that they sit in fixed channels. Here: the Qwen3 RMSNorm weights that feed q/k/v and gate/up
//     (input_layernorm, post_attention_layernorm), and in FLUX.2 the adaLN `scale` rows of the shared modulations
//     (double_stream_modulation_img/txt chunks 1 and 4, single_stream_modulation chunk 1), so `(1 + scale)` is large
//     on those channels — the channel-wise, modulation-driven outliers PTQ4DiT, ViDiT-Q and SVDQuant report for DiTs.
// (b) A massive-activation token in the text encoder's residual stream: "Massive Activations in Large Language
//     Models" (Sun et al. 2024) finds a few activations ~10⁴× the median, in two or three fixed channels, on the
//     first token and on delimiter tokens, kept through most layers. Here: the embedding rows of the first tokens of
//     the klein prompt template (`<|im_start|>`, `user`, `\n`) get two channels ×1000, so every prompt starts with
//     tokens whose residual stream is dominated by them.
// (c) Heavy-tailed SwiGLU products before down_proj / linear2 / mlp.2: a few rows of both the gate and the up
//     projection ×8, so `silu(gate)·up` on those channels is ~64× the rest with a product-of-Gaussians tail (the
//     FFN is where Sun et al. see massive activations born, and SwiGLU inputs of down_proj are the most
//     heavy-tailed Linear inputs of LLMs in SmoothQuant's and Quarot's measurements).
//
// The functions only describe which entries to change (`OutlierEdit`s) and apply them; the random-checkpoint
// writers call them when asked for a stress model (`outliers: true`).
import type { Flux2Config } from '../models/flux2-transformer.ts';

/**
 * Entries (r, c) of a tensor become `x · factor + offset`, r ∈ rows (every row if absent), c ∈ cols (every column if
 * absent). 1-D tensors: `cols` index the vector.
 */
export interface OutlierEdit {
  rows?: readonly number[];
  cols?: readonly number[];
  factor?: number;
  offset?: number;
}

/** (a): the factors of the outlier feature channels (one channel each). */
export const OUTLIER_CHANNEL_FACTORS = [20, 40, 70, 100] as const;
/** (b): how many channels carry the massive activation, and by how much. */
export const MASSIVE_CHANNELS = 2;
export const MASSIVE_FACTOR = 1000;
/** (b): the first tokens of the klein prompt template (`<|im_start|>user\n`), Qwen3 vocabulary ids. */
export const MASSIVE_TOKENS = [151644, 872, 198] as const;
/** (c): SwiGLU channels whose gate and up rows are both scaled by this (the product by its square). */
export const SWIGLU_OUTLIER_CHANNELS = 4;
export const SWIGLU_FACTOR = 8;

/**
 * `count` fixed channels spread over `width` (the same in every layer, as real outlier features are), offset so
 * they do not fall on head boundaries; `salt` gives a kind its own channels.
 */
export function outlierChannels(width: number, count: number, salt = 0): number[] {
  return Array.from({ length: count }, (_, i) => Math.floor(((i + 0.37 + 0.11 * salt) * width) / count) % width);
}


/** Rows `offset + c` (gate) and `offset + mlp + c` (up) ×SWIGLU_FACTOR for the SwiGLU outlier channels. */
function swigluRows(mlp: number, gateOffset: number, upOffset: number): OutlierEdit[] {
  const ch = outlierChannels(mlp, SWIGLU_OUTLIER_CHANNELS, 2);
  return [{ rows: ch.map((c) => gateOffset + c), factor: SWIGLU_FACTOR }, { rows: ch.map((c) => upOffset + c), factor: SWIGLU_FACTOR }];
}

/** The edits that turn a random Qwen3 tensor (HF name, with or without the `model.` prefix) into the stress model's. */
export function qwen3OutlierEdits(name: string, shape: readonly number[]): OutlierEdit[] {
  const n = name.replace(/^model\./, '');
  if (/^layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight$/.test(n)) {
    return outlierChannels(shape[0], OUTLIER_CHANNEL_FACTORS.length).map((c, i) => ({ cols: [c], factor: OUTLIER_CHANNEL_FACTORS[i] }));
  }
  if (n === 'embed_tokens.weight') {
    const rows = MASSIVE_TOKENS.filter((t) => t < shape[0]);
    return [{ rows, cols: outlierChannels(shape[1], MASSIVE_CHANNELS, 1), factor: MASSIVE_FACTOR }];
  }
  if (/^layers\.\d+\.mlp\.(gate|up)_proj\.weight$/.test(n)) {
    return [{ rows: outlierChannels(shape[0], SWIGLU_OUTLIER_CHANNELS, 2), factor: SWIGLU_FACTOR }];
  }
  return [];
}

/**
 * Typical mean of `silu(vec)` over the hidden channels of the random checkpoints (0.031–0.040 for t ∈ [0, 1] in the
 * klein 4B bench checkpoint; 0.017–0.058 over other widths and seeds). A modulation row's dot product with
 * `silu(vec)` changes sign with t, its all-ones component does not: so the stress model adds
 * `(target − 1) / (H · this)` to every entry of an adaLN `scale` row, which puts `(1 + scale)` at 0.9–1.15× its
 * target in the bench checkpoint at every timestep (within 2× elsewhere).
 */
export const MEAN_SILU_VEC = 0.035;

/** The edits that turn a random FLUX.2 tensor (BFL name) into the stress model's. */
export function flux2OutlierEdits(name: string, config: Flux2Config): OutlierEdit[] {
  const H = config.hiddenSize;
  const mlp = Math.round(H * config.mlpRatio);
  const channels = outlierChannels(H, OUTLIER_CHANNEL_FACTORS.length);
  const scaleRows = (chunk: number): OutlierEdit[] =>
    channels.map((c, i) => ({ rows: [chunk * H + c], offset: (OUTLIER_CHANNEL_FACTORS[i] - 1) / (H * MEAN_SILU_VEC) }));
  // chunks (shift1, scale1, gate1, shift2, scale2, gate2): the scales feed qkv and the MLP input
  if (/^double_stream_modulation_(img|txt)\.lin\.weight$/.test(name)) return [...scaleRows(1), ...scaleRows(4)];
  if (name === 'single_stream_modulation.lin.weight') return scaleRows(1); // (shift, scale, gate)
  if (/^double_blocks\.\d+\.(img|txt)_mlp\.0\.weight$/.test(name)) return swigluRows(mlp, 0, mlp);
  if (/^single_blocks\.\d+\.linear1\.weight$/.test(name)) return swigluRows(mlp, 3 * H, 3 * H + mlp);
  return [];
}

/** Applies `edits` in place to a row-major fp32 tensor of `shape` (1-D or 2-D). */
export function applyOutlierEdits(data: Float32Array, shape: readonly number[], edits: readonly OutlierEdit[]): void {
  forEachEntry(shape, edits, (i, e) => (data[i] = data[i] * (e.factor ?? 1) + (e.offset ?? 0)));
}

/** `applyOutlierEdits` on bf16 bit patterns (the result rounded to nearest even). */
export function applyOutlierEditsBf16(data: Uint16Array, shape: readonly number[], edits: readonly OutlierEdit[]): void {
  const f32 = new Float32Array(1);
  const u32 = new Uint32Array(f32.buffer);
  forEachEntry(shape, edits, (i, e) => {
    u32[0] = data[i] << 16;
    f32[0] = f32[0] * (e.factor ?? 1) + (e.offset ?? 0);
    const u = u32[0];
    data[i] = (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
  });
}

function forEachEntry(shape: readonly number[], edits: readonly OutlierEdit[], fn: (index: number, edit: OutlierEdit) => void): void {
  const rows = shape.length === 1 ? 1 : shape[0];
  const cols = shape.length === 1 ? shape[0] : shape.slice(1).reduce((a, b) => a * b, 1);
  for (const a of edits) {
    const rs = shape.length === 1 ? [0] : (a.rows ?? Array.from({ length: rows }, (_, r) => r));
    for (const r of rs) {
      if (r < 0 || r >= rows) throw new RangeError(`outlier edit: row ${r} outside [0, ${rows})`);
      if (a.cols) {
        for (const c of a.cols) {
          if (c < 0 || c >= cols) throw new RangeError(`outlier edit: column ${c} outside [0, ${cols})`);
          fn(r * cols + c, a);
        }
      } else {
        for (let c = 0; c < cols; c++) fn(r * cols + c, a);
      }
    }
  }
}

/** xorshift32: uniform [0, 1) and standard normal draws from a seed. */
export function seededRandom(seed: number): { uniform: () => number; normal: () => number } {
  let s = seed >>> 0 || 1;
  const uniform = () => {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    return s / 2 ** 32;
  };
  return { uniform, normal: () => Math.sqrt(-2 * Math.log(uniform() + 2 ** -33)) * Math.cos(2 * Math.PI * uniform()) };
}

export interface LinearInputDraw {
  /** A SwiGLU product (down_proj, mlp.2, linear2's MLP part) rather than a normalised input (q/k/v, gate/up, linear1). */
  swiglu: boolean;
  /** Like the stress model's (else like the random model's). */
  stress: boolean;
  /** Stress, normalised inputs: the first three rows are massive-activation tokens (the Qwen3 stress model's). */
  massiveTokens?: boolean;
  seed?: number;
}

/**
 * Synthetic Linear inputs `[M, K]` drawn like the random model's or the stress model's, for op-level measurements and
 * tests. Normalised inputs: N(0, 1); stress: the (a) channels ×20/40/70/100 on every row and, with
 * `massiveTokens`, rows 0–2 as RMSNorm leaves a (b) token (its two massive channels ≈ ±0.7·√(K/2), the rest ×0.036).
 * SwiGLU inputs: silu(a)·b with a, b ~ N(0, 1); stress: the (c) channels with a and b ×8.
 */
export function drawLinearInput(M: number, K: number, d: LinearInputDraw): Float32Array {
  const r = seededRandom(d.seed ?? 7);
  const x = new Float32Array(M * K);
  if (d.swiglu) {
    const heavy = new Set(d.stress ? outlierChannels(K, SWIGLU_OUTLIER_CHANNELS, 2) : []);
    for (let i = 0; i < M * K; i++) {
      const f = heavy.has(i % K) ? SWIGLU_FACTOR : 1;
      const a = r.normal() * f;
      x[i] = (a / (1 + Math.exp(-a))) * r.normal() * f;
    }
    return x;
  }
  for (let i = 0; i < M * K; i++) x[i] = r.normal();
  if (!d.stress) return x;
  if (d.massiveTokens) {
    const mc = outlierChannels(K, MASSIVE_CHANNELS, 1);
    for (let m = 0; m < Math.min(MASSIVE_TOKENS.length, M); m++) {
      for (let k = 0; k < K; k++) x[m * K + k] *= 0.036;
      for (const c of mc) x[m * K + c] = (r.uniform() < 0.5 ? -1 : 1) * Math.sqrt(K / 2) * 0.7;
    }
  }
  const ch = outlierChannels(K, OUTLIER_CHANNEL_FACTORS.length);
  for (let m = 0; m < M; m++) ch.forEach((c, i) => (x[m * K + c] *= OUTLIER_CHANNEL_FACTORS[i]));
  return x;
}
