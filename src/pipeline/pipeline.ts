// Text-to-image and multi-reference editing with FLUX.2 [klein], end to end (spec §9):
//   prompt → Qwen3 context (cached per prompt) ─┐
//   seed → Philox noise in packed latent space ─┼→ Euler steps of the flow transformer (CFG for base variants)
//   reference images → VAE latents → tokens ────┘        → tokens → latent → VAE decode → PNG/JPEG/WebP
// With `background: "transparent"` the decoded RGB goes through the matting model (BiRefNet) and foreground-colour
// estimation into straight RGBA PNG/WebP (background.ts, matting.ts); the prompt carries a plain-backdrop hint.
// Memory discipline: on the CPU only one large component (text encoder, transformer, VAE, matting model) is resident
// at a time — each is opened for its stage and released after it — unless `keepLoaded`; on a GPU all stay resident.
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { resolveComputeDtype, type ComputeDtype } from '../graph/compute-dtype.ts';
import { defaultDevice, resolveDevice } from '../graph/device.ts';
import type { Device, SessionConfig } from '../graph/session.ts';
import { Flux2Transformer, type Flux2Context, type Flux2ContextInput, type Flux2StepInput } from '../models/flux2-transformer.ts';
import { Flux2VAE } from '../models/flux2-vae.ts';
import { KLEIN_OUTPUT_LAYERS, Qwen3TextEncoder, readQwen3Config } from '../models/qwen3.ts';
import { PromptEmbeddingCache } from '../text/prompt-cache.ts';
import { PromptEncoder, type TextEmbedder } from '../text/prompt-encoder.ts';
import { KleinTokenizer } from '../text/tokenizer.ts';
import { openModelFolder, resolveModelPath, type ModelFolder, type VariantId } from '../weights/model-folder.ts';
import { MattingComponent, promptForBackground } from './background.ts';
import { CONTENT_TYPES, DEFAULT_UINT8_RULE, encodeImage, prepareReferenceImage, tensorToRgb, type RgbImage, type RgbaImage, type Uint8Rule } from './images.ts';
import { imagePositionIds, referenceTokens, tokensToLatent } from './latents.ts';
import { initialLatentTokens } from './noise.ts';
import { resolveRequest } from './request.ts';
import { cfgCombine, eulerStep, getSchedule, imageSeqLen } from './schedule.ts';
import type { GenerateOptions, GenerateRequest, GenerateResult, GeneratedImage, ImagePipeline, Precision, ProgressEvent } from './types.ts';

export { PipelineInputError, checkSize } from './request.ts';
export { MattingModelError, TRANSPARENT_PROMPT_HINT, transparentPrompt } from './background.ts';

/** Latent channels of FLUX.2 (32 VAE channels × 2×2 patch). */
export const LATENT_CHANNELS = 128;

export interface PipelineOptions {
  /** A model folder, a Hub repo id (its cache folder), or a resolved ModelFolder. Default: `$KLEIN_MODEL` / klein 4B. */
  model?: string | ModelFolder;
  variant?: VariantId;
  device?: Device;
  threads?: number;
  /** Keep every component resident between stages and requests (needs memory for all three). */
  keepLoaded?: boolean;
  /** float → uint8 rule of the output images (default: diffusers' rounding). */
  uint8Rule?: Uint8Rule;
  /** Largest transformer batch in rows (CFG counts 2 per image); default from the sequence length. */
  maxBatchRows?: number;
  /** Prompt-context cache (in memory, 256 MiB by default; each klein 4B prompt is 15.7 MB), shareable. */
  promptCache?: PromptEmbeddingCache;
  /** `exact` (default, fp32, matches the reference) or `fast` (int8 Linear layers; see types.ts). */
  precision?: Precision;
  /** Folder of the matting model (BiRefNet) for transparent backgrounds; default: where `klein pull` puts it. */
  mattingModel?: string;
  /**
   * GPU devices: the dtype of the text encoder's and transformer's weights and products (default $KLEIN_GPU_DTYPE,
   * else fp16; see graph/compute-dtype.ts). fp16 with the CPU is refused; the VAE and the matting model compute in
   * fp32 whatever it says (see loadVae).
   */
  gpuDtype?: ComputeDtype;
}

/** The large components whose compute dtype a pipeline reports (the matting model always runs fp32). */
export type DtypeComponent = 'text-encoder' | 'transformer' | 'vae-encoder' | 'vae-decoder';

