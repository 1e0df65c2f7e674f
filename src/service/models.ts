// The served model catalogue and each model's input schema (fal's field names, which Runflow exposes for klein). A
// server serves the variant its pipeline loaded, under that variant's own Runflow-style ids: a 9B server never answers
// to klein 4B's ids. The bounds of every field come from the pipeline's limits module.
import { z } from '@hono/zod-openapi';
import { DEFAULT_PRESET, LIMITS, PRESET_NAMES, SIZE_PRESETS, SIZE_RULE } from '../pipeline/limits.ts';
import { VARIANTS, type VariantId } from '../weights/model-folder.ts';
import { BackgroundField } from './background.ts';
import { ApiError } from './errors.ts';
import { LORAS_DESCRIPTION, LoraWeight } from './loras.ts';

/** Re-exported for app.ts, whose body limit is sized by the reference count. */
export { LIMITS };

const ImageSizeObject = z
  .object({
    width: z.number().int().min(LIMITS.minSide).multipleOf(LIMITS.multiple),
    height: z.number().int().min(LIMITS.minSide).multipleOf(LIMITS.multiple),
  })
  .strict()
  .refine((s) => s.width * s.height <= LIMITS.maxPixels, { message: `width × height must be at most ${LIMITS.maxPixels} pixels (4 MP)` })
  .openapi('ImageSizeObject');

const ImageSize = z.union([z.enum(PRESET_NAMES), ImageSizeObject]).openapi({
  description: `A preset (${PRESET_NAMES.join(', ')}) or {width, height}: ${SIZE_RULE}.`,
});

const common = {
  prompt: z.string().min(1).max(LIMITS.maxPromptChars).openapi({ description: `What to draw, at most ${LIMITS.maxPromptChars} characters. Prompts past the 512-token text window are truncated (the output says so).` }),
  num_images: z.number().int().min(1).max(LIMITS.maxImages).default(1).openapi({ description: `Images to generate, 1–${LIMITS.maxImages}; image i uses seed + i.` }),
  num_inference_steps: z.number().int().min(1).max(LIMITS.maxSteps).optional().openapi({ description: `Denoising steps, 1–${LIMITS.maxSteps}; default: the model's (4 for the distilled klein, 50 for base).` }),
  guidance_scale: z.number().min(0).max(LIMITS.maxGuidance).optional().openapi({ description: "CFG scale; default: the model's. The distilled klein ignores it; base variants use it." }),
  seed: z.number().int().min(0).max(LIMITS.maxSeed).optional().openapi({ description: 'Random if omitted; the output reports the seed used. Image i uses seed + i, which must not pass the maximum either.' }),
  output_format: z.enum(['png', 'jpeg', 'webp']).default('png'),
  background: BackgroundField,
  loras: z.array(LoraWeight).max(LIMITS.maxLoras).optional().openapi({ description: LORAS_DESCRIPTION }),
  sync_mode: z.boolean().default(false).openapi({ description: 'Wait for the result and return it inline (images as data URIs).' }),
  enable_safety_checker: z.boolean().optional().openapi({
    description: 'Accepted for compatibility with fal/Runflow clients. No safety classifier ships with klein serve, so no safety fields are ever returned.',
  }),
};

/** seed + num_images − 1 is the last image's seed: it must stay a seed too. */
const seedsInRange = (v: { seed?: number; num_images: number }) => v.seed === undefined || v.seed <= LIMITS.maxSeed - (v.num_images - 1);
const seedRule = { message: `seed + num_images − 1 must be at most ${LIMITS.maxSeed}`, path: ['seed'] };

export const TextToImageInput = z
  .object({ ...common, image_size: ImageSize.default(DEFAULT_PRESET) })
  .strict()
  .refine(seedsInRange, seedRule);

const ImageUrl = z.string().min(1).openapi({ description: 'An https URL or a data: URI (PNG, JPEG or WebP).' });
export const EditInput = z
  .object({
    ...common,
    image_size: ImageSize.optional().openapi({ description: `Default: the first reference image's aspect at no more than 1 MP, sides cut to multiples of ${LIMITS.multiple}.` }),
    image_urls: z.array(ImageUrl).min(1).max(LIMITS.maxRefs),
  })
  .strict()
  .refine(seedsInRange, seedRule);

// Unnamed on purpose: request bodies inline them, where client generators (openapi-typescript) make fields with a
// default optional; the run's echo of the input (defaults filled) names them, in schemas.ts.
export type TextToImageInputT = z.infer<typeof TextToImageInput>;
export type EditInputT = z.infer<typeof EditInput>;
export type ModelInput = TextToImageInputT | EditInputT;

