// Pixels in and out of the engine, with sharp (libvips):
//   bytes (PNG/JPEG/WebP) → checked header → RGB uint8 HWC → [-1, 1] float NCHW   (inputs, reference images)
//   float NCHW → uint8 HWC (BFL truncation or diffusers rounding) → PNG/JPEG/WebP bytes   (outputs)
// Every bad input becomes an ImageInputError with a stable `code`; the service maps it to HTTP 422.
import sharp from 'sharp';
import { LIMITS } from './limits.ts';

export type ImageFormat = 'png' | 'jpeg' | 'webp';

export type ImageErrorCode =
  | 'not_an_image' // bytes that are no PNG, JPEG or WebP at all
  | 'unsupported_format' // an image, but not one of ours (GIF, TIFF, AVIF, SVG, …)
  | 'truncated_image' // a header that promises more data than the file holds
  | 'image_too_large' // more pixels than the limit (decompression bombs), refused from the header alone
  | 'image_too_small' // a reference side under 64 px
  | 'bad_aspect_ratio' // a reference wider or taller than 8:1
  | 'invalid_image'; // any other decode failure

export class ImageInputError extends Error {
  override name = 'ImageInputError';
  constructor(
    readonly code: ImageErrorCode,
    message: string,
  ) {
    super(message);
  }
}

/** Largest input accepted by default (see limits.ts). */
export const DEFAULT_MAX_INPUT_PIXELS = LIMITS.maxReferencePixels;

/** Reference constraints of BFL `cap_min_pixels`. */
export const MIN_REFERENCE_SIDE = 64;
export const MAX_REFERENCE_ASPECT = 8;

/** An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC). */
export interface RgbImage {
  data: Uint8Array;
  width: number;
  height: number;
}

/** Recognises our three formats by their magic bytes, before libvips parses anything. */
export function sniffFormat(bytes: Uint8Array): ImageFormat | null {
  const b = bytes;
  if (b.length >= 8 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47 && b[4] === 0x0d && b[5] === 0x0a && b[6] === 0x1a && b[7] === 0x0a) return 'png';
  if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return 'jpeg';
  if (b.length >= 12 && String.fromCharCode(b[0], b[1], b[2], b[3]) === 'RIFF' && String.fromCharCode(b[8], b[9], b[10], b[11]) === 'WEBP') return 'webp';
  return null;
}

function otherImageKind(b: Uint8Array): string | null {
  const head = Buffer.from(b.subarray(0, 64)).toString('latin1');
  if (head.startsWith('GIF8')) return 'GIF';
  if (head.startsWith('II*\0') || head.startsWith('MM\0*')) return 'TIFF';
  if (head.startsWith('BM')) return 'BMP';
  if (head.slice(4, 8) === 'ftyp') return 'AVIF/HEIF';
  if (/^\s*(<\?xml|<svg)/i.test(head)) return 'SVG';
  return null;
}

function mapSharpError(e: unknown, format: string): ImageInputError {
  const msg = e instanceof Error ? e.message : String(e);
  if (/pixel limit/i.test(msg)) return new ImageInputError('image_too_large', `image exceeds the pixel limit: ${msg}`);
  if (/premature end|end of (stream|file|data)|truncated|not enough data|read error|unexpected end|short read|corrupt/i.test(msg)) {
    return new ImageInputError('truncated_image', `the ${format.toUpperCase()} data is truncated or corrupt: ${msg.split('\n')[0]}`);
  }
  if (/unsupported image format/i.test(msg)) return new ImageInputError('not_an_image', 'the data is not a PNG, JPEG or WebP image');
  return new ImageInputError('invalid_image', `cannot decode the ${format.toUpperCase()} image: ${msg.split('\n')[0]}`);
}

export interface ProbeResult {
  format: ImageFormat;
  /** Size after the EXIF orientation is applied. */
  width: number;
  height: number;
  hasAlpha: boolean;
}

/**
 * Reads and checks only the header: format, size (EXIF-oriented) and the pixel limit. Nothing is decoded, so a
 * decompression bomb costs a few microseconds, not gigabytes.
 */