/**
 * The model the sampler evaluates (`Flux2Transformer`): its step-invariant part (text projection, RoPE tables) is
 * prepared once per generation and chunk size, then every step runs on that context.
 */
export interface Denoiser {
  prepareContext(inp: Flux2ContextInput): Promise<Flux2Context>;
  step(inp: Flux2StepInput, context: Flux2Context): Promise<Float32Array>;
  close(): Promise<void>;
}

/**
 * The Qwen3 encoder behind the prompt cache, opened only when a prompt misses the cache and released after the
 * text stage on the CPU, so a cached prompt never costs the 8 GB encoder load.
 */
class LazyTextEmbedder implements TextEmbedder {
  readonly contextDim: number;
  readonly outputLayers = KLEIN_OUTPUT_LAYERS;
  private encoder?: Qwen3TextEncoder;
  constructor(
    private readonly folder: string,
    readonly weightFiles: string[],
    /** Part of the prompt cache key: a fast (int8) context is never served to an exact request. */
    readonly precision: Precision,
    /** Part of the prompt cache key too: an fp16 context is never served to an fp32 request, nor the reverse. */
    readonly computeDtype: ComputeDtype,
    private readonly open: (folder: string) => Promise<Qwen3TextEncoder>,
  ) {
    this.contextDim = KLEIN_OUTPUT_LAYERS.length * readQwen3Config(folder).hiddenSize;
  }
  get loaded(): boolean {
    return this.encoder !== undefined;
  }
  async embed(inputIds: BigInt64Array, attentionMask: BigInt64Array, batch: number): Promise<Float32Array> {
    if (!this.encoder) {
      const enc = await this.open(this.folder);
      // the cache key was fixed before the encoder existed: had it computed in another dtype than the key says,
      // its contexts would be stored under the other dtype's entries
      if (enc.computeDtype !== this.computeDtype) {
        await enc.close();
        throw new Error(`text encoder computes in ${enc.computeDtype}, but the prompt cache expected ${this.computeDtype}`);
      }
      this.encoder = enc;
    }
    return this.encoder.embed(inputIds, attentionMask, batch);
  }
  async close(): Promise<void> {
    await this.encoder?.close();
    this.encoder = undefined;
  }
}

// ------------------------------------------------------------------------------------------------ the sampler loop

export interface DenoiseInput {
  /** Target tokens `[batch, nImg, C]`, updated in place. */
  x: Float32Array;
  batch: number;
  nImg: number;
  channels: number;
  /** `[nImg, 4]` ids of the target grid (shared by every row). */
  xIds: BigInt64Array;
  /** `[ctxRows, L, D]`: one row (distilled) or `[uncond, cond]` (CFG), shared by every image. */
  ctx: Float32Array;
  ctxRows: 1 | 2;
  ctxLen: number;
  /** Reference tokens `[nRef, C]` and ids `[nRef, 4]`, appended after the target tokens of every row. */
  refTokens?: Float32Array;
  refIds?: BigInt64Array;
  nRef?: number;
  timesteps: Float32Array;
  guidance?: number;
  /** Most rows per model call; a larger batch runs in chunks of whole images. */
  maxRows?: number;
  /** After step i (0-based): the raw model output rows of the step's last chunk, for conformance. */
  onStep?: (i: number, total: number, modelOut: Float32Array) => void;
  signal?: AbortSignal;
}

function textIds(len: number): BigInt64Array {
  const ids = new BigInt64Array(len * 4);
  for (let l = 0; l < len; l++) ids[l * 4 + 3] = BigInt(l);
  return ids;
}

function repeatIds(src: BigInt64Array, times: number): BigInt64Array {
  const out = new BigInt64Array(src.length * times);
  for (let i = 0; i < times; i++) out.set(src, i * src.length);
  return out;
}

/**
 * The Euler loop of BFL `denoise` / `denoise_cfg` (spec §6.4, §6.6): each step runs the model on
 * `[target ‖ references]` tokens at t = sigma_i, keeps the target part of its output, combines `[uncond, cond]`
 * with the guidance scale when there are two context rows, and moves x by `(sigma_{i+1} − sigma_i) · v`.
 */
