// The form's settings as plain data, and the run request they make. Kept apart from the DOM so the snippets, the
// request and "reuse settings" all agree on one shape.
import type { PlaygroundConfig } from './config.ts';

export interface Reference { name: string; type: string; dataUri: string; width: number; height: number }

export interface Settings {
  mode: 't2i' | 'edit';
  prompt: string;
  /** a preset name, 'custom', or 'auto' (edits: the first reference's size) */
  size: string;
  width: number;
  height: number;
  seed: number | null;
  steps: number | null;
  count: number;
  format: 'png' | 'jpeg' | 'webp';
  /** 'transparent' cuts the subject out (png/webp only); 'auto' is sent as nothing (the API's default) */
  background: 'auto' | 'opaque' | 'transparent';
  refs: Reference[];
  /** LoRAs to apply, in order (`path` as the API takes it). */
  loras: Array<{ path: string; scale: number }>;
}

export interface RunRequest {
  modelId: string;
  body: { input: Record<string, unknown> };
}

/**
 * Turn settings into the request. Sizes and counts are sent as typed, not clamped: the API is the judge of what
 * it accepts, and its error message is what the page shows.
 */
export function buildRequest(s: Settings, cfg: PlaygroundConfig): RunRequest {
  const input: Record<string, unknown> = { prompt: s.prompt };
  if (s.size === 'custom') input.image_size = { width: s.width, height: s.height };
  else if (s.size !== 'auto') input.image_size = s.size;
  if (s.seed !== null) input.seed = s.seed;
  if (s.steps !== null) input.num_inference_steps = s.steps;
  input.num_images = s.count;
  input.output_format = s.format;
  if (s.background !== 'auto') input.background = s.background;
  if (s.loras.length) input.loras = s.loras;
  if (s.mode === 'edit') input.image_urls = s.refs.map((r) => r.dataUri);
  return { modelId: s.mode === 'edit' ? cfg.models.edit : cfg.models.t2i, body: { input } };
}

/**
 * The LoRA box: one `PATH[:SCALE]` per line (the CLI's `--lora` syntax). A trailing `:number` is the scale, except
 * an URL's port; a scale that is not a number is left in the path for the API to refuse.
 */
export function parseLoraLines(text: string): Settings['loras'] {
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean)
    .map((line) => {
      const m = /^(.+):([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)$/i.exec(line);
      return m && !/^[a-z][a-z0-9+.-]*:\/\/[^/]+$/i.test(m[1]) ? { path: m[1], scale: Number(m[2]) } : { path: line, scale: 1 };
    });
}

/** LoRAs back into the box's lines. */
export function loraLines(loras: Settings['loras']): string {
  return loras.map((l) => (l.scale === 1 ? l.path : `${l.path}:${l.scale}`)).join('\n');
}

/** The size a request will produce, when known before the run (edits without a size follow their first reference). */
export function outputSize(s: Settings, cfg: PlaygroundConfig): { width: number; height: number } | null {
  if (s.size === 'custom') return { width: s.width, height: s.height };
  if (s.size === 'auto') {
    const r = s.refs[0];
    if (!r) return null;
    const { maxPixels, multiple, minSide } = cfg.limits;
    const scale = Math.min(1, Math.sqrt(maxPixels / (r.width * r.height)));
    const fit = (v: number) => Math.max(minSide, Math.floor((v * scale) / multiple) * multiple);
    return { width: fit(r.width), height: fit(r.height) };
  }
  return cfg.presets[s.size] ?? null;
}

/** Problems with a custom size, in words, for the hint under the size fields ('' when it is fine). */
export function sizeProblems(w: number, h: number, cfg: PlaygroundConfig): string[] {
  const { minSide, multiple, maxPixels } = cfg.limits;
  const out: string[] = [];
  for (const [name, v] of [['width', w], ['height', h]] as const) {
    if (!Number.isInteger(v)) out.push(`${name} must be a whole number`);
    else if (v < minSide) out.push(`${name} must be at least ${minSide}`);
    else if (v % multiple !== 0) out.push(`${name} ${v} is not a multiple of ${multiple}`);
  }
  if (w * h > maxPixels) out.push(`${w}×${h} is over the ${maxPixels / 2 ** 20} MP cap`);
  return out;
}

/** Formats that can carry a transparent background (JPEG has no alpha channel). */
export const alphaFormat = (f: Settings['format']) => f !== 'jpeg';

export const megapixels = (w: number, h: number) => (w * h) / 2 ** 20;

/** Settings back from a finished run ("reuse settings"); the seed is the one the run used. */
export function settingsFromRun(input: Record<string, unknown>, seed: number, edit: boolean, cfg: PlaygroundConfig, refs: Reference[]): Partial<Settings> {
  const size = input.image_size;
  const out: Partial<Settings> = {
    mode: edit ? 'edit' : 't2i',
    prompt: String(input.prompt ?? ''),
    seed,
    steps: typeof input.num_inference_steps === 'number' ? input.num_inference_steps : null,
    count: typeof input.num_images === 'number' ? input.num_images : 1,
    format: (input.output_format as Settings['format']) ?? 'png',
    background: input.background === 'opaque' || input.background === 'transparent' ? input.background : 'auto',
    refs,
    loras: Array.isArray(input.loras) ? (input.loras as Settings['loras']).map((l) => ({ path: String(l.path), scale: typeof l.scale === 'number' ? l.scale : 1 })) : [],
  };
  if (typeof size === 'string' && size in cfg.presets) out.size = size;
  else if (size && typeof size === 'object') {
    const { width, height } = size as { width: number; height: number };
    Object.assign(out, { size: 'custom', width, height });
  } else out.size = edit ? 'auto' : 'custom';
  return out;
}
