// The contract between the engine pipeline and its users (CLI, service, workers). The pipeline owns it.
export type OutputFormat = 'png' | 'jpeg' | 'webp';

/**
 * `opaque`: the RGB image FLUX.2 paints. `transparent`: the subject cut out by the matting model (BiRefNet) into a
 * straight-alpha PNG/WebP (JPEG has no alpha: refused, never silently changed). `auto`: opaque for klein (OpenAI's
 * "the model decides" cannot be honoured by a model that paints RGB only; transparency.md §5.2).
 */
export type Background = 'auto' | 'opaque' | 'transparent';

/**
 * `exact`: fp32 products, matches the reference. `fast`: the large Linear layers of the transformer and the text
 * encoder as int8 products (VNNI on the CPU), with the error stated in docs/benchmarks.md.
 */
export type Precision = 'exact' | 'fast';

/** A LoRA to apply: a `.safetensors` file on the engine's machine (URLs and Hub references are resolved before). */
export interface LoraRequest {
  path: string;
  /** Strength: the delta s·(alpha/rank)·B·A is added; 0 leaves the model as it is. */
  scale: number;
}

export interface GenerateRequest {
  prompt: string;
  width: number;
  height: number;
  seed: number;
  /** 1–4 images in one batch. */
  numImages: number;
  /** Default: the model variant's (4 for klein, 50 for klein base). */
  steps?: number;
  /** CFG scale; only used by the base (undistilled) variants. */
  guidance?: number;
  outputFormat: OutputFormat;
  /** 1–100 for jpeg/webp. */
  quality?: number;
  /** Reference images for editing, as encoded bytes (PNG/JPEG/WebP), at most 4. */
  referenceImages?: Uint8Array[];
  /** Default `auto`. */
  background?: Background;
  /** LoRAs applied to the transformer for this request, at most `LIMITS.maxLoras`. */
  loras?: LoraRequest[];
}

export type Stage = 'load' | 'text' | 'reference' | 'denoise' | 'decode' | 'matting' | 'output';

export interface ProgressEvent {
  stage: Stage;
  /** For `denoise`: the step just finished (1-based) and the total. */
  step?: number;
  total?: number;
  message?: string;
}

export interface GeneratedImage {
  data: Uint8Array;
  width: number;
  height: number;
  contentType: 'image/png' | 'image/jpeg' | 'image/webp';
  /** True when the file carries an alpha channel (background `transparent`). */
  hasAlpha?: boolean;
}

export interface GenerateResult {
  images: GeneratedImage[];
  seed: number;
  /** Seconds per stage and in total. */
  timings: Record<string, number>;
  /** Set when the prompt was longer than the text encoder's 512-token window. */
  promptTruncated?: boolean;
}

export interface GenerateOptions {
  onProgress?: (e: ProgressEvent) => void;
  /** Cancellation, honoured between steps. */
  signal?: AbortSignal;
}

export interface ImagePipeline {
  generate(req: GenerateRequest, opts?: GenerateOptions): Promise<GenerateResult>;
  close(): Promise<void>;
}
