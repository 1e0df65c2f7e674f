// The model catalogue and each model's input schema (fal's field names, which Runflow exposes for klein 4B).
import { z } from '@hono/zod-openapi';
import { BackgroundField } from './background.ts';
import { ApiError } from './errors.ts';

export const IMAGE_SIZE_PRESETS = {
  square_hd: { width: 1024, height: 1024 },
  square: { width: 512, height: 512 },
  portrait_4_3: { width: 768, height: 1024 },
  portrait_16_9: { width: 576, height: 1024 },
  landscape_4_3: { width: 1024, height: 768 },
  landscape_16_9: { width: 1024, height: 576 },
} as const;
export type PresetName = keyof typeof IMAGE_SIZE_PRESETS;

export const LIMITS = { minSide: 64, multiple: 16, maxPixels: 4 * 1024 * 1024, maxImages: 4, maxSteps: 50, maxRefs: 4 };

const ImageSizeObject = z
  .object({
    width: z.number().int().min(LIMITS.minSide).multipleOf(LIMITS.multiple),
    height: z.number().int().min(LIMITS.minSide).multipleOf(LIMITS.multiple),
  })
  .strict()
  .refine((s) => s.width * s.height <= LIMITS.maxPixels, { message: `width × height must be at most ${LIMITS.maxPixels} pixels (4 MP)` })
  .openapi('ImageSizeObject');

const presetNames = Object.keys(IMAGE_SIZE_PRESETS) as [PresetName, ...PresetName[]];
const ImageSize = z.union([z.enum(presetNames), ImageSizeObject]).openapi({
  description: `A preset (${presetNames.join(', ')}) or {width, height}: sides multiples of 16, at least 64, at most 4 MP in total.`,
});

const common = {
  prompt: z.string().min(1).max(20_000).openapi({ description: 'What to draw. Prompts past the 512-token text window are truncated (the output says so).' }),
  num_images: z.number().int().min(1).max(LIMITS.maxImages).default(1).openapi({ description: 'Images to generate, 1–4; image i uses seed + i.' }),
  num_inference_steps: z.number().int().min(1).max(LIMITS.maxSteps).optional().openapi({ description: "Denoising steps; default: the model's (4 for the distilled klein, 50 for base)." }),
  guidance_scale: z.number().min(0).max(20).optional().openapi({ description: "CFG scale; default: the model's. The distilled klein ignores it; base variants use it." }),
  seed: z.number().int().min(0).max(2 ** 32 - 1).optional().openapi({ description: 'Random if omitted; the output reports the seed used.' }),
  output_format: z.enum(['png', 'jpeg', 'webp']).default('png'),
  background: BackgroundField,
  sync_mode: z.boolean().default(false).openapi({ description: 'Wait for the result and return it inline (images as data URIs).' }),
  enable_safety_checker: z.boolean().optional().openapi({
    description: 'Accepted for compatibility with fal/Runflow clients. No safety classifier ships with klein serve, so no safety fields are ever returned.',
  }),
};

export const TextToImageInput = z
  .object({ ...common, image_size: ImageSize.default('landscape_4_3') })
  .strict()
  .openapi('TextToImageInput');

const ImageUrl = z.string().min(1).openapi({ description: 'An https URL or a data: URI (PNG, JPEG or WebP).' });
export const EditInput = z
  .object({
    ...common,
    image_size: ImageSize.optional().openapi({ description: 'Default: the first reference image size (rounded to 16, at most 4 MP).' }),
    image_urls: z.array(ImageUrl).min(1).max(LIMITS.maxRefs),
  })
  .strict()
  .openapi('EditInput');

export type TextToImageInputT = z.infer<typeof TextToImageInput>;
export type EditInputT = z.infer<typeof EditInput>;
export type ModelInput = TextToImageInputT | EditInputT;

export interface ModelEntry {
  id: string;
  aliases: string[];
  kind: 'text-to-image' | 'edit';
  title: string;
  description: string;
  schema: typeof TextToImageInput | typeof EditInput;
}

export const MODELS: ModelEntry[] = [
  {
    id: 'black-forest-labs/flux-2-klein-4b',
    aliases: ['flux-2-klein-4b'],
    kind: 'text-to-image',
    title: 'FLUX.2 [klein] 4B',
    description: 'Text to image with FLUX.2 [klein] 4B (distilled, 4 steps), self-hosted.',
    schema: TextToImageInput,
  },
  {
    id: 'black-forest-labs/flux-2-klein-4b/edit',
    aliases: ['flux-2-klein-4b/edit'],
    kind: 'edit',
    title: 'FLUX.2 [klein] 4B Edit',
    description: 'Image editing and multi-reference generation (1–4 reference images) with FLUX.2 [klein] 4B.',
    schema: EditInput,
  },
];

export function findModel(id: string): ModelEntry | undefined {
  const clean = id.replace(/^\/+|\/+$/g, '');
  return MODELS.find((m) => m.id === clean || m.aliases.includes(clean));
}

export function requireModel(id: string): ModelEntry {
  const m = findModel(id);
  if (!m) throw new ApiError(404, 'MODEL_NOT_FOUND', `model '${id}' not found; see GET /v1/models`);
  return m;
}

/** The output size when known at creation (edits without image_size take the first reference's size later). */
export function requestedSize(input: ModelInput): { width: number; height: number } | null {
  const s = input.image_size;
  if (s === undefined) return null;
  return typeof s === 'string' ? { ...IMAGE_SIZE_PRESETS[s] } : { width: s.width, height: s.height };
}

/** Fit a reference image's size to the model's rules: multiples of 16, at least 64, at most 4 MP. */
export function sizeFromReference(w: number, h: number): { width: number; height: number } {
  const scale = Math.min(1, Math.sqrt(LIMITS.maxPixels / (w * h)));
  const fit = (v: number) => Math.max(LIMITS.minSide, Math.floor((v * scale) / LIMITS.multiple) * LIMITS.multiple);
  return { width: fit(w), height: fit(h) };
}
