// Validation of a GenerateRequest against the model variant, before anything heavy is loaded. Every rejection is a
// PipelineInputError with a stable code (the service answers 422 with it; the CLI exits 2).
import type { VariantInfo } from '../weights/model-folder.ts';
import type { Background, GenerateRequest, OutputFormat } from './types.ts';

export type PipelineInputCode =
  | 'invalid_prompt'
  | 'invalid_size'
  | 'invalid_seed'
  | 'invalid_num_images'
  | 'invalid_steps'
  | 'invalid_guidance'
  | 'invalid_format'
  | 'invalid_quality'
  | 'too_many_references'
  | 'invalid_background'
  | 'transparent_needs_alpha_format';

export class PipelineInputError extends Error {
  override name = 'PipelineInputError';
  constructor(
    readonly code: PipelineInputCode,
    message: string,
    /** The request field at fault. */
    readonly field?: string,
  ) {
    super(message);
  }
}

/** Output sides are multiples of 16 (8× VAE downsampling × 2×2 patches). */
export const SIZE_MULTIPLE = 16;
export const MIN_SIDE = 64;
/** 4 MP (2048²): the product limit; the schedule is fitted to ~1.1 MP and extrapolated beyond. */
export const MAX_PIXELS = 2048 * 2048;
export const MAX_IMAGES = 4;
export const MAX_REFERENCES = 4;
export const MAX_STEPS = 100;
export const MAX_GUIDANCE = 20;
export const MAX_SEED = Number.MAX_SAFE_INTEGER;
const FORMATS: readonly OutputFormat[] = ['png', 'jpeg', 'webp'];
const BACKGROUNDS: readonly Background[] = ['auto', 'opaque', 'transparent'];
/** Formats that carry an alpha channel (JPEG has none). */
export const ALPHA_FORMATS: readonly OutputFormat[] = ['png', 'webp'];

/** The fal / Runflow `image_size` presets (width × height). */
export const SIZE_PRESETS: Record<string, { width: number; height: number }> = {
  square_hd: { width: 1024, height: 1024 },
  square: { width: 512, height: 512 },
  portrait_4_3: { width: 768, height: 1024 },
  portrait_16_9: { width: 576, height: 1024 },
  landscape_4_3: { width: 1024, height: 768 },
  landscape_16_9: { width: 1024, height: 576 },
};

export function checkSize(width: number, height: number): void {
  for (const [name, v] of [['width', width], ['height', height]] as const) {
    if (!Number.isInteger(v)) throw new PipelineInputError('invalid_size', `${name} must be a whole number of pixels, got ${v}`, name);
    if (v < MIN_SIDE) throw new PipelineInputError('invalid_size', `${name} ${v} is below the minimum of ${MIN_SIDE} pixels`, name);
    if (v % SIZE_MULTIPLE !== 0) {
      const lo = Math.floor(v / SIZE_MULTIPLE) * SIZE_MULTIPLE;
      throw new PipelineInputError('invalid_size', `${name} ${v} is not a multiple of ${SIZE_MULTIPLE}; use ${lo} or ${lo + SIZE_MULTIPLE}`, name);
    }
  }
  if (width * height > MAX_PIXELS) {
    throw new PipelineInputError('invalid_size', `${width}×${height} is ${(width * height / 1e6).toFixed(2)} MP, above the limit of ${(MAX_PIXELS / 1e6).toFixed(2)} MP (2048×2048)`, 'width');
  }
}

export interface ResolvedRequest extends GenerateRequest {
  steps: number;
  /** The CFG scale actually applied (1 and unused for distilled variants). */
  guidance: number;
  useCfg: boolean;
  quality: number;
  referenceImages: Uint8Array[];
  /** `auto` resolved: klein paints opaque images, so `auto` is `opaque` (a transparent cut-out is asked for by name). */
  background: 'opaque' | 'transparent';
}

/** Checks every field and fills the variant's defaults. */
export function resolveRequest(req: GenerateRequest, variant: VariantInfo): ResolvedRequest {
  if (typeof req.prompt !== 'string') throw new PipelineInputError('invalid_prompt', 'prompt must be a string', 'prompt');
  checkSize(req.width, req.height);
  if (!Number.isSafeInteger(req.seed) || req.seed < 0) throw new PipelineInputError('invalid_seed', `seed must be a whole number from 0 to ${MAX_SEED}, got ${req.seed}`, 'seed');
  if (!Number.isInteger(req.numImages) || req.numImages < 1 || req.numImages > MAX_IMAGES) {
    throw new PipelineInputError('invalid_num_images', `num_images must be 1 to ${MAX_IMAGES}, got ${req.numImages}`, 'numImages');
  }
  if (req.seed + req.numImages - 1 > MAX_SEED) throw new PipelineInputError('invalid_seed', `seed ${req.seed} + image index exceeds ${MAX_SEED}`, 'seed');
  const steps = req.steps ?? variant.defaultSteps;
  if (!Number.isInteger(steps) || steps < 1 || steps > MAX_STEPS) throw new PipelineInputError('invalid_steps', `steps must be a whole number from 1 to ${MAX_STEPS}, got ${steps}`, 'steps');
  const guidance = req.guidance ?? variant.defaultGuidance;
  if (typeof guidance !== 'number' || !Number.isFinite(guidance) || guidance < 0 || guidance > MAX_GUIDANCE) {
    throw new PipelineInputError('invalid_guidance', `guidance must be a number from 0 to ${MAX_GUIDANCE}, got ${guidance}`, 'guidance');
  }
  if (!FORMATS.includes(req.outputFormat)) throw new PipelineInputError('invalid_format', `output format must be one of ${FORMATS.join(', ')}, got ${String(req.outputFormat)}`, 'outputFormat');
  const quality = req.quality ?? 90;
  if (!Number.isInteger(quality) || quality < 1 || quality > 100) throw new PipelineInputError('invalid_quality', `quality must be a whole number from 1 to 100, got ${quality}`, 'quality');
  const requested = req.background ?? 'auto';
  if (!BACKGROUNDS.includes(requested)) throw new PipelineInputError('invalid_background', `background must be one of ${BACKGROUNDS.join(', ')}, got ${String(requested)}`, 'background');
  const background = requested === 'transparent' ? 'transparent' : 'opaque';
  // never switch the format behind the caller's back: clients key on the content type
  if (background === 'transparent' && !ALPHA_FORMATS.includes(req.outputFormat)) {
    throw new PipelineInputError('transparent_needs_alpha_format', `a transparent background needs png or webp output; ${req.outputFormat} has no alpha channel`, 'outputFormat');
  }
  const refs = req.referenceImages ?? [];
  if (!Array.isArray(refs) || refs.length > MAX_REFERENCES) throw new PipelineInputError('too_many_references', `at most ${MAX_REFERENCES} reference images, got ${refs.length}`, 'referenceImages');
  // distilled klein has no CFG and no guidance input: the value is accepted (APIs send 1.0 or 2.5) and ignored;
  // base variants use real CFG against the empty prompt when g > 1, as diffusers does
  const useCfg = !variant.distilled && guidance > 1;
  return { ...req, steps, guidance: variant.distilled ? 1 : guidance, useCfg, quality, referenceImages: refs, background };
}
