// Foreground colour at soft matte edges, and the straight-alpha RGBA that transparent outputs carry.
//
// A matte alone is not enough: at a hair or fur edge the pixel is a mix `I = αF + (1−α)B` of the subject and the
// old backdrop, so putting α on the raw RGB leaves a halo of the backdrop colour. Blur-fusion foreground estimation
// (Forte & Pitié, "Approximate Fast Foreground Colour Estimation", ICIP 2021; BiRefNet's `refine_foreground`)
// recovers F with a handful of box blurs: local means of F and B weighted by α and 1−α, then one correction step
// that makes the estimate satisfy the compositing equation. Two passes: a wide one (r = 90) for a smooth backdrop
// estimate, then a narrow one (r = 6) that starts from it. The maths and border rule follow the reference's torch
// variant (replicate padding + average pooling), which the golden vectors record.

/** Blur radii of the two passes (the reference's defaults). */
export interface ForegroundOptions {
  radius?: number;
  refineRadius?: number;
}

export class MattingError extends Error {
  override name = 'MattingError';
}

/**
 * `mean_blur` of the reference: a k×k box mean over an image padded by edge replication (even k: k/2−1 before,
 * k/2 after; odd k: k//2 both sides), output the input's size. Works on `channels` interleaved planes (HWC).
 * Separable, with prefix sums in float64, so cost is independent of k (k = 90 at 1024² is a few ms per plane).
 */
export function boxBlurReplicate(src: Float32Array, w: number, h: number, channels: number, k: number): Float32Array {
  if (!Number.isInteger(k) || k < 1) throw new MattingError(`blur size must be a positive integer, got ${k}`);
  const before = k % 2 === 0 ? k / 2 - 1 : (k - 1) / 2;
  const C = channels;
  const rowLen = w * C;
  // window of output i on an axis of n samples: [i − before, i − before + k − 1]; samples outside repeat the edge
  const windows = (n: number) => {
    const lo = new Int32Array(n), hi = new Int32Array(n), nFirst = new Int32Array(n), nLast = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      const s = i - before, e = s + k - 1;
      lo[i] = Math.max(s, 0);
      hi[i] = Math.min(e, n - 1);
      nFirst[i] = s < 0 ? Math.min(-s, k) : 0;
      nLast[i] = e > n - 1 ? Math.min(e - (n - 1), k) : 0;
    }
    return { lo, hi, nFirst, nLast };
  };
  // horizontal sums, row by row, from prefix sums per channel
  const tmp = new Float64Array(w * h * C);
  const pre = new Float64Array((w + 1) * C);
  const hw = windows(w);
  for (let y = 0; y < h; y++) {
    const row = y * rowLen;
    for (let x = 0; x < w; x++) for (let c = 0; c < C; c++) pre[(x + 1) * C + c] = pre[x * C + c] + src[row + x * C + c];
    for (let x = 0; x < w; x++) {
      const lo = hw.lo[x], hi = hw.hi[x], a = hw.nFirst[x], b = hw.nLast[x];
      for (let c = 0; c < C; c++) {
        let sum = hi >= lo ? pre[(hi + 1) * C + c] - pre[lo * C + c] : 0;
        if (a) sum += a * src[row + c];
        if (b) sum += b * src[row + (w - 1) * C + c];
        tmp[row + x * C + c] = sum;
      }
    }
  }
  // vertical sums from prefix sums over whole rows (contiguous, cache-friendly)
  const colPre = new Float64Array((h + 1) * rowLen);
  for (let y = 0; y < h; y++) for (let i = 0; i < rowLen; i++) colPre[(y + 1) * rowLen + i] = colPre[y * rowLen + i] + tmp[y * rowLen + i];
  const out = new Float32Array(w * h * C);
  const vw = windows(h);
  const norm = 1 / (k * k);
  const lastRow = (h - 1) * rowLen;
  for (let y = 0; y < h; y++) {
    const lo = vw.lo[y], hi = vw.hi[y], a = vw.nFirst[y], b = vw.nLast[y];
    const o = y * rowLen;
    for (let i = 0; i < rowLen; i++) {
      let sum = hi >= lo ? colPre[(hi + 1) * rowLen + i] - colPre[lo * rowLen + i] : 0;
      if (a) sum += a * tmp[i];
      if (b) sum += b * tmp[lastRow + i];
      out[o + i] = sum * norm;
    }
  }
  return out;
}