export async function denoise(model: Denoiser, inp: DenoiseInput): Promise<Float32Array> {
  const { batch, nImg, channels: C, ctxRows, ctxLen } = inp;
  const nRef = inp.nRef ?? 0;
  const n = nImg + nRef;
  const D = inp.ctx.length / (ctxRows * ctxLen);
  const rowsPerImage = ctxRows;
  const maxRows = Math.max(rowsPerImage, inp.maxRows ?? Infinity);
  const imagesPerCall = Math.max(1, Math.min(batch, Math.floor(maxRows / rowsPerImage)));
  const rowIds = new BigInt64Array(n * 4);
  rowIds.set(inp.xIds, 0);
  if (nRef) rowIds.set(inp.refIds!, nImg * 4);
  const steps = inp.timesteps.length - 1;
  // one context per chunk size (the last chunk of a batch may be smaller), prepared at the first step
  const contexts = new Map<number, Flux2Context>();
  try {
    for (let i = 0; i < steps; i++) {
      inp.signal?.throwIfAborted();
      const t = inp.timesteps[i];
      let lastOut: Float32Array = new Float32Array(0);
      for (let b0 = 0; b0 < batch; b0 += imagesPerCall) {
        const nb = Math.min(imagesPerCall, batch - b0);
        const rows = nb * rowsPerImage;
        const counts = { batch: rows, nTokens: n, nCtx: ctxLen };
        let context = contexts.get(nb);
        if (!context) {
          // row r: image (r mod nb), context row ⌊r / nb⌋ — uncond rows first, as the reference batches [uncond, cond]
          const ctx = new Float32Array(rows * ctxLen * D);
          for (let r = 0; r < rows; r++) {
            const cr = Math.floor(r / nb);
            ctx.set(inp.ctx.subarray(cr * ctxLen * D, (cr + 1) * ctxLen * D), r * ctxLen * D);
          }
          context = await model.prepareContext({ ...counts, ctx, xIds: repeatIds(rowIds, rows), ctxIds: repeatIds(textIds(ctxLen), rows) });
          contexts.set(nb, context);
        }
        const x = new Float32Array(rows * n * C);
        for (let r = 0; r < rows; r++) {
          const img = b0 + (r % nb);
          x.set(inp.x.subarray(img * nImg * C, (img + 1) * nImg * C), r * n * C);
          if (nRef) x.set(inp.refTokens!, (r * n + nImg) * C);
        }
        const out = await model.step({ ...counts, x, timesteps: new Float32Array(rows).fill(t) }, context);
        lastOut = out;
        // target part of every row: [rows, nImg, C]
        let v: Float32Array = new Float32Array(rows * nImg * C);
        for (let r = 0; r < rows; r++) v.set(out.subarray(r * n * C, r * n * C + nImg * C), r * nImg * C);
        if (ctxRows === 2) v = cfgCombine(v, inp.guidance ?? 1);
        eulerStep(inp.x.subarray(b0 * nImg * C, (b0 + nb) * nImg * C), v, t, inp.timesteps[i + 1], nb);
      }
      inp.onStep?.(i, steps, lastOut);
    }
  } finally {
    for (const c of contexts.values()) c.dispose();
  }
  return inp.x;
}

// ------------------------------------------------------------------------------------------------ the pipeline

type Timings = Record<string, number>;

/** Seconds per stage; a stage nested in another (a lazy load inside `text`) is charged to itself only. */
class Stopwatch {
  readonly timings: Timings = {};
  private readonly t0 = performance.now();
  private readonly open: number[] = []; // nested seconds of each running stage
  async time<T>(stage: string, fn: () => Promise<T>): Promise<T> {
    const s = performance.now();
    this.open.push(0);
    try {
      return await fn();
    } finally {
      const total = (performance.now() - s) / 1000;
      const nested = this.open.pop()!;
      this.timings[stage] = (this.timings[stage] ?? 0) + total - nested;
      if (this.open.length) this.open[this.open.length - 1] += total;
    }
  }
  total(): number {
    return (performance.now() - this.t0) / 1000;
  }
}

export class KleinPipeline implements ImagePipeline {
  private denoiser?: Denoiser;
  private vaeEncoder?: Flux2VAE;
  private vaeDecoder?: Flux2VAE;
  private readonly matting: MattingComponent;
  private readonly text: LazyTextEmbedder;
  readonly prompts: PromptEncoder;
  private busy = false;
  /** Set while a stage runs, so lazily loaded components charge their load time and progress to it. */
  private current?: { sw: Stopwatch; o?: GenerateOptions };
  /** What each component computed in when it was last loaded (kept after a CPU pipeline releases it). */
  private readonly dtypes: Partial<Record<DtypeComponent, ComputeDtype>> = {};

