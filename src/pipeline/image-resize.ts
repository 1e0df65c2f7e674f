// Resizing and normalisation of images as PyTorch/Pillow reference pipelines do them, bit for bit where the
// reference is 8-bit (Pillow's fixed-point resampler), in float32 where it is torch. The matting model's pre- and
// post-processing (matting-model.ts) is built from these, so its input equals the reference's exactly.

/** ImageNet statistics of torchvision's `Normalize` (BiRefNet's preprocessing). */
export const IMAGENET_MEAN = [0.485, 0.456, 0.406] as const;
export const IMAGENET_STD = [0.229, 0.224, 0.225] as const;

export type ResampleFilter = 'bilinear' | 'bicubic';

/**
 * Pillow's `Image.resize(..., BILINEAR)` on 8-bit images, reproduced exactly: a separable triangle filter whose
 * support widens with the downscale factor (antialiasing), 22-bit fixed-point coefficients, horizontal pass first
 * into an 8-bit intermediate. This is what torchvision's `Resize` does to a PIL image. Also BICUBIC (a = −0.5).
 * `src` is HWC with `channels` interleaved channels.
 */
export function pilResize(src: Uint8Array, sw: number, sh: number, channels: number, dw: number, dh: number, filter: ResampleFilter = 'bilinear'): Uint8Array {
  if (src.length !== sw * sh * channels) throw new RangeError(`image buffer holds ${src.length} bytes, expected ${sw}×${sh}×${channels}`);
  let cur = src, cw = sw;
  if (dw !== sw) {
    cur = resample1d(cur, { w: cw, h: sh, channels }, dw, true, filter);
    cw = dw;
  }
  if (dh !== sh) cur = resample1d(cur, { w: cw, h: sh, channels }, dh, false, filter);
  return cur === src ? Uint8Array.from(src) : cur;
}

const PRECISION_BITS = 32 - 8 - 2;

function filterFn(kind: ResampleFilter): { f: (x: number) => number; support: number } {
  if (kind === 'bilinear') return { f: (x) => (Math.abs(x) < 1 ? 1 - Math.abs(x) : 0), support: 1 };
  const a = -0.5;
  return {
    f: (x0) => {
      const x = Math.abs(x0);
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
    support: 2,
  };
}

/** Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output sample, its first input and fixed-point taps. */
function coeffs(inSize: number, outSize: number, kind: ResampleFilter): { bounds: Int32Array; kk: Int32Array; ksize: number } {
  const { f, support: fs0 } = filterFn(kind);
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = fs0 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      k[x] = f((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (let x = 0; x < ksize; x++) {
      const v = x < xmax ? (ww !== 0 ? k[x] / ww : k[x]) : 0;
      kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * (1 << PRECISION_BITS)) : Math.trunc(0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { bounds, kk, ksize };
}

function clip8(v: number): number {
  const r = Math.floor(v / (1 << PRECISION_BITS)); // arithmetic shift; sums exceed int32 range only in Pillow's overflow-free domain
  return r < 0 ? 0 : r > 255 ? 255 : r;
}

/** One separable pass of `pilResize` along the width (`horizontal`) or the height, to `out` samples. */
function resample1d(src: Uint8Array, { w, h, channels }: { w: number; h: number; channels: number }, out: number, horizontal: boolean, kind: ResampleFilter): Uint8Array {
  const { bounds, kk, ksize } = coeffs(horizontal ? w : h, out, kind);
  const ow = horizontal ? out : w, oh = horizontal ? h : out;
  const dst = new Uint8Array(ow * oh * channels);
  const half = 1 << (PRECISION_BITS - 1);
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      const o = horizontal ? x : y;
      const min = bounds[o * 2], n = bounds[o * 2 + 1];
      for (let c = 0; c < channels; c++) {
        let ss = half;
        for (let i = 0; i < n; i++) {
          const si = horizontal ? (y * w + min + i) * channels + c : ((min + i) * w + x) * channels + c;
          ss += src[si] * kk[o * ksize + i];
        }
        dst[(y * ow + x) * channels + c] = clip8(ss);
      }
    }
  }
  return dst;
}

/** `ToTensor` + `Normalize(IMAGENET_MEAN, IMAGENET_STD)` in float32, as torch computes it: `(u8/255 − mean) / std`, NCHW. */
export function normalizeImage(rgb: Uint8Array, w: number, h: number, channels = 3): Float32Array {
  const out = new Float32Array(3 * w * h);
  const fr = Math.fround;
  for (let c = 0; c < 3; c++) {
    const m = fr(IMAGENET_MEAN[c]), s = fr(IMAGENET_STD[c]);
    for (let i = 0; i < w * h; i++) out[c * w * h + i] = fr(fr(rgb[i * channels + c] / 255) - m) / s;
  }
  return out;
}

/** `F.interpolate(x, (dh, dw), mode='bilinear', align_corners=True)` of one channel. */
export function resizeBilinearAlignCorners(src: Float32Array, sw: number, sh: number, dw: number, dh: number): Float32Array {
  const out = new Float32Array(dw * dh);
  const sy = dh > 1 ? (sh - 1) / (dh - 1) : 0;
  const sx = dw > 1 ? (sw - 1) / (dw - 1) : 0;
  for (let y = 0; y < dh; y++) {
    const fy = y * sy;
    const y0 = Math.min(Math.floor(fy), sh - 1), y1 = Math.min(y0 + 1, sh - 1), ly = fy - y0;
    for (let x = 0; x < dw; x++) {
      const fx = x * sx;
      const x0 = Math.min(Math.floor(fx), sw - 1), x1 = Math.min(x0 + 1, sw - 1), lx = fx - x0;
      const top = src[y0 * sw + x0] * (1 - lx) + src[y0 * sw + x1] * lx;
      const bot = src[y1 * sw + x0] * (1 - lx) + src[y1 * sw + x1] * lx;
      out[y * dw + x] = top * (1 - ly) + bot * ly;
    }
  }
  return out;
}

/** A float NCHW RGB image in [0, 1] as 8-bit HWC (rounded), the form a PIL-based reference sees. */
export function floatNchwToUint8(img: Float32Array, w: number, h: number): Uint8Array {
  if (img.length !== 3 * w * h) throw new RangeError(`float image holds ${img.length} values, expected 3×${h}×${w} (NCHW)`);
  const out = new Uint8Array(w * h * 3);
  for (let c = 0; c < 3; c++) for (let i = 0; i < w * h; i++) out[i * 3 + c] = Math.round(Math.min(1, Math.max(0, img[c * w * h + i])) * 255);
  return out;
}
