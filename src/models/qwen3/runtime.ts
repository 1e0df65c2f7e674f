// The Qwen3 text encoder at run time: the forward (forward.ts) built with the target's weight policy — fp32 weights
// on the CPU (exact), int8 projections (fast), fp16/fp32 products on a GPU — its weights materialised once in the
// weight store and mapped by ORT, one session. The prompt's embedding rows are read on the host per run.
import path from 'node:path';
import { Graph } from '../../graph/onnx-graph.ts';
import { Layers } from '../../graph/nn/layers.ts';
import { openGraphs, policyFor, type GraphSession } from '../../runtime/component.ts';
import { f32, i64, ort } from '../../runtime/session.ts';
import type { ExecutionTarget } from '../../runtime/target.ts';
import { throwIfOverflowed } from '../../weights/compute-dtype.ts';
import { Qwen3Weights } from './checkpoint.ts';
import { isProjection, KLEIN_OUTPUT_LAYERS, layersNeeded, Qwen3ConfigError, type Qwen3Config } from './config.ts';
import { buildQwen3Forward, type Qwen3Outputs } from './forward.ts';

export interface Qwen3LoadOptions {
  target: ExecutionTarget;
  /** Hidden states stacked into the context; default klein's 9/18/27. */
  outputLayers?: readonly number[];
  /** Hidden states also returned on their own (conformance, debugging). */
  hiddenStates?: readonly number[];
  /** Longest sequence accepted (RoPE table size); klein uses 512. */
  maxPositions?: number;
  /** First load of a checkpoint with a weight policy: after each weight is converted or quantized into the store. */
  onWeights?: (done: number, total: number, key: string) => void;
  /** Convert the weights again even if their store is valid (benchmarks of the first load). */
  rebuild?: boolean;
}

export interface Qwen3Output {
  /** `[batch, seq, outputLayers.length · hidden]` */
  context: Float32Array;
  hiddenStates: Map<number, Float32Array>;
}

/** The requested hidden states, checked against the model before anything is built. */
function outputsFor(c: Qwen3Config, o: Qwen3LoadOptions): Qwen3Outputs {
  const out = { outputLayers: o.outputLayers ?? KLEIN_OUTPUT_LAYERS, hiddenStates: o.hiddenStates ?? [], maxPositions: o.maxPositions ?? 512 };
  if (out.outputLayers.length === 0) throw new Qwen3ConfigError('at least one output layer is needed');
  for (const k of [...out.outputLayers, ...out.hiddenStates]) {
    if (!Number.isInteger(k) || k < 0 || k > c.numHiddenLayers) throw new Qwen3ConfigError(`hidden state ${k} does not exist (0..${c.numHiddenLayers})`);
  }
  if (!Number.isInteger(out.maxPositions) || out.maxPositions < 1) throw new RangeError(`maxPositions must be a positive integer, got ${out.maxPositions}`);
  return out;
}

/** A loaded Qwen3 text encoder: `embed` turns token ids into the stacked text context the transformer reads. */
export class Qwen3TextEncoder {
  private constructor(
    private readonly session: GraphSession,
    private readonly weights: Qwen3Weights,
    readonly folder: string,
    readonly outputs: Qwen3Outputs,
    readonly target: ExecutionTarget,
    /** What the products compute in: fp32, fp16 (GPU) or int8 (fast mode's projections); part of the prompt cache key. */
    readonly computeDtype: 'fp32' | 'fp16' | 'int8',
    /** Every checkpoint file the encoder reads: the prompt cache keys on their identity. */
    readonly weightFiles: string[],
    /** The weight store folder and whether this load built it (converted or quantized the weights). */
    readonly weightStore: { folder: string; built: boolean },
    /** fp16: weights beyond ±65504 clamped when the store was built. */
    readonly fp16Overflows: number,
    /** True when the compiled graph came from the cache. */
    readonly graphCached: boolean,
  ) {}

  /** Opens an HF Qwen3 folder (`config.json` + `model.safetensors` or a sharded index) on `opts.target`. */
  static async load(folder: string, opts: Qwen3LoadOptions): Promise<Qwen3TextEncoder> {
    const dir = path.resolve(folder);
    const w = Qwen3Weights.open(dir);
    const outputs = outputsFor(w.config, opts);
    const depth = layersNeeded(outputs);
    w.validate(depth);
    const policy = policyFor(opts.target, { int8: isProjection });
    const g = new Graph('qwen3');
    buildQwen3Forward(new Layers({ g, weights: w, policy }), w.config, outputs);
    const { store, sessions } = await openGraphs([g], { name: 'qwen3-text-encoder', target: opts.target, policy, onWeights: opts.onWeights, rebuild: opts.rebuild });
    const [session] = sessions;
    const weightStore = { folder: store.folder, built: store.built };
    return new Qwen3TextEncoder(session, w, dir, outputs, opts.target, policy.dtype, w.files(depth), weightStore, store.stats.fp16Overflows, session.cached);
  }

  get config(): Qwen3Config {
    return this.weights.config;
  }

  get outputLayers(): readonly number[] {
    return this.outputs.outputLayers;
  }

  get hiddenStates(): readonly number[] {
    return this.outputs.hiddenStates;
  }

  get maxPositions(): number {
    return this.outputs.maxPositions;
  }

  /** Width of one context token: `outputLayers.length · hidden` (7680 for Qwen3-4B). */
  get contextDim(): number {
    return this.outputLayers.length * this.config.hiddenSize;
  }

  /** Runs the encoder; ids and mask are `[batch, seq]` row-major. */
  async run(inputIds: BigInt64Array, attentionMask: BigInt64Array, batch: number): Promise<Qwen3Output> {
    if (!Number.isInteger(batch) || batch < 1) throw new RangeError(`batch must be a positive integer, got ${batch}`);
    if (inputIds.length % batch !== 0 || attentionMask.length !== inputIds.length) {
      throw new RangeError(`input_ids (${inputIds.length}) and attention_mask (${attentionMask.length}) must both hold batch × seq = ${batch} × seq values`);
    }
    const seq = inputIds.length / batch;
    if (seq > this.maxPositions) throw new RangeError(`sequence length ${seq} exceeds the encoder's ${this.maxPositions} positions`);
    const feeds = new Map<string, ort.Tensor>([
      ['inputs_embeds', f32(this.weights.embeddingRows(inputIds), [batch, seq, this.config.hiddenSize])],
      ['attention_mask', i64(attentionMask, [batch, seq])],
    ]);
    const out = await this.session.run(feeds, { uploads: 0, downloads: 0 });
    const context = out.context.data as Float32Array;
    // real Qwen3 checkpoints have a few huge activation channels: an fp16 overflow is a live risk, and the scan
    // of the context costs microseconds per prompt
    if (this.computeDtype === 'fp16') throwIfOverflowed(context, 'qwen3: the fp16 text encoder');
    const hiddenStates = new Map<number, Float32Array>();
    for (const k of this.hiddenStates) hiddenStates.set(k, out[`hidden_states.${k}`].data as Float32Array);
    return { context, hiddenStates };
  }

  /** The stacked text context `[batch, seq, contextDim]` the transformer consumes. */
  async embed(inputIds: BigInt64Array, attentionMask: BigInt64Array, batch: number): Promise<Float32Array> {
    return (await this.run(inputIds, attentionMask, batch)).context;
  }

  async close(): Promise<void> {
    await this.session.release();
  }
}