export async function probeImage(bytes: Uint8Array, opts: { maxPixels?: number } = {}): Promise<ProbeResult> {
  if (!(bytes instanceof Uint8Array) || bytes.length === 0) throw new ImageInputError('not_an_image', 'the image is empty');
  const format = sniffFormat(bytes);
  if (!format) {
    const other = otherImageKind(bytes);
    if (other) throw new ImageInputError('unsupported_format', `${other} images are not supported; send PNG, JPEG or WebP`);
    throw new ImageInputError('not_an_image', 'the data is not a PNG, JPEG or WebP image');
  }
  const maxPixels = opts.maxPixels ?? DEFAULT_MAX_INPUT_PIXELS;
  let meta: Awaited<ReturnType<ReturnType<typeof sharp>['metadata']>>;
  try {
    meta = await sharp(bytes, { limitInputPixels: false }).metadata();
  } catch (e) {
    throw mapSharpError(e, format);
  }
  if (!meta.width || !meta.height) throw new ImageInputError('invalid_image', `the ${format.toUpperCase()} header has no image size`);
  const pixels = meta.width * meta.height;
  if (pixels > maxPixels) {
    throw new ImageInputError('image_too_large', `image is ${meta.width}×${meta.height} = ${pixels} pixels, more than the limit of ${maxPixels}`);
  }
  const oriented = meta.autoOrient ?? { width: meta.width, height: meta.height };
  return { format, width: oriented.width, height: oriented.height, hasAlpha: !!meta.hasAlpha };
}

export interface DecodeOptions {
  maxPixels?: number;
  /**
   * Background that transparent pixels are composited onto. Default white. (PIL's `convert("RGB")` in the
   * reference just drops alpha, which exposes whatever colour the encoder left under transparent pixels — often
   * black, sometimes garbage; compositing gives the picture the user saw.)
   */
  background?: { r: number; g: number; b: number };
  /** Resize to exactly this size (LANCZOS-3), after orientation. */
  resize?: { width: number; height: number };
  /** Crop this box (after the resize). */
  crop?: { left: number; top: number; width: number; height: number };
}

/** Decodes to 8-bit sRGB, EXIF orientation applied, alpha composited. Checks the header first (`probeImage`). */
export async function decodeImage(bytes: Uint8Array, opts: DecodeOptions = {}): Promise<RgbImage> {
  const probe = await probeImage(bytes, opts);
  const maxPixels = opts.maxPixels ?? DEFAULT_MAX_INPUT_PIXELS;
  try {
    // failOn 'truncated' refuses files that end early instead of returning a half-grey picture
    let p = sharp(bytes, { limitInputPixels: maxPixels, failOn: 'truncated', autoOrient: true });
    if (probe.hasAlpha) p = p.flatten({ background: opts.background ?? { r: 255, g: 255, b: 255 } });
    p = p.toColourspace('srgb').removeAlpha();
    if (opts.resize && (opts.resize.width !== probe.width || opts.resize.height !== probe.height)) {
      p = p.resize(opts.resize.width, opts.resize.height, { fit: 'fill', kernel: 'lanczos3' });
    }
    if (opts.crop) p = p.extract(opts.crop);
    const { data, info } = await p.raw({ depth: 'uchar' }).toBuffer({ resolveWithObject: true });
    if (info.channels !== 3) throw new Error(`decoder produced ${info.channels} channels`);
    return { data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength), width: info.width, height: info.height };
  } catch (e) {
    throw e instanceof ImageInputError ? e : mapSharpError(e, probe.format);
  }
}

/** uint8 HWC → [1, 3, H, W] in [-1, 1], the reference's float32 arithmetic: `2 · (u / 255) − 1`. */
export function rgbToTensor(img: RgbImage): { data: Float32Array; dims: [number, number, number, number] } {
  const { width: W, height: H, data } = img;
  if (data.length !== W * H * 3) throw new Error(`RGB image of ${W}×${H} needs ${W * H * 3} bytes, has ${data.length}`);
  const lut = new Float32Array(256);
  for (let u = 0; u < 256; u++) lut[u] = Math.fround(Math.fround(2 * Math.fround(u / 255)) - 1);
  const out = new Float32Array(3 * H * W);
  const plane = H * W;
  for (let i = 0; i < plane; i++) {
    out[i] = lut[data[3 * i]];
    out[plane + i] = lut[data[3 * i + 1]];
    out[2 * plane + i] = lut[data[3 * i + 2]];
  }
  return { data: out, dims: [1, 3, H, W] };
}

