// Tiled decoding of large latents: the latent is cut into overlapping tiles, each decoded alone, and the images are
// cross-faded linearly over each overlap, so seams fade rather than cut. Tiles see only their own GroupNorm
// statistics and attention context, so the result is close to, not equal to, the untiled decode
// (docs/benchmarks.md, VAE).

/**
 * Above this many output pixels the decoder tiles by default: untiled, the peak is set by the last upsample's
 * full-resolution activations (docs/benchmarks.md has the measured bytes per pixel).
 */
export const AUTO_TILE_ABOVE_PIXELS = 1536 * 1536;
/** Default largest tile side in latent tokens (96 tokens = 1536 px). */
export const DEFAULT_MAX_TILE = 96;
/** Default least overlap between tiles in latent tokens (16 tokens = 256 px; the error per overlap is measured). */
export const DEFAULT_TILE_OVERLAP = 16;

/**
 * Tiles covering [0, n): as few as possible of at most `maxTile` cells, overlapping by at least `overlap`, all the
 * same size and evenly spread (so no tile is a thin sliver with poor GroupNorm statistics).
 */
export function planTiles(n: number, maxTile: number, overlap: number): { starts: number[]; size: number } {
  if (n <= maxTile) return { starts: [0], size: n };
  if (overlap >= maxTile) throw new Error(`tile overlap ${overlap} must be smaller than the largest tile ${maxTile}`);
  const count = Math.ceil((n - overlap) / (maxTile - overlap));
  const size = Math.ceil((n + (count - 1) * overlap) / count);
  const stride = (n - size) / (count - 1);
  return { starts: Array.from({ length: count }, (_, i) => Math.round(i * stride)), size };
}

export interface TileOptions {
  maxTile: number;
  overlap: number;
  /** Pixels per latent cell side. */
  scale: number;
  outChannels: number;
  onTile?: (done: number, total: number) => void;
}

type Plan = { starts: number[]; size: number };

/** Latent cells `[y0, y0 + th) × [x0, x0 + tw)` of every sample and channel, as their own [B, C, th, tw] tensor. */
function cropLatent(latent: Float32Array, dims: readonly number[], y0: number, x0: number, th: number, tw: number): Float32Array {
  const [B, C, h, w] = dims;
  const part = new Float32Array(B * C * th * tw);
  for (let bc = 0; bc < B * C; bc++) {
    for (let y = 0; y < th; y++) {
      const src = (bc * h + y0 + y) * w + x0;
      part.set(latent.subarray(src, src + tw), (bc * th + y) * tw);
    }
  }
  return part;
}

/**
 * Blend weights along one axis of tile `k` (`n` pixels): 1 inside, ramping linearly across the exact overlap with
 * each neighbour, so the two tiles' weights sum to 1 there.
 */
function ramp(plan: Plan, k: number, scale: number): Float32Array {
  const n = plan.size * scale;
  const s = plan.starts;
  const before = k > 0 ? (s[k - 1] + plan.size - s[k]) * scale : 0;
  const after = k < s.length - 1 ? (s[k] + plan.size - s[k + 1]) * scale : 0;
  return Float32Array.from({ length: n }, (_, i) => {
    let f = 1;
    if (before > 0) f = Math.min(f, (i + 0.5) / before);
    if (after > 0) f = Math.min(f, (n - i - 0.5) / after);
    return f;
  });
}

/** Adds `img` (one decoded tile at pixel offset Y0, X0) times its blend weights into `out`, and the weights into `weight`. */
function accumulate(out: Float32Array, weight: Float32Array, img: Float32Array, o: { planes: number; H: number; W: number; Y0: number; X0: number; wy: Float32Array; wx: Float32Array }): void {
  const PH = o.wy.length;
  const PW = o.wx.length;
  for (let y = 0; y < PH; y++) {
    const row = (o.Y0 + y) * o.W + o.X0;
    for (let x = 0; x < PW; x++) weight[row + x] += o.wy[y] * o.wx[x];
    for (let p = 0; p < o.planes; p++) {
      const dst = p * o.H * o.W + row;
      const src = (p * PH + y) * PW;
      for (let x = 0; x < PW; x++) out[dst + x] += img[src + x] * o.wy[y] * o.wx[x];
    }
  }
}

/** Decodes the latent tile by tile with `run` (an untiled decode) and blends the tiles into one image. */
export async function decodeTiled(
  run: (latent: Float32Array, dims: number[]) => Promise<Float32Array>,
  latent: Float32Array,
  dims: readonly number[],
  o: TileOptions,
): Promise<{ image: Float32Array; dims: number[] }> {
  const [B, C, h, w] = dims;
  const S = o.scale;
  const [H, W] = [h * S, w * S];
  const planes = B * o.outChannels;
  const out = new Float32Array(planes * H * W);
  const weight = new Float32Array(H * W);
  const py = planTiles(h, o.maxTile, o.overlap);
  const px = planTiles(w, o.maxTile, o.overlap);
  const total = py.starts.length * px.starts.length;
  let done = 0;
  for (const [yi, y0] of py.starts.entries()) {
    for (const [xi, x0] of px.starts.entries()) {
      const img = await run(cropLatent(latent, dims, y0, x0, py.size, px.size), [B, C, py.size, px.size]);
      accumulate(out, weight, img, { planes, H, W, Y0: y0 * S, X0: x0 * S, wy: ramp(py, yi, S), wx: ramp(px, xi, S) });
      o.onTile?.(++done, total);
    }
  }
  for (let p = 0; p < planes; p++) {
    const base = p * H * W;
    for (let i = 0; i < H * W; i++) out[base + i] /= weight[i];
  }
  return { image: out, dims: [B, o.outChannels, H, W] };
}
