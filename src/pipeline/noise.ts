// Seeded Gaussian noise for the initial latents, reproducible on every platform and independent of torch.
//
// RNG: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), a counter-based
// generator: block k of 4 uint32 is philox(key = seed, counter = k), so any element can be drawn without drawing
// the ones before it and no state is carried between calls. Each pair of uint32 becomes a pair of standard
// normals by Box–Muller (u = (bits + 0.5) / 2^32, never 0 or 1). Normal number j is element j of the latent in
// NCHW order `[128, H/16, W/16]`, which is then flattened row-major into tokens `(h·W/16 + w, c)` as the
// reference packs its noise. Same seed and size ⇒ the same latent, bit for bit; image i of a batch uses seed + i.
// (torch's CUDA/CPU streams cannot be reproduced outside torch, so images differ from the reference CLI's.)

const M0 = 0xd2511f53;
const M1 = 0xcd9e8d57;
const W0 = 0x9e3779b9;
const W1 = 0xbb67ae85;

/** High 32 bits of the 64-bit product of two uint32 (exact in float64 pieces). */
function mulhi(a: number, b: number): number {
  const al = a & 0xffff;
  const ah = a >>> 16;
  const bl = b & 0xffff;
  const bh = b >>> 16;
  const ll = al * bl;
  const lh = al * bh;
  const hl = ah * bl;
  const mid = (ll >>> 16) + (lh & 0xffff) + (hl & 0xffff);
  return (ah * bh + Math.floor(lh / 65536) + Math.floor(hl / 65536) + Math.floor(mid / 65536)) >>> 0;
}

/** Philox4x32-10 of counter (c0..c3) with key (k0, k1); writes 4 uint32 into `out`. */
export function philox4x32(c0: number, c1: number, c2: number, c3: number, k0: number, k1: number, out: Uint32Array): void {
  for (let r = 0; r < 10; r++) {
    const hi0 = mulhi(M0, c0);
    const lo0 = Math.imul(M0, c0) >>> 0;
    const hi1 = mulhi(M1, c2);
    const lo1 = Math.imul(M1, c2) >>> 0;
    c0 = (hi1 ^ c1 ^ k0) >>> 0;
    c1 = lo1;
    c2 = (hi0 ^ c3 ^ k1) >>> 0;
    c3 = lo0;
    k0 = (k0 + W0) >>> 0;
    k1 = (k1 + W1) >>> 0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

export function checkSeed(seed: number): void {
  if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`seed must be an integer from 0 to ${Number.MAX_SAFE_INTEGER}, got ${seed}`);
}

/** `count` standard normal float32 values for `seed`, element j from Philox block ⌊j/4⌋. */
export function gaussianNoise(seed: number, count: number): Float32Array {
  checkSeed(seed);
  const k0 = seed >>> 0;
  const k1 = Math.floor(seed / 2 ** 32) >>> 0;
  const out = new Float32Array(count);
  const bits = new Uint32Array(4);
  const TWO_PI = 2 * Math.PI;
  const INV = 1 / 2 ** 32;
  for (let j = 0, block = 0; j < count; j += 4, block++) {
    philox4x32(block >>> 0, Math.floor(block / 2 ** 32) >>> 0, 0, 0, k0, k1, bits);
    for (let p = 0; p < 2; p++) {
      const u1 = (bits[2 * p] + 0.5) * INV;
      const u2 = (bits[2 * p + 1] + 0.5) * INV;
      const r = Math.sqrt(-2 * Math.log(u1));
      const i = j + 2 * p;
      if (i < count) out[i] = r * Math.cos(TWO_PI * u2);
      if (i + 1 < count) out[i + 1] = r * Math.sin(TWO_PI * u2);
    }
  }
  return out;
}

/** NCHW `[C, h, w]` → tokens `[h·w, C]` (einops "c h w -> (h w) c"). */
export function nchwToTokens(x: Float32Array, c: number, h: number, w: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let ch = 0; ch < c; ch++) {
    for (let p = 0; p < h * w; p++) out[p * c + ch] = x[ch * h * w + p];
  }
  return out;
}

/** The initial noisy latent of one image as transformer tokens `[(H/16)(W/16), 128]`. */
export function initialLatentTokens(seed: number, width: number, height: number, channels = 128): Float32Array {
  const h = Math.floor(height / 16);
  const w = Math.floor(width / 16);
  return nchwToTokens(gaussianNoise(seed, channels * h * w), channels, h, w);
}
