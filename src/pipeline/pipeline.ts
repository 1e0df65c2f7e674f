// Text-to-image and multi-reference editing with FLUX.2 [klein], end to end (spec §9):
//   prompt → Qwen3 context (cached per prompt) ─┐
//   seed → Philox noise in packed latent space ─┼→ Euler steps of the flow transformer (CFG for base variants)
//   reference images → VAE latents → tokens ────┘        → tokens → latent → VAE decode → PNG/JPEG/WebP
// With `background: "transparent"` the decoded RGB goes through the matting model (BiRefNet) and foreground-colour
// estimation into straight RGBA PNG/WebP (background.ts, matting.ts); the prompt carries a plain-backdrop hint.
// Memory: every request is planned before anything loads (components.ts): its components stay resident when they
// all fit (always on a GPU), else each loads for its stage and is released after it; a request that cannot fit in
// any plan is refused with what it needs and what is free.
import type { ExecutionTarget } from '../runtime/target.ts';
import { LoraCache } from '../models/flux2/lora/cache.ts';
import { loraHostBytes } from '../models/flux2/lora/apply.ts';
import type { AppliedLora } from '../models/flux2/lora/load.ts';
import { PromptEmbeddingCache } from '../text/prompt-cache.ts';
import { PromptEncoder } from '../text/prompt-encoder.ts';
import { KleinTokenizer } from '../text/tokenizer.ts';
import { openModelFolder, resolveModelPath, type ModelFolder, type VariantId } from '../weights/model-folder.ts';
import { promptForBackground } from './background.ts';
import { componentDtype, Components, type ComponentDtype, type ComponentName } from './components.ts';
import { CONTENT_TYPES, DEFAULT_UINT8_RULE, encodeImage, prepareReferenceImage, tensorToRgb, type PreparedReference, type RgbImage, type RgbaImage, type Uint8Rule } from './images.ts';
import { imagePositionIds, referenceTokens, tokensToLatent } from './latents.ts';
import { initialLatentTokens } from './noise.ts';
import { resolveRequest, type ResolvedRequest } from './request.ts';
import { defaultMaxRows, denoise } from './sampler.ts';
import { getSchedule, imageSeqLen } from './schedule.ts';
import { Stopwatch } from './stopwatch.ts';
import type { GenerateOptions, GenerateRequest, GenerateResult, GeneratedImage, ImagePipeline, LoraRequest, ProgressEvent } from './types.ts';
import type { Residency } from '../runtime/memory-plan.ts';

export { PipelineInputError } from './request.ts';
export { MattingModelError, transparentPrompt } from './background.ts';

/** Latent channels of FLUX.2 (32 VAE channels × 2×2 patch). */
export const LATENT_CHANNELS = 128;

export interface PipelineOptions {
  /** A model folder, a Hub repo id (its cache folder), or a resolved ModelFolder. Default: `$KLEIN_MODEL` / klein 4B. */
  model?: string | ModelFolder;
  variant?: VariantId;
  /** Where and how every component computes, resolved at the edge (cli/target-options.ts). */
  target: ExecutionTarget;
  /**
   * true: every component stays resident (a request that cannot fit that way is refused); false (default): each
   * loads for its stage and is released after it; 'auto': resident when all fit the memory plan (klein serve).
   * Always resident on a GPU.
   */
  keepLoaded?: boolean | 'auto';
  /** Memory to plan with instead of what the machine reports (bytes; --memory-limit). */
  memoryLimit?: number;
  /** float → uint8 rule of the output images (default: diffusers' rounding). */
  uint8Rule?: Uint8Rule;
  /** Largest transformer batch in rows (CFG counts 2 per image); default from the sequence length. */
  maxBatchRows?: number;
  /** Prompt-context cache (in memory, 256 MiB by default; each klein 4B prompt is 15.7 MB), shareable. */
  promptCache?: PromptEmbeddingCache;
  /** Folder of the matting model (BiRefNet) for transparent backgrounds; default: where `klein pull` puts it. */
  mattingModel?: string;
}

/** The reference images' latent tokens and their position ids. */
type ReferenceTokens = { tokens: Float32Array; ids: BigInt64Array; count: number };

/** What the denoising loop reads besides the request: the prompts' context, the references, the LoRAs. */
interface DenoiseInputs {
  text: { ctx: Float32Array; ctxLen: number };
  refs: ReferenceTokens | undefined;
  loras: AppliedLora[];
  maxRows: number;
}