  private constructor(
    readonly model: ModelFolder,
    readonly tokenizer: KleinTokenizer,
    private readonly opts: PipelineOptions,
  ) {
    this.text = new LazyTextEmbedder(path.dirname(model.textEncoder.config!), model.textEncoder.files, this.precision, this.gpuDtype ?? 'fp32', (folder) => {
      const run = () =>
        Qwen3TextEncoder.load(folder, { session: { ...this.session, lowMemory: true }, maxPositions: tokenizer.maxLength, precision: this.precision }).then((enc) => {
          this.dtypes['text-encoder'] = enc.computeDtype;
          return enc;
        });
      const cur = this.current;
      if (!cur) return run();
      this.emit(cur.o, { stage: 'load', message: 'text encoder' });
      return cur.sw.time('load', run).then((enc) => {
        this.emit(cur.o, { stage: 'text', message: 'encoding' });
        return enc;
      });
    });
    this.prompts = new PromptEncoder(tokenizer, this.text, opts.promptCache ?? new PromptEmbeddingCache());
    this.matting = new MattingComponent({ explicit: opts.mattingModel, modelRoot: model.root });
  }

  /**
   * Validates the model folder and loads the tokenizer; the large components load on first use. The device (default
   * $KLEIN_DEVICE, else cpu) and the GPU dtype are fixed here, so every component loads with the same ones and
   * what the pipeline reports is what it runs.
   */
  static async open(opts: PipelineOptions = {}): Promise<KleinPipeline> {
    if (opts.precision !== undefined && opts.precision !== 'exact' && opts.precision !== 'fast') throw new Error(`precision must be "exact" or "fast", got ${JSON.stringify(opts.precision)}`);
    const device = opts.device ?? (await resolveDevice(defaultDevice()));
    const dtype = resolveComputeDtype(device, opts.gpuDtype); // refuses fp16 on the CPU
    const model = typeof opts.model === 'object' ? opts.model : openModelFolder(resolveModelPath(opts.model), { variant: opts.variant });
    const tokenizer = KleinTokenizer.fromFolder(model.tokenizer);
    return new KleinPipeline(model, tokenizer, { ...opts, device, gpuDtype: device === 'cpu' ? undefined : dtype });
  }

  get variant() {
    return this.model.variant;
  }

  /** `exact` (fp32) or `fast` (int8 Linear layers in the text encoder and the transformer), fixed at open. */
  get precision(): Precision {
    return this.opts.precision ?? 'exact';
  }

  /** The device every component runs on, resolved at open. */
  get device(): Device {
    return this.opts.device!;
  }

  /** On a GPU device: the dtype asked of every component, fixed at open; undefined on the CPU (always fp32). */
  get gpuDtype(): ComputeDtype | undefined {
    return this.opts.gpuDtype;
  }

  /** What each component loaded so far computes in, as the component itself says (reports, benches, tests). */
  componentDtypes(): Partial<Record<DtypeComponent, ComputeDtype>> {
    return { ...this.dtypes };
  }

  /** Which large components are in memory now (for tests, health endpoints and memory reports). */
  loadedComponents(): Array<'text-encoder' | 'transformer' | 'vae-encoder' | 'vae-decoder' | 'matting'> {
    const out: Array<'text-encoder' | 'transformer' | 'vae-encoder' | 'vae-decoder' | 'matting'> = [];
    if (this.text.loaded) out.push('text-encoder');
    if (this.denoiser) out.push('transformer');
    if (this.vaeEncoder) out.push('vae-encoder');
    if (this.vaeDecoder) out.push('vae-decoder');
    if (this.matting.loaded) out.push('matting');
    return out;
  }

  /** Components stay resident on a GPU, or on request; on the CPU each is released after its stage. */
  private get resident(): boolean {
    return this.opts.keepLoaded === true || (this.opts.device !== undefined && this.opts.device !== 'cpu');
  }

  /** The text encoder's, transformer's and VAE's session config: the GPU dtype travels with the device (the VAE overrides it). */
  private get session(): SessionConfig {
    return { ...this.mattingSession, ...(this.opts.gpuDtype ? { gpuDtype: this.opts.gpuDtype } : {}) };
  }

  /** The matting model keeps its fp32 graph on every device. */
  private get mattingSession(): SessionConfig {
    return { device: this.opts.device, threads: this.opts.threads };
  }

  private emit(opts: GenerateOptions | undefined, e: ProgressEvent): void {
    opts?.onProgress?.(e);
  }