/**
 * float → uint8 rules:
 * - `truncate`: BFL CLI, `(127.5 · (clamp(x, −1, 1) + 1)).byte()` — truncation, biased down by half a level.
 * - `round`: diffusers `postprocess`, `round(255 · clamp(x/2 + 0.5, 0, 1))` with numpy's round-half-to-even.
 * Default `round`: unbiased (mean error 0 instead of −0.5 levels, max error 0.5 instead of 1) and what the
 * diffusers-based hosted APIs return; the two differ by at most 1 level.
 */
export type Uint8Rule = 'truncate' | 'round';
export const DEFAULT_UINT8_RULE: Uint8Rule = 'round';

export function toUint8Truncate(x: number): number {
  if (Number.isNaN(x)) return 0;
  const c = x < -1 ? -1 : x > 1 ? 1 : x;
  return Math.trunc(Math.fround(127.5 * Math.fround(c + 1)));
}

export function toUint8Round(x: number): number {
  if (Number.isNaN(x)) return 0;
  const b = Math.fround(Math.fround(x / 2) + 0.5);
  const c = b < 0 ? 0 : b > 1 ? 1 : b;
  const q = Math.fround(255 * c);
  const f = Math.floor(q);
  const d = q - f;
  return d > 0.5 ? f + 1 : d < 0.5 ? f : f % 2 === 0 ? f : f + 1;
}

/** Image `index` of an NCHW [B, 3, H, W] float batch → uint8 HWC. */
export function tensorToRgb(x: Float32Array, dims: readonly number[], index = 0, rule: Uint8Rule = DEFAULT_UINT8_RULE): RgbImage {
  const [B, C, H, W] = dims;
  if (dims.length !== 4 || C !== 3) throw new Error(`expected an image batch [B, 3, H, W], got [${dims.join(', ')}]`);
  if (index < 0 || index >= B) throw new Error(`image ${index} of a batch of ${B}`);
  const conv = rule === 'truncate' ? toUint8Truncate : toUint8Round;
  const plane = H * W;
  const base = index * 3 * plane;
  const out = new Uint8Array(3 * plane);
  for (let c = 0; c < 3; c++) for (let i = 0; i < plane; i++) out[3 * i + c] = conv(x[base + c * plane + i]);
  return { data: out, width: W, height: H };
}

export interface EncodeOptions {
  /** 1–100 for JPEG and WebP (default 90); PNG is lossless and ignores it. */
  quality?: number;
}

export const CONTENT_TYPES: Record<ImageFormat, 'image/png' | 'image/jpeg' | 'image/webp'> = { png: 'image/png', jpeg: 'image/jpeg', webp: 'image/webp' };

/** An 8-bit straight (un-premultiplied) RGBA image, HWC: the transparent-background outputs. */
export interface RgbaImage {
  data: Uint8Array;
  width: number;
  height: number;
  channels: 4;
}

/**
 * Encodes an RGB or straight-alpha RGBA image. No metadata is written (sharp strips it by default). RGBA goes to
 * 8-bit RGBA PNG or to WebP with a losslessly coded alpha plane (alphaQuality 100: the matte's levels survive
 * exactly, only the colour is lossy); JPEG has no alpha and is refused rather than flattened.
 */
