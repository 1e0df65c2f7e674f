// What a request may ask for, once for the pipeline, the CLI, the HTTP service (its zod schemas take their bounds from
// here), the MCP tools and the playground. The values follow what klein's API peers accept (BFL, fal, Runflow, OpenAI):
// see docs/api.md "Limits" for the choice of each.

export const LIMITS = {
  /** Output sides are multiples of 16 (8× VAE downsampling × 2×2 patches). */
  multiple: 16,
  minSide: 64,
  /** 4 MP (2048²), BFL's limit for klein; the schedule is fitted to ~1.1 MP and extrapolated beyond. */
  maxPixels: 2048 * 2048,
  /** Images per request (fal / Runflow `num_images` 1–4). */
  maxImages: 4,
  /** Reference images of an edit (BFL klein: `input_image` … `input_image_4`). */
  maxRefs: 4,
  /**
   * Largest reference image, as decoded (50 MP: a full-size photo from a current camera). The pipeline scales
   * references down to ≤ 4.1 MP anyway; the cap keeps a tiny file from expanding to gigabytes.
   */
  maxReferencePixels: 50_000_000,
  /** Runflow's and fal's range; the base variants' default (50) is its top. */
  maxSteps: 50,
  /** Runflow's `guidance_scale` range 0–20. */
  maxGuidance: 20,
  /** Every seed a JSON number carries exactly; image i of a batch uses seed + i, which must stay below it too. */
  maxSeed: Number.MAX_SAFE_INTEGER,
  /** OpenAI's prompt limit for its image models, so their clients' prompts are never refused for length. */
  maxPromptChars: 32_000,
  /**
   * LoRAs applied at once (fal's klein LoRA endpoints take a list too); each adds its rank to every Linear it adapts,
   * so step time and memory grow with the count (docs/benchmarks.md, "LoRA").
   */
  maxLoras: 4,
  /** Largest |scale| of a LoRA: trained for about 1, they stop meaning anything far beyond. */
  maxLoraScale: 10,
  /** jpeg/webp quality. */
  minQuality: 1,
  maxQuality: 100,
} as const;

/** The fal / Runflow `image_size` presets (width × height). */
export const SIZE_PRESETS = {
  square_hd: { width: 1024, height: 1024 },
  square: { width: 512, height: 512 },
  portrait_4_3: { width: 768, height: 1024 },
  portrait_16_9: { width: 576, height: 1024 },
  landscape_4_3: { width: 1024, height: 768 },
  landscape_16_9: { width: 1024, height: 576 },
} as const;
export type PresetName = keyof typeof SIZE_PRESETS;
export const PRESET_NAMES = Object.keys(SIZE_PRESETS) as [PresetName, ...PresetName[]];

export function isPresetName(s: string): s is PresetName {
  return Object.hasOwn(SIZE_PRESETS, s);
}

/** The default output size of text to image (fal's and Runflow's default preset). */
export const DEFAULT_PRESET: PresetName = 'landscape_4_3';

/** A sentence for help texts and API descriptions. */
export const SIZE_RULE = `sides multiples of ${LIMITS.multiple}, at least ${LIMITS.minSide}, at most ${LIMITS.maxPixels / 2 ** 20} MP in total`;

/**
 * The output size of an edit that names none: the first reference's aspect at no more than 1 MP (the resolution klein
 * was trained at, as diffusers' reference preprocessing caps it), sides cut down to multiples of 16.
 */
export const EDIT_DEFAULT_MAX_PIXELS = 1024 * 1024;

export function sizeFromReference(width: number, height: number): { width: number; height: number } {
  const scale = Math.min(1, Math.sqrt(EDIT_DEFAULT_MAX_PIXELS / (width * height)));
  const fit = (v: number) => Math.max(LIMITS.minSide, Math.floor(Math.trunc(v * scale) / LIMITS.multiple) * LIMITS.multiple);
  return { width: fit(width), height: fit(height) };
}

/** A preset name or `WIDTHxHEIGHT` → the size it names (unchecked: see `checkSize`), or null when it is neither. */
export function parseSizeSpec(spec: string): { width: number; height: number } | null {
  if (isPresetName(spec)) return { ...SIZE_PRESETS[spec] };
  const m = /^(\d{1,6})x(\d{1,6})$/i.exec(spec);
  return m ? { width: Number(m[1]), height: Number(m[2]) } : null;
}