  /** Releases everything that is not meant to stay resident (all of it on the CPU without keepLoaded). */
  private async releaseTransient(keep?: 'text' | 'transformer' | 'vae-encoder' | 'vae-decoder' | 'matting'): Promise<void> {
    if (this.resident) return;
    if (keep !== 'text' && this.text.loaded) await this.text.close();
    if (keep !== 'transformer' && this.denoiser) {
      await this.denoiser.close();
      this.denoiser = undefined;
    }
    if (keep !== 'vae-encoder' && this.vaeEncoder) {
      await this.vaeEncoder.close();
      this.vaeEncoder = undefined;
    }
    if (keep !== 'vae-decoder' && this.vaeDecoder) {
      await this.vaeDecoder.close();
      this.vaeDecoder = undefined;
    }
    if (keep !== 'matting') await this.matting.close();
  }

  private async loadTransformer(sw: Stopwatch, o?: GenerateOptions): Promise<Denoiser> {
    await this.releaseTransient('transformer');
    if (!this.denoiser) {
      this.emit(o, { stage: 'load', message: 'transformer' });
      const opts = { ...this.session, precision: this.precision };
      const tr = await sw.time('load', () => Flux2Transformer.load(this.model.transformer.checkpoint, opts));
      this.dtypes.transformer = tr.computeDtype;
      this.denoiser = tr;
    }
    return this.denoiser;
  }

  private async loadVae(which: 'encoder' | 'decoder', sw: Stopwatch, o?: GenerateOptions): Promise<Flux2VAE> {
    await this.releaseTransient(which === 'encoder' ? 'vae-encoder' : 'vae-decoder');
    const cur = which === 'encoder' ? this.vaeEncoder : this.vaeDecoder;
    if (cur) return cur;
    this.emit(o, { stage: 'load', message: `VAE ${which}` });
    // fp32 on every device: through ORT's WebGPU Conv, which accumulates in fp16, an fp16 decode at real shapes was
    // 6.1 % rms off the fp32 one (random weights, 64²), while fp16 would save only 168 MB of its 84 M weights
    // (docs/benchmarks.md, GPU). Flux2VAE's fp16 path stays for `klein bench vae` and the conformance.
    const vae = await sw.time('load', () => Flux2VAE.load(this.model.vae.checkpoint, { ...this.session, gpuDtype: 'fp32', only: which }));
    this.dtypes[which === 'encoder' ? 'vae-encoder' : 'vae-decoder'] = vae.computeDtype;
    if (which === 'encoder') this.vaeEncoder = vae;
    else this.vaeDecoder = vae;
    return vae;
  }

  /** The `[rows, 512, D]` context of the given prompts (cached per prompt) and whether any was truncated. */
  async encodePrompts(prompts: string[], sw = new Stopwatch(), o?: GenerateOptions): Promise<{ ctx: Float32Array; ctxLen: number; truncated: boolean }> {
    await this.releaseTransient('text');
    this.current = { sw, o };
    try {
      this.emit(o, { stage: 'text', message: `encoding ${prompts.length} prompt${prompts.length > 1 ? 's' : ''}` });
      const e = await sw.time('text', () => this.prompts.encode(prompts));
      return { ctx: e.context, ctxLen: e.length, truncated: e.truncated.some(Boolean) };
    } finally {
      this.current = undefined;
    }
  }