/** The large components whose compute dtype a pipeline reports (the matting model always runs fp32). */
export type DtypeComponent = 'text-encoder' | 'transformer' | 'vae-encoder' | 'vae-decoder';

export class KleinPipeline implements ImagePipeline {
  readonly prompts: PromptEncoder;
  private readonly components: Components;
  /** LoRA files read for earlier requests (a repeated LoRA is not read again). */
  private readonly loras = new LoraCache();
  private busy = false;
  /** Set while a stage runs, so lazily loaded components charge their load time and progress to it. */
  private current?: { sw: Stopwatch; o?: GenerateOptions };

  private constructor(
    readonly model: ModelFolder,
    readonly tokenizer: KleinTokenizer,
    private readonly opts: PipelineOptions,
  ) {
    this.components = new Components(model, {
      target: opts.target,
      keepLoaded: opts.keepLoaded ?? false,
      memoryLimit: opts.memoryLimit,
      mattingModel: opts.mattingModel,
      maxPositions: tokenizer.maxLength,
      onLoad: (name, load) => this.timedLoad(name, load),
    });
    this.prompts = new PromptEncoder(tokenizer, this.components.text, opts.promptCache ?? new PromptEmbeddingCache());
  }

  /** Validates the model folder and loads the tokenizer; the large components load on first use. */
  static async open(opts: PipelineOptions): Promise<KleinPipeline> {
    const model = typeof opts.model === 'object' ? opts.model : openModelFolder(resolveModelPath(opts.model), { variant: opts.variant });
    return new KleinPipeline(model, KleinTokenizer.fromFolder(model.tokenizer), opts);
  }

  get variant() {
    return this.model.variant;
  }

  /** The transformer's hyperparameters (from its checkpoint header): what LoRAs are checked against. */
  get transformerConfig() {
    return this.components.transformerConfig;
  }

  /** The execution target every component runs with. */
  get target(): ExecutionTarget {
    return this.opts.target;
  }

  /** What each component computes in: fp32, fp16 (GPU) or int8 (fast mode's Linears, the rest fp32). */
  componentDtypes(): Record<DtypeComponent, ComponentDtype> {
    const t = this.opts.target;
    // the VAE computes in fp32 on every device (components.ts vaeFor)
    return { 'text-encoder': componentDtype(t, true), transformer: componentDtype(t, true), 'vae-encoder': 'fp32', 'vae-decoder': 'fp32' };
  }

  /** Which large components are in memory now (tests, health endpoints, memory reports). */
  loadedComponents(): ComponentName[] {
    return this.components.loaded();
  }

  /** The memory plan of the last request (or undefined before the first). */
  get residency(): Residency | undefined {
    return this.components.residency;
  }

  private emit(opts: GenerateOptions | undefined, e: ProgressEvent): void {
    opts?.onProgress?.(e);
  }

  private async timedLoad(name: ComponentName, load: () => Promise<unknown>): Promise<unknown> {
    const cur = this.current;
    if (!cur) return load();
    const label = { 'text-encoder': 'text encoder', transformer: 'transformer', 'vae-encoder': 'VAE encoder', 'vae-decoder': 'VAE decoder', matting: 'matting model' }[name];
    this.emit(cur.o, { stage: 'load', message: label });
    const out = await cur.sw.time('load', load);
    if (name === 'text-encoder') this.emit(cur.o, { stage: 'text', message: 'encoding' });
    return out;
  }

  /** The `[rows, 512, D]` context of the given prompts (cached per prompt) and whether any was truncated. */
  async encodePrompts(prompts: string[], sw = new Stopwatch(), o?: GenerateOptions): Promise<{ ctx: Float32Array; ctxLen: number; truncated: boolean }> {
    await this.components.releaseExcept('text-encoder');
    const outer = this.current;
    this.current = outer ?? { sw, o };
    try {
      this.emit(o, { stage: 'text', message: `encoding ${prompts.length} prompt${prompts.length > 1 ? 's' : ''}` });
      const e = await sw.time('text', () => this.prompts.encode(prompts));
      return { ctx: e.context, ctxLen: e.length, truncated: e.truncated.some(Boolean) };
    } finally {
      this.current = outer;
    }
  }

