// Latent plumbing between the VAE and the transformer (spec §2.2, §5, §7), in plain TypeScript:
//   VAE latent [B, 32, H/8, W/8] ⇄ patchified [B, 128, H/16, W/16] (channel c·4 + pi·2 + pj)
//   ⇄ BatchNorm-normalised (running statistics, eps 1e-4) ⇄ row-major tokens [B, h·w, 128] with (t, h, w, l) ids.
// The VAE graphs do the patchify and normalisation themselves; these functions are the same maths for the
// sampler's token handling, reference images and tests. Arithmetic is rounded to float32 at each step like torch.

export const LATENT_BN_EPS = 1e-4;
/** RoPE time offset step between reference images: reference k (0-based) sits at t = 10 + 10·k. */
export const REFERENCE_T_SCALE = 10;

export interface Tensor4 {
  data: Float32Array;
  dims: [number, number, number, number];
}

function check4(dims: readonly number[], what: string): [number, number, number, number] {
  if (dims.length !== 4 || !dims.every((d) => Number.isInteger(d) && d >= 0)) throw new Error(`${what}: expected 4 dims, got [${dims.join(', ')}]`);
  return dims as [number, number, number, number];
}

/** [B, C, H, W] → [B, 4C, H/2, W/2] with new channel c·4 + pi·2 + pj (einops `c (i pi) (j pj) -> (c pi pj) i j`). */
export function patchify(x: Float32Array, dims: readonly number[]): Tensor4 {
  const [B, C, H, W] = check4(dims, 'patchify');
  if (H % 2 || W % 2) throw new Error(`patchify needs even H and W, got ${H}×${W}`);
  const h = H / 2;
  const w = W / 2;
  const out = new Float32Array(x.length);
  for (let b = 0; b < B; b++)
    for (let c = 0; c < C; c++)
      for (let pi = 0; pi < 2; pi++)
        for (let pj = 0; pj < 2; pj++) {
          const oc = c * 4 + pi * 2 + pj;
          for (let i = 0; i < h; i++) {
            const dst = ((b * 4 * C + oc) * h + i) * w;
            const src = ((b * C + c) * H + 2 * i + pi) * W + pj;
            for (let j = 0; j < w; j++) out[dst + j] = x[src + 2 * j];
          }
        }
  return { data: out, dims: [B, 4 * C, h, w] };
}

/** Inverse of `patchify`: [B, 4C, h, w] → [B, C, 2h, 2w]. */
export function unpatchify(x: Float32Array, dims: readonly number[]): Tensor4 {
  const [B, C4, h, w] = check4(dims, 'unpatchify');
  if (C4 % 4) throw new Error(`unpatchify needs a channel count divisible by 4, got ${C4}`);
  const C = C4 / 4;
  const H = 2 * h;
  const W = 2 * w;
  const out = new Float32Array(x.length);
  for (let b = 0; b < B; b++)
    for (let c = 0; c < C; c++)
      for (let pi = 0; pi < 2; pi++)
        for (let pj = 0; pj < 2; pj++) {
          const ic = c * 4 + pi * 2 + pj;
          for (let i = 0; i < h; i++) {
            const src = ((b * C4 + ic) * h + i) * w;
            const dst = ((b * C + c) * H + 2 * i + pi) * W + pj;
            for (let j = 0; j < w; j++) out[dst + 2 * j] = x[src + j];
          }
        }
  return { data: out, dims: [B, C, H, W] };
}

function bnStd(variance: Float32Array, eps: number): Float32Array {
  return variance.map((v) => Math.fround(Math.sqrt(Math.fround(v + eps))));
}

/** `(x − running_mean) / sqrt(running_var + eps)` per channel (BatchNorm2d eval, no affine). */
export function bnNormalize(x: Float32Array, dims: readonly number[], mean: Float32Array, variance: Float32Array, eps = LATENT_BN_EPS): Float32Array {
  return mapWithChannelStats(x, dims, mean, bnStd(variance, eps), 'bnNormalize', (v, m, std) => Math.fround(v - m) / std);
}

/** Inverse of `bnNormalize`: `x · sqrt(running_var + eps) + running_mean`. */
export function bnDenormalize(x: Float32Array, dims: readonly number[], mean: Float32Array, variance: Float32Array, eps = LATENT_BN_EPS): Float32Array {
  return mapWithChannelStats(x, dims, mean, bnStd(variance, eps), 'bnDenormalize', (v, m, std) => Math.fround(v * std) + m);
}