  async generate(req: GenerateRequest, o: GenerateOptions = {}): Promise<GenerateResult> {
    const r = resolveRequest(req, this.variant);
    // a transparent request without matting weights fails here, before minutes of generation are spent
    if (r.background === 'transparent') this.matting.resolve();
    if (this.busy) throw new Error('this pipeline is already generating; run requests one after another');
    this.busy = true;
    const sw = new Stopwatch();
    try {
      o.signal?.throwIfAborted();
      // reference images are decoded and checked first: a bad upload fails before any model loads
      const prepared = await Promise.all(r.referenceImages.map((b) => prepareReferenceImage(b, { numReferences: r.referenceImages.length })));

      // 1. text
      const prompt = promptForBackground(r.prompt, r.background);
      const prompts = r.useCfg ? ['', prompt] : [prompt];
      const text = await this.encodePrompts(prompts, sw, o);
      o.signal?.throwIfAborted();

      // 2. references → tokens at t = 10, 20, …
      let refs: { tokens: Float32Array; ids: BigInt64Array; count: number } | undefined;
      if (prepared.length) {
        const vae = await this.loadVae('encoder', sw, o);
        this.emit(o, { stage: 'reference', message: `encoding ${prepared.length} reference image${prepared.length > 1 ? 's' : ''}` });
        refs = await sw.time('reference', async () => {
          const latents = [];
          for (const p of prepared) {
            const e = await vae.encode(p.tensor, p.dims);
            latents.push({ data: e.latent, dims: e.dims });
          }
          return referenceTokens(latents);
        });
        o.signal?.throwIfAborted();
      }

      // 3. denoise
      const h = r.height / 16;
      const w = r.width / 16;
      const nImg = h * w;
      const B = r.numImages;
      const x = new Float32Array(B * nImg * LATENT_CHANNELS);
      for (let b = 0; b < B; b++) x.set(initialLatentTokens(r.seed + b, r.width, r.height, LATENT_CHANNELS), b * nImg * LATENT_CHANNELS);
      const timesteps = getSchedule(r.steps, imageSeqLen(r.width, r.height));
      const model = await this.loadTransformer(sw, o);
      this.emit(o, { stage: 'denoise', step: 0, total: r.steps });
      const seqLen = nImg + (refs?.count ?? 0) + text.ctxLen;
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
          maxRows: this.opts.maxBatchRows ?? defaultMaxRows(seqLen, this.opts.device),
          signal: o.signal,
          onStep: (i, total) => this.emit(o, { stage: 'denoise', step: i + 1, total }),
        }),
      );
      o.signal?.throwIfAborted();

      // 4. decode, one image at a time (the decoder's full-resolution activations dominate its memory)
      const vae = await this.loadVae('decoder', sw, o);
      const rgb: RgbImage[] = [];
      for (let b = 0; b < B; b++) {
        o.signal?.throwIfAborted();
        this.emit(o, { stage: 'decode', step: b + 1, total: B });
        const tokens = x.subarray(b * nImg * LATENT_CHANNELS, (b + 1) * nImg * LATENT_CHANNELS);
        const lat = tokensToLatent(tokens, [1, nImg, LATENT_CHANNELS], h, w);
        const img = await sw.time('decode', () => vae.decode(lat.data, lat.dims));
        rgb.push(tensorToRgb(img.image, img.dims, 0, this.opts.uint8Rule ?? DEFAULT_UINT8_RULE));
      }
      await this.releaseTransient();

      // 5. transparent: cut the subject out of each decoded image (straight RGBA)
      let pixels: Array<RgbImage | RgbaImage> = rgb;
      if (r.background === 'transparent') {
        await this.releaseTransient('matting');
        if (!this.matting.loaded) {
          this.emit(o, { stage: 'load', message: 'matting model' });
          await sw.time('load', () => this.matting.load(this.mattingSession));
        }
        pixels = [];
        for (const [b, im] of rgb.entries()) {
          o.signal?.throwIfAborted();
          this.emit(o, { stage: 'matting', step: b + 1, total: B });
          pixels.push(await sw.time('matting', () => this.matting.cutout(im, this.mattingSession)));
        }
        await this.releaseTransient();
      }

      // 6. encode the files
      this.emit(o, { stage: 'output', message: r.outputFormat });
      const alpha = r.background === 'transparent';
      const images: GeneratedImage[] = await sw.time('output', () =>
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
      const timings = { ...sw.timings, total: sw.total() };
      return { images, seed: r.seed, timings, ...(text.truncated ? { promptTruncated: true } : {}) };
    } catch (e) {
      await this.releaseTransient().catch(() => {});
      throw e;
    } finally {
      this.busy = false;
    }
  }

  async close(): Promise<void> {
    await this.text.close();
    await this.denoiser?.close();
    await this.vaeEncoder?.close();
    await this.vaeDecoder?.close();
    await this.matting.close();
    this.denoiser = this.vaeEncoder = this.vaeDecoder = undefined;
  }
}

/**
 * Rows per transformer call: attention activations grow with rows × seq², so on the CPU a batch of four 1024²
 * images (4 × 4608 tokens) runs as single images; on a GPU everything goes in one call.
 */
export function defaultMaxRows(seqLen: number, device?: Device): number {
  if (device && device !== 'cpu') return 8;
  return Math.max(1, Math.floor(12288 / seqLen));
}

/** Opens a pipeline; the CLI and the service call this. */
export async function openPipeline(opts: PipelineOptions = {}): Promise<KleinPipeline> {
  return KleinPipeline.open(opts);
}
