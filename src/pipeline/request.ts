// Validation of a GenerateRequest against the model variant, before anything heavy is loaded. Every rejection is a
// PipelineInputError with a stable code (the service answers 422 with it; the CLI exits 2).
import type { VariantInfo } from '../weights/model-folder.ts';
import { LIMITS } from './limits.ts';
import type { Background, GenerateRequest, LoraRequest, OutputFormat } from './types.ts';

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
  | 'invalid_loras'
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

const FORMATS: readonly OutputFormat[] = ['png', 'jpeg', 'webp'];
const BACKGROUNDS: readonly Background[] = ['auto', 'opaque', 'transparent'];
/** Formats that carry an alpha channel (JPEG has none). */
export const ALPHA_FORMATS: readonly OutputFormat[] = ['png', 'webp'];

export function checkSize(width: number, height: number): void {
  const { minSide, multiple, maxPixels } = LIMITS;
  for (const [name, v] of [['width', width], ['height', height]] as const) {
    if (!Number.isInteger(v)) throw new PipelineInputError('invalid_size', `${name} must be a whole number of pixels, got ${v}`, name);
    if (v < minSide) throw new PipelineInputError('invalid_size', `${name} ${v} is below the minimum of ${minSide} pixels`, name);
    if (v % multiple !== 0) {
      const lo = Math.floor(v / multiple) * multiple;
      throw new PipelineInputError('invalid_size', `${name} ${v} is not a multiple of ${multiple}; use ${lo} or ${lo + multiple}`, name);
    }
  }
  if (width * height > maxPixels) {
    throw new PipelineInputError('invalid_size', `${width}×${height} is ${(width * height / 1e6).toFixed(2)} MP, above the limit of ${(maxPixels / 1e6).toFixed(2)} MP (2048×2048)`, 'width');
  }
}

export interface ResolvedRequest extends GenerateRequest {
  steps: number;
  /** The CFG scale actually applied (1 and unused for distilled variants). */
  guidance: number;
  useCfg: boolean;
  quality: number;
  referenceImages: Uint8Array[];
  loras: LoraRequest[];
  /** `auto` resolved: klein paints opaque images, so `auto` is `opaque` (a transparent cut-out is asked for by name). */
  background: 'opaque' | 'transparent';
}

/** Checks every field and fills the variant's defaults. */
export function resolveRequest(req: GenerateRequest, variant: VariantInfo): ResolvedRequest {
  const L = LIMITS;
  if (typeof req.prompt !== 'string') throw new PipelineInputError('invalid_prompt', 'prompt must be a string', 'prompt');
  if (req.prompt.length > L.maxPromptChars) throw new PipelineInputError('invalid_prompt', `prompt is ${req.prompt.length} characters, the limit is ${L.maxPromptChars}`, 'prompt');
  checkSize(req.width, req.height);
  if (!Number.isSafeInteger(req.seed) || req.seed < 0 || req.seed > L.maxSeed) throw new PipelineInputError('invalid_seed', `seed must be a whole number from 0 to ${L.maxSeed}, got ${req.seed}`, 'seed');
  if (!Number.isInteger(req.numImages) || req.numImages < 1 || req.numImages > L.maxImages) {
    throw new PipelineInputError('invalid_num_images', `num_images must be 1 to ${L.maxImages}, got ${req.numImages}`, 'numImages');
  }
  // compared this way round: seed + index past 2^53 is not exact in a double
  if (req.seed > L.maxSeed - (req.numImages - 1)) throw new PipelineInputError('invalid_seed', `seed ${req.seed} + image index exceeds ${L.maxSeed}`, 'seed');
  const steps = req.steps ?? variant.defaultSteps;
  if (!Number.isInteger(steps) || steps < 1 || steps > L.maxSteps) throw new PipelineInputError('invalid_steps', `steps must be a whole number from 1 to ${L.maxSteps}, got ${steps}`, 'steps');
  const guidance = req.guidance ?? variant.defaultGuidance;
  if (typeof guidance !== 'number' || !Number.isFinite(guidance) || guidance < 0 || guidance > L.maxGuidance) {
    throw new PipelineInputError('invalid_guidance', `guidance must be a number from 0 to ${L.maxGuidance}, got ${guidance}`, 'guidance');
  }
  if (!FORMATS.includes(req.outputFormat)) throw new PipelineInputError('invalid_format', `output format must be one of ${FORMATS.join(', ')}, got ${String(req.outputFormat)}`, 'outputFormat');
  const quality = req.quality ?? 90;
  if (!Number.isInteger(quality) || quality < L.minQuality || quality > L.maxQuality) throw new PipelineInputError('invalid_quality', `quality must be a whole number from ${L.minQuality} to ${L.maxQuality}, got ${quality}`, 'quality');
  const requested = req.background ?? 'auto';
  if (!BACKGROUNDS.includes(requested)) throw new PipelineInputError('invalid_background', `background must be one of ${BACKGROUNDS.join(', ')}, got ${String(requested)}`, 'background');
  const background = requested === 'transparent' ? 'transparent' : 'opaque';
  // never switch the format behind the caller's back: clients key on the content type
  if (background === 'transparent' && !ALPHA_FORMATS.includes(req.outputFormat)) {
    throw new PipelineInputError('transparent_needs_alpha_format', `a transparent background needs png or webp output; ${req.outputFormat} has no alpha channel`, 'outputFormat');
  }
  const refs = req.referenceImages ?? [];
  if (!Array.isArray(refs) || refs.length > L.maxRefs) throw new PipelineInputError('too_many_references', `at most ${L.maxRefs} reference images, got ${refs.length}`, 'referenceImages');
  // distilled klein has no CFG and no guidance input: the value is accepted (APIs send 1.0 or 2.5) and ignored;
  // base variants use real CFG against the empty prompt when g > 1, as diffusers does
  const useCfg = !variant.distilled && guidance > 1;
  return { ...req, steps, guidance: variant.distilled ? 1 : guidance, useCfg, quality, referenceImages: refs, background, loras: checkLoras(req.loras) };
}

function checkLoras(loras: unknown): LoraRequest[] {
  const L = LIMITS;
  if (loras === undefined) return [];
  if (!Array.isArray(loras) || loras.length > L.maxLoras) throw new PipelineInputError('invalid_loras', `loras must be a list of at most ${L.maxLoras}`, 'loras');
  return loras.map((l: Partial<LoraRequest>, i) => {
    if (typeof l?.path !== 'string' || !l.path) throw new PipelineInputError('invalid_loras', `loras[${i}].path must name a LoRA file`, 'loras');
    if (typeof l.scale !== 'number' || !Number.isFinite(l.scale) || Math.abs(l.scale) > L.maxLoraScale) {
      throw new PipelineInputError('invalid_loras', `loras[${i}].scale must be a number from -${L.maxLoraScale} to ${L.maxLoraScale}`, 'loras');
    }
    return { path: l.path, scale: l.scale };
  });
}
