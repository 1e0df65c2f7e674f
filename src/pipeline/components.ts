// The large components of a pipeline — text encoder, transformer, VAE encoder and decoder, matting model — and
// where they live. Before a request loads anything, its memory plan (memory-needs.ts → runtime/memory-plan.ts)
// says whether they can all stay resident or must take turns (each loaded for its stage, released after), or
// refuses the request; a component loads lazily when its stage first needs it.
import path from 'node:path';
import { Flux2Transformer } from '../models/flux2/runtime.ts';
import { openFlux2Checkpoint } from '../models/flux2/checkpoint.ts';
import type { Flux2Config } from '../models/flux2/config.ts';
import { KLEIN_OUTPUT_LAYERS, layersNeeded, readQwen3Config, type Qwen3Config } from '../models/qwen3/config.ts';
import { Qwen3TextEncoder } from '../models/qwen3/runtime.ts';
import { Flux2VAE } from '../models/vae/runtime.ts';
import { machineMemory, planResidency, type ComponentNeed, type Residency } from '../runtime/memory-plan.ts';
import type { ExecutionTarget, Precision } from '../runtime/target.ts';
import type { TextEmbedder } from '../text/prompt-encoder.ts';
import type { ModelFolder } from '../weights/model-folder.ts';
import { MattingComponent } from './background.ts';
import { mattingNeed, PROCESS_BASE, textEncoderNeed, transformerNeed, vaeNeed, type RequestShape } from './memory-needs.ts';

export type ComponentName = 'text-encoder' | 'transformer' | 'vae-encoder' | 'vae-decoder' | 'matting';

/** What the text encoder, transformer and VAE compute in: fp32, fp16 (GPU) or int8 (fast mode's Linears). */
export type ComponentDtype = 'fp32' | 'fp16' | 'int8';

/** Bytes per pixel of the VAE's activations, measured at real size (docs/benchmarks.md, VAE): decode 4.2 KB, encode 1.6 KB. */
const VAE_DECODE_BYTES_PER_PIXEL = 4300;
const VAE_ENCODE_BYTES_PER_PIXEL = 1700;

export interface ComponentOptions {
  target: ExecutionTarget;
  /** true: all resident (refused when they do not fit); false: one at a time; 'auto': resident when they fit. */
  keepLoaded: boolean | 'auto';
  /** Memory to plan with instead of what the machine reports (bytes). */
  memoryLimit?: number;
  mattingModel?: string;
  /** The tokenizer's window: the text encoder's RoPE table size. */
  maxPositions: number;
  /** Called when a component starts loading (progress events, timings). */
  onLoad?: (name: ComponentName, load: () => Promise<unknown>) => Promise<unknown>;
}

/**
 * The Qwen3 encoder behind the prompt cache, opened only when a prompt misses the cache, so a cached prompt never
 * costs the encoder's load. Its precision and dtype key the cache: contexts of other dtypes are never mixed.
 */
class LazyTextEmbedder implements TextEmbedder {
  readonly contextDim: number;
  readonly outputLayers = KLEIN_OUTPUT_LAYERS;
  encoder?: Qwen3TextEncoder;
  constructor(
    readonly folder: string,
    readonly weightFiles: string[],
    readonly precision: Precision,
    readonly computeDtype: ComponentDtype,
    readonly config: Qwen3Config,
    private readonly open: () => Promise<Qwen3TextEncoder>,
  ) {
    this.contextDim = KLEIN_OUTPUT_LAYERS.length * config.hiddenSize;
  }
  get loaded(): boolean {
    return this.encoder !== undefined;
  }
  async embed(inputIds: BigInt64Array, attentionMask: BigInt64Array, batch: number): Promise<Float32Array> {
    this.encoder ??= await this.open();
    return this.encoder.embed(inputIds, attentionMask, batch);
  }
  async close(): Promise<void> {
    await this.encoder?.close();
    this.encoder = undefined;
  }
}

/** The dtype a component computes in on `target` (int8 only where fast mode quantizes: text encoder, transformer). */
export function componentDtype(target: ExecutionTarget, quantized: boolean): ComponentDtype {
  if (target.device !== 'cpu') return target.gpuDtype;
  return quantized && target.precision === 'fast' ? 'int8' : 'fp32';
}

export class Components {
  readonly text: LazyTextEmbedder;
  readonly matting: MattingComponent;
  private transformerModel?: Flux2Transformer;
  private vae: Partial<Record<'encoder' | 'decoder', Flux2VAE>> = {};
  readonly transformerConfig: Flux2Config;
  /** The plan of the request in progress (or the last one). */
  residency?: Residency;

  constructor(
    readonly model: ModelFolder,
    private readonly o: ComponentOptions,
  ) {
    const teFolder = path.dirname(model.textEncoder.config!);
    const teConfig = readQwen3Config(teFolder);
    const open = () => this.load('text-encoder', () => Qwen3TextEncoder.load(teFolder, { target: o.target, maxPositions: o.maxPositions }));
    this.text = new LazyTextEmbedder(teFolder, model.textEncoder.files, o.target.precision, componentDtype(o.target, true), teConfig, open);
    this.transformerConfig = openFlux2Checkpoint(model.transformer.checkpoint).config; // the header only
    this.matting = new MattingComponent({ explicit: o.mattingModel, modelRoot: model.root });
  }