export interface ModelEntry {
  /** Runflow-style: `black-forest-labs/<slug>`, `…/edit` for editing. */
  id: string;
  aliases: string[];
  kind: 'text-to-image' | 'edit';
  variant: VariantId;
  title: string;
  description: string;
  schema: typeof TextToImageInput | typeof EditInput;
}

/** Each variant's name on the APIs: the slug of BFL's checkpoint file (`flux-2-klein-base-9b.safetensors`). */
const NAMES: Record<VariantId, { slug: string; title: string; how: string }> = {
  'klein-4b': { slug: 'flux-2-klein-4b', title: 'FLUX.2 [klein] 4B', how: 'distilled, 4 steps' },
  'klein-9b': { slug: 'flux-2-klein-9b', title: 'FLUX.2 [klein] 9B', how: 'distilled, 4 steps' },
  'klein-base-4b': { slug: 'flux-2-klein-base-4b', title: 'FLUX.2 [klein] Base 4B', how: 'undistilled, 50 steps with CFG' },
  'klein-base-9b': { slug: 'flux-2-klein-base-9b', title: 'FLUX.2 [klein] Base 9B', how: 'undistilled, 50 steps with CFG' },
};
const OWNER = 'black-forest-labs';

function entriesOf(variant: VariantId): ModelEntry[] {
  const { slug, title, how } = NAMES[variant];
  return [
    {
      id: `${OWNER}/${slug}`, aliases: [slug], kind: 'text-to-image', variant, title,
      description: `Text to image with ${title} (${how}), self-hosted.`, schema: TextToImageInput,
    },
    {
      id: `${OWNER}/${slug}/edit`, aliases: [`${slug}/edit`], kind: 'edit', variant, title: `${title} Edit`,
      description: `Image editing and multi-reference generation (1–${LIMITS.maxRefs} reference images) with ${title}.`, schema: EditInput,
    },
  ];
}

const BY_VARIANT = Object.fromEntries(Object.keys(VARIANTS).map((v) => [v, entriesOf(v as VariantId)])) as Record<VariantId, ModelEntry[]>;

/** Every model id a klein server can serve, whatever it loaded (for prices and for finding old runs). */
export const ALL_MODELS: ModelEntry[] = Object.values(BY_VARIANT).flat();

/** What a server serves: the variant of its pipeline (`cfg.variant`, set by `klein serve`; klein 4B if unset). */
export function servedModels(cfg: { variant?: VariantId }): ModelEntry[] {
  return BY_VARIANT[cfg.variant ?? 'klein-4b'];
}

export function servedModel(cfg: { variant?: VariantId }, kind: ModelEntry['kind']): ModelEntry {
  return servedModels(cfg).find((m) => m.kind === kind)!;
}

function matches(m: ModelEntry, id: string): boolean {
  const clean = id.replace(/^\/+|\/+$/g, '');
  return m.id === clean || m.aliases.includes(clean);
}

export function findModel(cfg: { variant?: VariantId }, id: string): ModelEntry | undefined {
  return servedModels(cfg).find((m) => matches(m, id));
}

export function requireModel(cfg: { variant?: VariantId }, id: string): ModelEntry {
  const m = findModel(cfg, id);
  if (m) return m;
  const other = ALL_MODELS.find((x) => matches(x, id));
  const served = servedModels(cfg).map((x) => x.id).join(', ');
  if (other) throw new ApiError(404, 'MODEL_NOT_FOUND', `model '${id}' is ${other.title}, which this server does not run; it serves ${served} (see GET /v1/models)`);
  throw new ApiError(404, 'MODEL_NOT_FOUND', `model '${id}' not found; this server serves ${served} (see GET /v1/models)`);
}

/** Any klein model id, served here or not: the runs list can filter by the model of older runs. */
export function requireKnownModel(id: string): ModelEntry {
  const m = ALL_MODELS.find((x) => matches(x, id));
  if (!m) throw new ApiError(404, 'MODEL_NOT_FOUND', `model '${id}' not found; see GET /v1/models`);
  return m;
}

/** The output size when known at creation (edits without image_size take the first reference's size later). */
export function requestedSize(input: ModelInput): { width: number; height: number } | null {
  const s = input.image_size;
  if (s === undefined) return null;
  return typeof s === 'string' ? { ...SIZE_PRESETS[s] } : { width: s.width, height: s.height };
}