  async generate(req: GenerateRequest, o: GenerateOptions = {}): Promise<GenerateResult> {
    const r = resolveRequest(req, this.variant);
    // a transparent request without matting weights fails here, before minutes of generation are spent
    if (r.background === 'transparent') this.components.matting.resolve();
    if (this.busy) throw new Error('this pipeline is already generating; run requests one after another');
    this.busy = true;
    const sw = new Stopwatch();
    this.current = { sw, o };
    try {
      o.signal?.throwIfAborted();
      const { prepared, loras, maxRows } = await this.checkAndPlan(r, sw, o);

      // 1. text
      const prompt = promptForBackground(r.prompt, r.background);
      const text = await this.encodePrompts(r.useCfg ? ['', prompt] : [prompt], sw, o);
      o.signal?.throwIfAborted();
      // 2. references → tokens at t = 10, 20, …
      const refs = await this.encodeReferences(prepared, sw, o);
      // 3. denoise
      const x = await this.denoiseLatents(r, { text, refs, loras, maxRows }, sw, o);
      o.signal?.throwIfAborted();
      // 4. decode, one image at a time (the decoder's full-resolution activations dominate its memory)
      const rgb = await this.decodeImages(r, x, sw, o);
      await this.components.releaseExcept('matting');
      // 5. transparent: cut the subject out of each decoded image (straight RGBA)
      const pixels = r.background === 'transparent' ? await this.cutOutSubjects(rgb, sw, o) : rgb;
      // 6. encode the files
      const images = await this.encodeFiles(r, pixels, sw, o);
      const timings = { ...sw.timings, total: sw.total() };
      return { images, seed: r.seed, timings, ...(text.truncated ? { promptTruncated: true } : {}) };
    } catch (e) {
      await this.components.releaseExcept().catch(() => {});
      throw e;
    } finally {
      this.current = undefined;
      this.busy = false;
    }
  }

  /**
   * Everything that can refuse a request before any model loads: the reference images are decoded and checked (a
   * bad upload), the LoRA files read and checked against the model (LoraError), and the memory planned
   * (InsufficientMemoryError).
   */
  private async checkAndPlan(r: ResolvedRequest, sw: Stopwatch, o: GenerateOptions): Promise<{ prepared: PreparedReference[]; loras: AppliedLora[]; maxRows: number }> {
    const textTokens = this.tokenizer.maxLength;
    const rowsPerImage = r.useCfg ? 2 : 1;
    const maxRows = this.opts.maxBatchRows ?? defaultMaxRows((r.width / 16) * (r.height / 16) + textTokens, this.opts.target.device);
    const rows = Math.min(r.numImages, Math.max(1, Math.floor(maxRows / rowsPerImage))) * rowsPerImage;
    const prepared = await Promise.all(r.referenceImages.map((b) => prepareReferenceImage(b, { numReferences: r.referenceImages.length })));
    const loras = await this.readLoras(r.loras, sw, o);
    const refTokens = prepared.reduce((n, p) => n + (p.dims[2] / 16) * (p.dims[3] / 16), 0);
    const loraBytes = loras.length ? loraHostBytes(loras) : undefined;
    this.components.plan({ width: r.width, height: r.height, rows, refTokens, textTokens, refPixels: prepared.map((p) => p.dims[2] * p.dims[3]), transparent: r.background === 'transparent', loraBytes });
    return { prepared, loras, maxRows };
  }

  /** The reference images as VAE latent tokens (none without references). */
  private async encodeReferences(prepared: PreparedReference[], sw: Stopwatch, o: GenerateOptions): Promise<ReferenceTokens | undefined> {
    if (!prepared.length) return undefined;
    const vae = await this.components.vaeFor('encoder');
    this.emit(o, { stage: 'reference', message: `encoding ${prepared.length} reference image${prepared.length > 1 ? 's' : ''}` });
    const refs = await sw.time('reference', async () => {
      const latents = [];
      for (const p of prepared) {
        const e = await vae.encode(p.tensor, p.dims);
        latents.push({ data: e.latent, dims: e.dims });
      }
      return referenceTokens(latents);
    });
    o.signal?.throwIfAborted();
    return refs;
  }