  private load<T>(name: ComponentName, fn: () => Promise<T>): Promise<T> {
    return (this.o.onLoad ? this.o.onLoad(name, fn) : fn()) as Promise<T>;
  }

  /** What each stage of `shape` needs; the process baseline is charged to every one. */
  needs(shape: RequestShape): ComponentNeed[] {
    const t = this.o.target;
    const withBase = (n: ComponentNeed): ComponentNeed => ({ ...n, anon: n.anon + PROCESS_BASE });
    const layers = layersNeeded({ outputLayers: KLEIN_OUTPUT_LAYERS });
    const tokens = (shape.width / 16) * (shape.height / 16) + shape.refTokens + shape.textTokens;
    const out = [
      textEncoderNeed(this.text.config, layers, t, shape.rows, shape.textTokens),
      transformerNeed(this.transformerConfig, t, shape.rows, tokens, shape.loraBytes ?? (this.transformerModel?.lorasOpen ? 0 : undefined)),
      vaeNeed('decoder', shape.width, shape.height, VAE_DECODE_BYTES_PER_PIXEL),
    ];
    if (shape.refPixels.length) out.push(vaeNeed('encoder', Math.max(...shape.refPixels), 1, VAE_ENCODE_BYTES_PER_PIXEL));
    if (shape.transparent) out.push(mattingNeed());
    return out.map(withBase);
  }

  /**
   * Plans a request before anything of it loads: throws InsufficientMemoryError (a UserError) when it cannot fit;
   * otherwise remembers whether its components may stay resident. Components already loaded count as ours.
   */
  plan(shape: RequestShape): Residency {
    const t = this.o.target;
    const advice =
      t.device !== 'cpu' ? 'use a smaller size or fewer images' : t.precision === 'exact' ? 'use --precision fast (int8 weights, about a quarter of the memory) or a smaller size' : 'use a smaller size or fewer images';
    const needs = this.needs(shape);
    const ours = needs.filter((n) => this.isLoaded(n.name)).reduce((a, n) => a + n.fileBacked + n.anon, 0);
    const keep = t.device !== 'cpu' ? true : this.o.keepLoaded;
    this.residency = planResidency(needs, machineMemory(this.o.memoryLimit, ours), keep, advice);
    return this.residency;
  }

  private isLoaded(need: string): boolean {
    return (need === 'text encoder' && this.text.loaded) || (need === 'transformer' && !!this.transformerModel) || (need === 'VAE encoder' && !!this.vae.encoder) || (need === 'VAE decoder' && !!this.vae.decoder) || (need === 'matting model' && this.matting.loaded);
  }

  private get resident(): boolean {
    return this.residency?.keepLoaded ?? this.o.keepLoaded === true;
  }

  /** Which large components are in memory now. */
  loaded(): ComponentName[] {
    const out: ComponentName[] = [];
    if (this.text.loaded) out.push('text-encoder');
    if (this.transformerModel) out.push('transformer');
    if (this.vae.encoder) out.push('vae-encoder');
    if (this.vae.decoder) out.push('vae-decoder');
    if (this.matting.loaded) out.push('matting');
    return out;
  }

  /** Releases every component except `keep`, unless the plan keeps them all resident. */
  async releaseExcept(keep?: ComponentName): Promise<void> {
    if (this.resident) return;
    if (keep !== 'text-encoder') await this.text.close();
    if (keep !== 'transformer') {
      await this.transformerModel?.close();
      this.transformerModel = undefined;
    }
    for (const dir of ['encoder', 'decoder'] as const) {
      if (keep === `vae-${dir}`) continue;
      await this.vae[dir]?.close();
      delete this.vae[dir];
    }
    if (keep !== 'matting') await this.matting.close();
  }

  async transformer(): Promise<Flux2Transformer> {
    await this.releaseExcept('transformer');
    this.transformerModel ??= await this.load('transformer', () => Flux2Transformer.load(this.model.transformer.checkpoint, { target: this.o.target }));
    return this.transformerModel;
  }

  /** The VAE in fp32 on every device: ORT's WebGPU Conv accumulates in fp16 (6.1 % rms off at real shapes). */
  async vaeFor(direction: 'encoder' | 'decoder'): Promise<Flux2VAE> {
    await this.releaseExcept(`vae-${direction}`);
    this.vae[direction] ??= await this.load(`vae-${direction}`, () => Flux2VAE.load(this.model.vae.checkpoint, { target: this.o.target, gpuDtype: 'fp32', only: direction }));
    return this.vae[direction]!;
  }

  async close(): Promise<void> {
    await this.text.close();
    await this.transformerModel?.close();
    for (const v of Object.values(this.vae)) await v?.close();
    await this.matting.close();
    this.transformerModel = undefined;
    this.vae = {};
  }
}
