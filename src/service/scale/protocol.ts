// What travels between the API and its workers: BullMQ job data (API → Redis → worker) and the JSON bodies of the
// worker routes (worker → API). Bytes travel as base64 so both fit in JSON.
import type { Background, GenerateRequest, OutputFormat, Precision, ProgressEvent } from '../../pipeline/types.ts';
import type { GpuDtype } from '../../runtime/target.ts';

/** The BullMQ queue every API and worker of one installation shares. */
export const QUEUE_NAME = 'klein-runs';
/** Worker routes live outside /v1 (no API keys there): they take the shared KLEIN_WORKER_TOKEN instead. */
export const WORKER_PREFIX = '/internal/worker';

export interface JobData {
  model_id: string;
  prompt: string;
  width: number;
  height: number;
  seed: number;
  num_images: number;
  steps?: number;
  guidance?: number;
  output_format: OutputFormat;
  quality?: number;
  /** absent: the pipeline's default (auto) */
  background?: Background;
  /** base64 */
  references: string[];
  /** LoRA files as the API resolved them: workers must see the same paths (a shared LoRA folder and cache) */
  loras?: Array<{ path: string; scale: number }>;
}

export function toJob(modelId: string, r: GenerateRequest): JobData {
  return {
    model_id: modelId, prompt: r.prompt, width: r.width, height: r.height, seed: r.seed, num_images: r.numImages,
    ...(r.steps !== undefined ? { steps: r.steps } : {}), ...(r.guidance !== undefined ? { guidance: r.guidance } : {}),
    output_format: r.outputFormat, ...(r.quality !== undefined ? { quality: r.quality } : {}),
    ...(r.background !== undefined ? { background: r.background } : {}),
    references: (r.referenceImages ?? []).map((b) => Buffer.from(b).toString('base64')),
    ...(r.loras?.length ? { loras: r.loras } : {}),
  };
}

export function fromJob(j: JobData): GenerateRequest {
  return {
    prompt: j.prompt, width: j.width, height: j.height, seed: j.seed, numImages: j.num_images,
    ...(j.steps !== undefined ? { steps: j.steps } : {}), ...(j.guidance !== undefined ? { guidance: j.guidance } : {}),
    outputFormat: j.output_format, ...(j.quality !== undefined ? { quality: j.quality } : {}),
    ...(j.background !== undefined ? { background: j.background } : {}),
    ...(j.references.length ? { referenceImages: j.references.map((s) => new Uint8Array(Buffer.from(s, 'base64'))) } : {}),
    ...(j.loras?.length ? { loras: j.loras } : {}),
  };
}

export interface Announce {
  id: string;
  model_id: string;
  device: string;
  /** exact or fast (int8); absent from workers that predate fast mode, which run exact */
  precision?: Precision;
  /** GPU workers: fp16 or fp32 (`klein worker --gpu-dtype`); absent on the CPU and from older workers */
  gpu_dtype?: GpuDtype;
  free_memory_bytes: number;
  /** the job it is running, if any */
  job: string | null;
}

export interface ProgressBody {
  worker: string;
  event: ProgressEvent;
}

export interface ResultBody {
  worker: string;
  seed: number;
  timings: Record<string, number>;
  prompt_truncated?: boolean;
  images: { data: string; width: number; height: number; content_type: 'image/png' | 'image/jpeg' | 'image/webp'; has_alpha?: boolean }[];
}

export interface FailureBody {
  worker: string;
  message: string;
  /** the pipeline rejected the request itself (the client's input), not a fault of the worker */
  input: boolean;
  /** PipelineInputError's code and field, when `input`; else MattingModelError's code (no matting weights there) or ENGINE_CRASHED (its engine process died: the attempt is lost and retried once) */
  code?: string;
  field?: string;
}