  /** The seeds' noise taken through every step of the schedule: the batch's final latent tokens. */
  private async denoiseLatents(r: ResolvedRequest, inputs: DenoiseInputs, sw: Stopwatch, o: GenerateOptions): Promise<Float32Array> {
    const { text, refs, loras, maxRows } = inputs;
    const h = r.height / 16;
    const w = r.width / 16;
    const nImg = h * w;
    const B = r.numImages;
    const x = new Float32Array(B * nImg * LATENT_CHANNELS);
    for (let b = 0; b < B; b++) x.set(initialLatentTokens(r.seed + b, r.width, r.height, LATENT_CHANNELS), b * nImg * LATENT_CHANNELS);
    const timesteps = getSchedule(r.steps, imageSeqLen(r.width, r.height));
    const model = await this.components.transformer();
    // none: the base sessions, exactly as without LoRA support; else the LoRA sessions with this set's feeds
    await (loras.length ? sw.time('lora', () => model.setLoras(loras)) : model.setLoras([]));
    this.emit(o, { stage: 'denoise', step: 0, total: r.steps });
    await sw.time('denoise', () =>
      denoise(model, {
        x,
        batch: B,
        nImg,
        channels: LATENT_CHANNELS,
        xIds: imagePositionIds(h, w),
        ctx: text.ctx,
        ctxRows: r.useCfg ? 2 : 1,
        ctxLen: text.ctxLen,
        refTokens: refs?.tokens,
        refIds: refs?.ids,
        nRef: refs?.count ?? 0,
        timesteps,
        guidance: r.guidance,
        maxRows,
        signal: o.signal,
        onStep: (i, total) => this.emit(o, { stage: 'denoise', step: i + 1, total }),
      }),
    );
    return x;
  }

  /** Each image's latent tokens through the VAE decoder into 8-bit RGB. */
  private async decodeImages(r: ResolvedRequest, x: Float32Array, sw: Stopwatch, o: GenerateOptions): Promise<RgbImage[]> {
    const h = r.height / 16;
    const w = r.width / 16;
    const nImg = h * w;
    const vae = await this.components.vaeFor('decoder');
    const rgb: RgbImage[] = [];
    for (let b = 0; b < r.numImages; b++) {
      o.signal?.throwIfAborted();
      this.emit(o, { stage: 'decode', step: b + 1, total: r.numImages });
      const tokens = x.subarray(b * nImg * LATENT_CHANNELS, (b + 1) * nImg * LATENT_CHANNELS);
      const lat = tokensToLatent(tokens, [1, nImg, LATENT_CHANNELS], h, w);
      const img = await sw.time('decode', () => vae.decode(lat.data, lat.dims));
      rgb.push(tensorToRgb(img.image, img.dims, 0, this.opts.uint8Rule ?? DEFAULT_UINT8_RULE));
    }
    return rgb;
  }

  /** The subject of each image cut out by the matting model (loaded on first use, released after). */
  private async cutOutSubjects(rgb: RgbImage[], sw: Stopwatch, o: GenerateOptions): Promise<RgbaImage[]> {
    const matting = this.components.matting;
    if (!matting.loaded) {
      this.emit(o, { stage: 'load', message: 'matting model' });
      await sw.time('load', () => matting.load(this.opts.target));
    }
    const pixels: RgbaImage[] = [];
    for (const [b, im] of rgb.entries()) {
      o.signal?.throwIfAborted();
      this.emit(o, { stage: 'matting', step: b + 1, total: rgb.length });
      pixels.push(await sw.time('matting', () => matting.cutout(im, this.opts.target)));
    }
    await this.components.releaseExcept();
    return pixels;
  }

  /** The images as files of the requested format. */
  private async encodeFiles(r: ResolvedRequest, pixels: Array<RgbImage | RgbaImage>, sw: Stopwatch, o: GenerateOptions): Promise<GeneratedImage[]> {
    this.emit(o, { stage: 'output', message: r.outputFormat });
    const alpha = r.background === 'transparent';
    return sw.time('output', () =>
      Promise.all(
        pixels.map(async (im) => ({
          data: await encodeImage(im, r.outputFormat, { quality: r.quality }),
          width: im.width,
          height: im.height,
          contentType: CONTENT_TYPES[r.outputFormat],
          ...(alpha ? { hasAlpha: true } : {}),
        })),
      ),
    );
  }

  private async readLoras(requests: LoraRequest[], sw: Stopwatch, o: GenerateOptions): Promise<AppliedLora[]> {
    if (requests.length === 0) return [];
    this.emit(o, { stage: 'load', message: `${requests.length} LoRA${requests.length > 1 ? 's' : ''}` });
    return sw.time('lora', async () => this.loras.load(requests, this.components.transformerConfig));
  }

  async close(): Promise<void> {
    await this.components.close();
  }
}

/** Opens a pipeline; the CLI and the service call this. */
export async function openPipeline(opts: PipelineOptions): Promise<KleinPipeline> {
  return KleinPipeline.open(opts);
}