/** One blur-fusion step: returns the clamped foreground estimate and the blurred background. HWC, 3 channels. */
function blurFusion(image: Float32Array, fg: Float32Array, bg: Float32Array, alpha: Float32Array, w: number, h: number, r: number): { fg: Float32Array; bg: Float32Array } {
  const n = w * h;
  const fa = new Float32Array(n * 3);
  const b1a = new Float32Array(n * 3);
  for (let i = 0; i < n; i++) {
    const a = alpha[i];
    for (let c = 0; c < 3; c++) {
      fa[i * 3 + c] = fg[i * 3 + c] * a;
      b1a[i * 3 + c] = bg[i * 3 + c] * (1 - a);
    }
  }
  const blurredAlpha = boxBlurReplicate(alpha, w, h, 1, r);
  const blurredFA = boxBlurReplicate(fa, w, h, 3, r);
  const blurredB1A = boxBlurReplicate(b1a, w, h, 3, r);
  const outF = new Float32Array(n * 3);
  const outB = new Float32Array(n * 3);
  for (let i = 0; i < n; i++) {
    const a = alpha[i], ba = blurredAlpha[i];
    for (let c = 0; c < 3; c++) {
      const j = i * 3 + c;
      const bF = blurredFA[j] / (ba + 1e-5);
      const bB = blurredB1A[j] / (1 - ba + 1e-5);
      const f = bF + a * (image[j] - a * bF - (1 - a) * bB);
      outF[j] = f < 0 ? 0 : f > 1 ? 1 : f;
      outB[j] = bB;
    }
  }
  return { fg: outF, bg: outB };
}

function checkSizes(rgb: Uint8Array, alpha: ArrayLike<number>, w: number, h: number): number {
  if (!Number.isInteger(w) || !Number.isInteger(h) || w <= 0 || h <= 0) throw new MattingError(`bad image size ${w}×${h}`);
  const channels = rgb.length / (w * h);
  if (channels !== 3 && channels !== 4) throw new MattingError(`image buffer holds ${rgb.length} bytes, expected ${w}×${h}×3 (RGB) or ×4 (RGBA)`);
  if (alpha.length !== w * h) throw new MattingError(`alpha holds ${alpha.length} values, expected ${w}×${h}`);
  return channels;
}

/**
 * Foreground colours F (HWC, 3 channels, [0, 1]) of an 8-bit RGB(A) image given its matte α (h×w, [0, 1]):
 * the reference's two-pass blur fusion.
 */
export function estimateForeground(rgb: Uint8Array, alpha: Float32Array, w: number, h: number, opts: ForegroundOptions = {}): Float32Array {
  const channels = checkSizes(rgb, alpha, w, h);
  const n = w * h;
  const image = new Float32Array(n * 3);
  for (let i = 0; i < n; i++) for (let c = 0; c < 3; c++) image[i * 3 + c] = rgb[i * channels + c] / 255;
  const first = blurFusion(image, image, image, alpha, w, h, opts.radius ?? 90);
  return blurFusion(image, first.fg, first.bg, alpha, w, h, opts.refineRadius ?? 6).fg;
}

/**
 * Straight (un-premultiplied) RGBA for an image and its matte: foreground colours from `estimateForeground`
 * (or the raw RGB with `refine: false`), alpha rounded to 8 bits, and RGB zeroed where alpha is 0 (invisible
 * pixels then compress to almost nothing in PNG/WebP).
 */
export function cutoutRGBA(rgb: Uint8Array, alpha: Float32Array, w: number, h: number, opts: ForegroundOptions & { refine?: boolean } = {}): Uint8Array {
  const channels = checkSizes(rgb, alpha, w, h);
  const fg = opts.refine === false ? null : estimateForeground(rgb, alpha, w, h, opts);
  const out = new Uint8Array(w * h * 4);
  for (let i = 0; i < w * h; i++) {
    const a = Math.round(Math.min(1, Math.max(0, alpha[i])) * 255);
    out[i * 4 + 3] = a;
    if (a === 0) continue;
    for (let c = 0; c < 3; c++) out[i * 4 + c] = fg ? Math.round(fg[i * 3 + c] * 255) : rgb[i * channels + c];
  }
  return out;
}

/** Floats in [0, 1] to bytes the way torch's `(x * 255).to(uint8)` does: truncation (the reference's route). */
export function truncateToUint8(x: Float32Array): Uint8Array {
  const out = new Uint8Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = Math.min(255, Math.max(0, Math.trunc(Math.fround(x[i] * 255))));
  return out;
}

/** What `cutout` needs from a matting model (BiRefNet's `predict`). */
export interface MattingModel {
  predict(image: Uint8Array, w: number, h: number): Promise<Float32Array>;
}

/**
 * The transparent-background step in one call: matte the 8-bit RGB(A) image with `model`, estimate the foreground
 * colours at the soft edges and return straight RGBA (w×h×4) together with the float matte.
 */
export async function cutout(model: MattingModel, rgb: Uint8Array, w: number, h: number, opts: ForegroundOptions & { refine?: boolean } = {}): Promise<{ rgba: Uint8Array; alpha: Float32Array }> {
  checkSizes(rgb, { length: w * h }, w, h);
  const alpha = await model.predict(rgb, w, h);
  return { rgba: cutoutRGBA(rgb, alpha, w, h, opts), alpha };
}
