// Turning a validated model input into a pipeline request: sizes, seeds, and the reference images of an edit
// (data URIs decoded, URLs fetched under the SSRF policy and size/time caps, every image checked by decoding it).
import sharp, { type Metadata } from 'sharp';
import type { GenerateRequest } from '../pipeline/types.ts';
import type { ServiceConfig } from './config.ts';
import { fieldError } from './errors.ts';
import { checkUrl, FetchError, guardedRequest, parseDataUri } from './net.ts';
import { LIMITS, sizeFromReference } from '../pipeline/limits.ts';
import { type ModelInput, requestedSize } from './models.ts';
import { runLoras } from './loras.ts';

export class InputError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
  }
}

const IMAGE_FORMATS = new Set(['png', 'jpeg', 'webp']);
const MAX_REF_PIXELS = LIMITS.maxReferencePixels;

/**
 * Creation-time checks of image_urls that need no network: scheme and literal addresses of URLs, and inline data
 * URIs decoded in full, so a bad inline image (not an image, truncated, a decompression bomb) is a 422 at once
 * instead of a stored run that can only fail.
 */
export async function precheckImageUrls(urls: string[], cfg: ServiceConfig): Promise<void> {
  for (const [i, u] of urls.entries()) {
    const loc = ['body', 'input', 'image_urls', i];
    if (u.startsWith('data:')) {
      const d = parseDataUri(u);
      if (!d || !/^image\/(png|jpeg|webp)$/.test(d.mime)) throw fieldError(loc, 'data URIs must be base64 PNG, JPEG or WebP images', 'invalid_image');
      if (d.bytes.length > cfg.inputs.maxBytes) throw fieldError(loc, `image is ${d.bytes.length} bytes, the limit is ${cfg.inputs.maxBytes}`, 'too_large');
      try {
        await checkImage(d.bytes, i);
      } catch (e) {
        if (e instanceof InputError) throw fieldError(loc, e.message, 'invalid_image');
        throw e;
      }
      continue;
    }
    try {
      checkUrl(u, cfg.inputs);
    } catch (e) {
      if (e instanceof FetchError) throw fieldError(loc, e.message, e.code === 'BLOCKED' ? 'ssrf_blocked' : 'invalid_url');
      throw e;
    }
  }
}

/**
 * The header first (format, declared size: a few-KB file may declare a gigapixel image), then a full decode that
 * fails on truncated data. The pixel cap goes to libvips too, so nothing larger is ever allocated.
 */
async function checkImage(bytes: Buffer, index: number): Promise<{ width: number; height: number }> {
  let meta: Metadata;
  try {
    meta = await sharp(bytes, { limitInputPixels: false }).metadata();
  } catch {
    throw new InputError('INPUT_VALIDATION_FAILED', `image_urls[${index}] is not a decodable image`);
  }
  if (!meta.format || !IMAGE_FORMATS.has(meta.format) || !meta.width || !meta.height) {
    throw new InputError('INPUT_VALIDATION_FAILED', `image_urls[${index}] must be PNG, JPEG or WebP (got ${meta.format ?? 'unknown'})`);
  }
  if (meta.width * meta.height > MAX_REF_PIXELS) {
    throw new InputError('INPUT_VALIDATION_FAILED', `image_urls[${index}] is ${meta.width}×${meta.height}; at most ${MAX_REF_PIXELS} pixels`);
  }
  try {
    await sharp(bytes, { failOn: 'truncated', limitInputPixels: MAX_REF_PIXELS }).raw().toBuffer();
  } catch (e) {
    throw new InputError('INPUT_VALIDATION_FAILED', `image_urls[${index}] is damaged or truncated: ${(e as Error).message.slice(0, 200)}`);
  }
  return { width: meta.width, height: meta.height };
}

export interface Reference {
  bytes: Uint8Array;
  width: number;
  height: number;
}

export async function loadReference(u: string, index: number, cfg: ServiceConfig): Promise<Reference> {
  let bytes: Buffer;
  const d = parseDataUri(u);
  if (d) bytes = d.bytes;
  else {
    try {
      const res = await guardedRequest(u, { timeoutMs: cfg.inputs.timeoutMs, maxBytes: cfg.inputs.maxBytes, maxRedirects: cfg.inputs.maxRedirects, policy: cfg.inputs });
      if (res.status !== 200) throw new InputError('INPUT_FETCH_FAILED', `image_urls[${index}]: HTTP ${res.status}`);
      bytes = res.body;
    } catch (e) {
      if (e instanceof InputError) throw e;
      const code = e instanceof FetchError && e.code === 'BLOCKED' ? 'INPUT_URL_BLOCKED' : 'INPUT_FETCH_FAILED';
      throw new InputError(code, `image_urls[${index}]: ${(e as Error).message}`);
    }
  }
  const { width, height } = await checkImage(bytes, index);
  return { bytes, width, height };
}

export function buildRequest(input: ModelInput, seed: number, refs: Reference[]): GenerateRequest {
  const size = requestedSize(input) ?? sizeFromReference(refs[0].width, refs[0].height);
  return {
    prompt: input.prompt,
    width: size.width,
    height: size.height,
    seed,
    numImages: input.num_images,
    steps: input.num_inference_steps,
    guidance: input.guidance_scale,
    outputFormat: input.output_format,
    // runs stored before the field existed have none: the pipeline's default (auto = opaque) is what they asked for
    ...(input.background ? { background: input.background } : {}),
    // set by the OpenAI-compatible routes and MCP tools (output_compression); the Runflow schema has no such field
    ...('output_quality' in input && typeof input.output_quality === 'number' ? { quality: input.output_quality } : {}),
    ...(refs.length ? { referenceImages: refs.map((r) => r.bytes) } : {}),
    // the files submit resolved (a URL's or Hub reference's cached download), at the scales asked for
    ...(input.loras?.length ? { loras: runLoras(input) } : {}),
  };
}
