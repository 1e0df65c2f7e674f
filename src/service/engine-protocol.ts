// The messages between the API process and its engine child (engine-host.ts ↔ engine-child.ts), sent over Node's
// IPC channel with `serialization: 'advanced'` (V8's structured clone), so image bytes travel as Uint8Arrays and
// errors keep the fields the service maps to run failure codes.
import { UserError } from '../errors.ts';
import type { KleinPipeline, PipelineOptions } from '../pipeline/pipeline.ts';
import type { Device } from '../runtime/device.ts';
import type { GpuDtype, Precision } from '../runtime/target.ts';
import { PipelineInputError, type PipelineInputCode } from '../pipeline/request.ts';
import type { GeneratedImage, GenerateRequest, GenerateResult, ProgressEvent } from '../pipeline/types.ts';
import { MattingModelError } from '../weights/matting-folder.ts';
import { isLoraErrorCode, LoraError } from '../models/flux2/lora/load.ts';
import { ModelFolderError, type VariantInfo } from '../weights/model-folder.ts';

/** What the child opens its `KleinPipeline` with: the options `klein serve`/`klein worker` pass (all plain data). */
export type EngineOptions = Pick<PipelineOptions, 'target' | 'keepLoaded' | 'memoryLimit' | 'mattingModel'> & { model?: string };

/** What the opened pipeline says about itself, for the API's start line, /v1/health and the matting probe. */
export interface EngineInfo {
  variant: VariantInfo;
  modelRoot: string;
  device: Device;
  precision: Precision;
  gpuDtype?: GpuDtype;
}

/** The EngineInfo of an opened pipeline (in the child, or in this process with `--in-process`). */
export function engineInfo(p: KleinPipeline): EngineInfo {
  const t = p.target;
  return { variant: { ...p.variant }, modelRoot: p.model.root, device: t.device, precision: t.precision, ...(t.device !== 'cpu' ? { gpuDtype: t.gpuDtype } : {}) };
}

/**
 * A generated image as the engine hands it over: its bytes in a file of the host's hand-over folder (`name` inside
 * it), which the host reads off its event loop and removes. Sent over the IPC channel instead, a 3 MB image blocked
 * the receiving event loop for 13-22 ms while it was reassembled and deserialized (docs/benchmarks.md).
 */
export type HandedOverImage = Omit<GeneratedImage, 'data'> & { name: string };
export type HandedOverResult = Omit<GenerateResult, 'images'> & { images: HandedOverImage[] };

export type ToEngine =
  | { type: 'open'; options: EngineOptions; handoverDir: string }
  | { type: 'generate'; id: number; req: GenerateRequest }
  | { type: 'cancel'; id: number }
  | { type: 'close' };

export type FromEngine =
  | { type: 'ready'; info: EngineInfo }
  | { type: 'open-failed'; error: SerializedError }
  | { type: 'progress'; id: number; event: ProgressEvent }
  | { type: 'result'; id: number; result: HandedOverResult }
  | { type: 'error'; id: number; error: SerializedError };

export interface SerializedError {
  name: string;
  message: string;
  stack?: string;
  code?: string;
  field?: string;
  missing?: string[];
}

export function serializeError(e: unknown): SerializedError {
  if (!(e instanceof Error)) return { name: 'Error', message: String(e) };
  const x = e as Error & { code?: unknown; field?: unknown; missing?: unknown };
  return {
    name: e.name, message: e.message, ...(e.stack ? { stack: e.stack } : {}),
    ...(typeof x.code === 'string' ? { code: x.code } : {}),
    ...(typeof x.field === 'string' ? { field: x.field } : {}),
    ...(Array.isArray(x.missing) ? { missing: x.missing.map(String) } : {}),
  };
}

/**
 * The child's error as the API's code expects it: the engine's own error classes (the run queue and the CLI map
 * them to codes by `instanceof`) are rebuilt; anything else is an Error with the child's name, message and stack.
 */
export function deserializeError(s: SerializedError): Error {
  let e: Error;
  if (s.name === 'PipelineInputError' && s.code) e = new PipelineInputError(s.code as PipelineInputCode, s.message, s.field);
  else if (s.name === 'MattingModelError' && (s.code === 'matting_model_missing' || s.code === 'matting_model_invalid')) e = new MattingModelError(s.code, s.message);
  else if (s.name === 'ModelFolderError' && (s.code === 'model_not_found' || s.code === 'model_incomplete' || s.code === 'model_invalid')) e = new ModelFolderError(s.code, s.message, s.missing);
  else if (s.name === 'LoraError' && isLoraErrorCode(s.code)) e = new LoraError(s.code, s.message);
  else if (s.name === 'InsufficientMemoryError' || s.name === 'UserError') e = new UserError(s.message, s.code);
  else {
    e = new Error(s.message);
    e.name = s.name;
    if (s.code) (e as Error & { code?: string }).code = s.code;
  }
  if (s.stack) e.stack = s.stack;
  return e;
}
