// LoRAs in run requests (`loras: [{path, scale}]`, fal's shape). Each path is resolved before the run is stored — a
// file under the configured LoRA folder, an https URL (SSRF-guarded, size-capped, cached by sha256) or a Hub
// reference `owner/name[/file.safetensors]` (lora-fetch.ts) — and its header is checked against the served model, so
// a LoRA that cannot be used is a 4xx with the LoraError's code in upper case and nothing is stored. The run keeps
// the resolved files beside its input (`lora_files`, never shown to clients); the queue hands them to the engine.
import { z } from '@hono/zod-openapi';
import { KLEIN_4B, KLEIN_9B, type Flux2Config } from '../models/flux2/config.ts';
import { openFlux2Checkpoint } from '../models/flux2/checkpoint.ts';
import { checkLora, LoraError } from '../models/flux2/lora/load.ts';
import { LIMITS } from '../pipeline/limits.ts';
import type { LoraRequest } from '../pipeline/types.ts';
import { openModelFolder, type VariantId } from '../weights/model-folder.ts';
import { ApiError } from './errors.ts';
import { resolveLora, type LoraSettings, type LoraSourceOptions } from './lora-fetch.ts';
import type { NetPolicy } from './net.ts';

export const LoraWeight = z
  .object({
    path: z.string().min(1).max(2048).openapi({
      description: 'A `.safetensors` LoRA: a path under the server\'s LoRA folder, an https URL (downloaded once, cached by its sha256) or a Hugging Face reference `owner/name[/file.safetensors]`.',
      example: 'styles/ink.safetensors',
    }),
    scale: z.number().min(-LIMITS.maxLoraScale).max(LIMITS.maxLoraScale).default(1).openapi({ description: 'Strength: the LoRA\'s delta times this (0 leaves the model unchanged).' }),
  })
  .strict()
  .openapi('LoraWeight');

export const LORAS_DESCRIPTION =
  `Up to ${LIMITS.maxLoras} LoRAs applied to the transformer for this run (FLUX.2 [klein] LoRAs in the diffusers/PEFT, ai-toolkit, kohya/musubi, ` +
  'OneTrainer or DiffSynth format, made for this model size; LoRAs trained on klein base are the ones known to work). A LoRA run is priced higher per output megapixel (GET /v1/models).';

/** A resolved LoRA as the run stores it (beside `loras` in its input). */
export interface StoredLoraFile {
  file: string;
  sha256: string;
}

/** The parts of the service's config that LoRA requests read (a ServiceConfig is one). */
type LoraConfig = { loras: LoraSettings; inputs: NetPolicy };

/** The LoRA settings of `cfg` as lora-fetch options for checking against `model`. */
function sourceOptions(cfg: LoraConfig, model: Flux2Config): LoraSourceOptions {
  const l = cfg.loras;
  return {
    loraDir: l.dir,
    urls: l.urls ? { policy: cfg.inputs, timeoutMs: l.timeoutMs } : false,
    hub: l.hub ? {} : false,
    maxBytes: l.maxBytes,
    validate: (file, label) => void checkLora(file, model, { label }),
  };
}

const configs = new Map<string, Flux2Config>();

/**
 * The transformer LoRAs are checked against: the served checkpoint's (its header), or, when the API process has no
 * model (scaled out), the variant's published shapes.
 */
export function servedTransformerConfig(modelDir: string, variant: VariantId | undefined): Flux2Config {
  const key = `${modelDir}\n${variant}`;
  let c = configs.get(key);
  if (!c) {
    try {
      c = openFlux2Checkpoint(openModelFolder(modelDir).transformer.checkpoint).config;
    } catch {
      c = variant?.endsWith('9b') ? KLEIN_9B : KLEIN_4B;
    }
    configs.set(key, c);
  }
  return c;
}

/** A LoraError as the API answers it: its status, its code in upper case, the field at fault. */
export function loraApiError(e: LoraError, index: number): ApiError {
  const loc = ['body', 'input', 'loras', index, 'path'];
  return new ApiError(e.status as 400, e.code.toUpperCase(), `loras[${index}]: ${e.message}`, [{ loc, message: e.message, type: e.code }]);
}

/** Resolves (downloads) and checks every LoRA of a request, in order; throws the first refusal as an ApiError. */
export async function resolveRunLoras(cfg: LoraConfig, model: Flux2Config, loras: readonly LoraRequest[] | undefined): Promise<StoredLoraFile[]> {
  const out: StoredLoraFile[] = [];
  for (const [i, l] of (loras ?? []).entries()) {
    try {
      const r = await resolveLora(l.path, sourceOptions(cfg, model));
      out.push({ file: r.file, sha256: r.sha256 });
    } catch (e) {
      if (e instanceof LoraError) throw loraApiError(e, i);
      throw e;
    }
  }
  return out;
}

/** The pipeline's `loras` of a stored run input. */
export function runLoras(input: { loras?: LoraRequest[]; lora_files?: StoredLoraFile[] }): LoraRequest[] {
  return (input.loras ?? []).map((l, i) => ({ path: input.lora_files?.[i]?.file ?? l.path, scale: l.scale }));
}