export async function encodeImage(img: RgbImage | RgbaImage, format: ImageFormat, opts: EncodeOptions = {}): Promise<Uint8Array> {
  const quality = opts.quality ?? 90;
  if (!Number.isInteger(quality) || quality < 1 || quality > 100) throw new RangeError(`quality must be an integer from 1 to 100, got ${quality}`);
  const channels = 'channels' in img ? img.channels : 3;
  if (channels !== 3 && channels !== 4) throw new RangeError(`images have 3 (RGB) or 4 (RGBA) channels, got ${String(channels)}`);
  const kind = channels === 4 ? 'RGBA' : 'RGB';
  if (img.data.length !== img.width * img.height * channels) throw new Error(`${kind} image of ${img.width}×${img.height} needs ${img.width * img.height * channels} bytes`);
  if (channels === 4 && format === 'jpeg') throw new RangeError('JPEG has no alpha channel: encode RGBA images as png or webp');
  const p = sharp(img.data, { raw: { width: img.width, height: img.height, channels } });
  let out: Buffer;
  switch (format) {
    case 'png':
      out = await p.png({ compressionLevel: 6 }).toBuffer();
      break;
    case 'jpeg':
      out = await p.jpeg({ quality, chromaSubsampling: quality >= 90 ? '4:4:4' : '4:2:0' }).toBuffer();
      break;
    case 'webp':
      out = await (channels === 4 ? p.webp({ quality, alphaQuality: 100 }) : p.webp({ quality })).toBuffer();
      break;
    default:
      throw new RangeError(`unknown output format ${String(format)}; use png, jpeg or webp`);
  }
  return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
}

// ---------------------------------------------------------------------------------------------------------------
// Reference images (spec §7, BFL `default_prep`): RGB → check sides/aspect → cap pixels (LANCZOS) → centre-crop to
// multiples of 16 → [-1, 1].

/** BFL's pixel cap: 2024² for a single reference, 1024² when there are several. */
export function referencePixelLimit(numReferences: number): number {
  return numReferences > 1 ? 1024 * 1024 : 2024 * 2024;
}

/** Size after the reference's pixel cap: unchanged below the limit, else scaled by √(limit/px) and truncated. */
export function capPixelsSize(width: number, height: number, limit: number): { width: number; height: number } {
  if (width * height <= limit) return { width, height };
  const s = Math.sqrt(limit / (width * height));
  return { width: Math.trunc(width * s), height: Math.trunc(height * s) };
}

/** The centred box whose sides are the largest multiples of `m` (BFL `center_crop_to_multiple_of_x`). */
export function centreCropBox(width: number, height: number, m = 16): { left: number; top: number; width: number; height: number } {
  const w = Math.floor(width / m) * m;
  const h = Math.floor(height / m) * m;
  return { left: Math.floor((width - w) / 2), top: Math.floor((height - h) / 2), width: w, height: h };
}

export interface PreparedReference {
  /** [1, 3, H, W] in [-1, 1], H and W multiples of 16. */
  tensor: Float32Array;
  dims: [number, number, number, number];
  width: number;
  height: number;
  /** Size of the input after orientation, before the cap and crop. */
  originalWidth: number;
  originalHeight: number;
}

/** Decodes and preprocesses one reference image exactly as the reference pipeline does (see module comment). */
export async function prepareReferenceImage(bytes: Uint8Array, opts: { numReferences?: number; maxPixels?: number; pixelLimit?: number; background?: DecodeOptions['background'] } = {}): Promise<PreparedReference> {
  const probe = await probeImage(bytes, opts);
  const { width, height } = probe;
  if (width < MIN_REFERENCE_SIDE || height < MIN_REFERENCE_SIDE) {
    throw new ImageInputError('image_too_small', `reference image is ${width}×${height}; both sides must be at least ${MIN_REFERENCE_SIDE} pixels`);
  }
  if (width / height > MAX_REFERENCE_ASPECT || height / width > MAX_REFERENCE_ASPECT) {
    throw new ImageInputError('bad_aspect_ratio', `reference image is ${width}×${height}; the aspect ratio must be at most ${MAX_REFERENCE_ASPECT}:1`);
  }
  const capped = capPixelsSize(width, height, opts.pixelLimit ?? referencePixelLimit(opts.numReferences ?? 1));
  const crop = centreCropBox(capped.width, capped.height, 16);
  const full = crop.width === capped.width && crop.height === capped.height;
  const rgb = await decodeImage(bytes, { maxPixels: opts.maxPixels, background: opts.background, resize: capped, crop: full ? undefined : crop });
  const t = rgbToTensor(rgb);
  return { tensor: t.data, dims: t.dims, width: rgb.width, height: rgb.height, originalWidth: width, originalHeight: height };
}