/** `f(value, mean, std)` for every entry of a `[B, C, H, W]` tensor, with its channel's statistics. */
function mapWithChannelStats(x: Float32Array, dims: readonly number[], mean: Float32Array, std: Float32Array, name: string, f: (v: number, mean: number, std: number) => number): Float32Array {
  const [B, C, H, W] = check4(dims, name);
  if (mean.length !== C || std.length !== C) throw new Error(`BatchNorm statistics have ${mean.length}/${std.length} channels, the latent ${C}`);
  const out = new Float32Array(x.length);
  const hw = H * W;
  for (let b = 0; b < B; b++)
    for (let c = 0; c < C; c++) {
      const base = (b * C + c) * hw;
      for (let i = 0; i < hw; i++) out[base + i] = f(x[base + i], mean[c], std[c]);
    }
  return out;
}

/** [B, C, h, w] → row-major tokens [B, h·w, C] (token index = row·w + col). */
export function latentToTokens(x: Float32Array, dims: readonly number[]): { data: Float32Array; dims: [number, number, number] } {
  const [B, C, h, w] = check4(dims, 'latentToTokens');
  const n = h * w;
  const out = new Float32Array(x.length);
  for (let b = 0; b < B; b++)
    for (let c = 0; c < C; c++) {
      const src = (b * C + c) * n;
      for (let t = 0; t < n; t++) out[(b * n + t) * C + c] = x[src + t];
    }
  return { data: out, dims: [B, n, C] };
}

/** Inverse of `latentToTokens`: tokens [B, h·w, C] → [B, C, h, w]. */
export function tokensToLatent(tokens: Float32Array, dims: readonly number[], h: number, w: number): Tensor4 {
  if (dims.length !== 3) throw new Error(`tokensToLatent: expected [B, N, C], got [${dims.join(', ')}]`);
  const [B, n, C] = dims;
  if (n !== h * w) throw new Error(`tokensToLatent: ${n} tokens do not fill a ${h}×${w} grid`);
  const out = new Float32Array(tokens.length);
  for (let b = 0; b < B; b++)
    for (let t = 0; t < n; t++)
      for (let c = 0; c < C; c++) out[(b * C + c) * n + t] = tokens[(b * n + t) * C + c];
  return { data: out, dims: [B, C, h, w] };
}

/** Position ids (t, h, w, l) of an h×w grid of image tokens, row-major: [h·w, 4] int64. */
export function imagePositionIds(h: number, w: number, t = 0): BigInt64Array {
  const ids = new BigInt64Array(h * w * 4);
  const T = BigInt(t);
  for (let r = 0; r < h; r++)
    for (let c = 0; c < w; c++) {
      const k = (r * w + c) * 4;
      ids[k] = T;
      ids[k + 1] = BigInt(r);
      ids[k + 2] = BigInt(c);
    }
  return ids;
}

/** The t coordinate of reference image k (0-based): 10, 20, 30, … */
export function referenceTimeOffset(k: number): number {
  return REFERENCE_T_SCALE + REFERENCE_T_SCALE * k;
}

/**
 * Concatenates reference latents (each [1, 128, h_k, w_k], normalised) into one token sequence [1, Σ h_k·w_k, 128]
 * with ids [1, Σ, 4], in input order, each reference on its own grid at t = 10 + 10·k.
 */
export function referenceTokens(refs: ReadonlyArray<{ data: Float32Array; dims: readonly number[] }>): { tokens: Float32Array; ids: BigInt64Array; count: number; channels: number } {
  if (refs.length === 0) throw new Error('referenceTokens: no reference latents');
  const parts = refs.map((r, k) => {
    const [B, C, h, w] = check4(r.dims, `reference ${k}`);
    if (B !== 1) throw new Error(`reference ${k}: expected batch 1, got ${B}`);
    return { C, tok: latentToTokens(r.data, r.dims).data, ids: imagePositionIds(h, w, referenceTimeOffset(k)), n: h * w };
  });
  const C = parts[0].C;
  if (parts.some((p) => p.C !== C)) throw new Error('reference latents have different channel counts');
  const count = parts.reduce((a, p) => a + p.n, 0);
  const tokens = new Float32Array(count * C);
  const ids = new BigInt64Array(count * 4);
  let at = 0;
  for (const p of parts) {
    tokens.set(p.tok, at * C);
    ids.set(p.ids, at * 4);
    at += p.n;
  }
  return { tokens, ids, count, channels: C };
}
