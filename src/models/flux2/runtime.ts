// The FLUX.2 transformer at run time: the forward (forward.ts) cut by the planner into its step-invariant part —
// the text projection and the RoPE tables, which depend on the prompt and the token positions only — computed once
// per image (`prepareContext`), and the per-step part (`step`). On a GPU the context stays in device memory, so a
// step uploads the latent (and its 4-byte timestep) and downloads the velocity, nothing else.
// LoRAs (`setLoras`) run on a second pair of sessions over the same weights, built on first use, whose forward adds
// low-rank side products (lora/apply.ts); requests without LoRAs keep the base sessions and their exact output.
import { Graph } from '../../graph/onnx-graph.ts';
import { Layers } from '../../graph/nn/layers.ts';
import { splitInvariant } from '../../graph/partition.ts';
import type { WeightPolicy } from '../../graph/nn/weight-policy.ts';
import { GraphSession, openGraphs, policyFor, type HostTransfers } from '../../runtime/component.ts';
import type { WeightStore } from '../../weights/weight-store.ts';
import { f32, i64, ort } from '../../runtime/session.ts';
import type { ExecutionTarget } from '../../runtime/target.ts';
import { openFlux2Checkpoint, type Flux2Weights } from './checkpoint.ts';
import { isBlockLinear, readsUnnormalisedInput, type Flux2Config } from './config.ts';
import { buildFlux2Forward, STEP_INVARIANT_INPUTS } from './forward.ts';
import { adaptsAnything, LoraAdapter, loraFeeds } from './lora/apply.ts';
import type { AppliedLora } from './lora/load.ts';

export interface Flux2ForwardInput {
  /** [batch, nTokens, inChannels]: target-image tokens followed by reference-image tokens. */
  x: Float32Array;
  /** [batch, nTokens, 4] positions (t, h, w, l). */
  xIds: BigInt64Array;
  /** [batch] sigma in [0, 1], one per sample. */
  timesteps: Float32Array;
  /** [batch, nCtx, contextInDim] text context. */
  ctx: Float32Array;
  /** [batch, nCtx, 4] text positions (0, 0, 0, l). */
  ctxIds: BigInt64Array;
  /** [batch] guidance values; only for guidance-embedding models (FLUX.2 [dev]). */
  guidance?: Float32Array;
  batch: number;
  nTokens: number;
  nCtx: number;
}

/** What `prepareContext` reads: the text context and every position; the same for every step of a generation. */
export type Flux2ContextInput = Pick<Flux2ForwardInput, 'xIds' | 'ctx' | 'ctxIds' | 'batch' | 'nTokens' | 'nCtx'>;
/** What changes from step to step. */
export type Flux2StepInput = Pick<Flux2ForwardInput, 'x' | 'timesteps' | 'guidance' | 'batch' | 'nTokens' | 'nCtx'>;

type Counts = { batch: number; nTokens: number; nCtx: number };

/** The step-invariant and per-step sessions of one build of the forward (base, or with LoRA side products). */
interface Sessions {
  context: GraphSession;
  stepper: GraphSession;
}

/** The LoRA set applied by the sessions with side products: their feeds (A and Bᵀ of every adapted Linear). */
interface ActiveLoras {
  sessions: Sessions;
  feeds: ReadonlyMap<string, ort.Tensor>;
  /** The set they were built from (the same loaded files at the same scales reuse them). */
  set: readonly AppliedLora[];
}

const sameSet = (a: readonly AppliedLora[], b: readonly AppliedLora[]) => a.length === b.length && a.every((x, i) => x.lora === b[i].lora && x.scale === b[i].scale);

/** The forward built with `policy` (and `adapter`'s side products), cut into its step-invariant part and the rest. */
function splitForward(w: Flux2Weights, policy: WeightPolicy, lora?: LoraAdapter): { graphs: [Graph, Graph]; carried: string[] } {
  const g = new Graph(lora ? 'flux2-lora' : 'flux2');
  buildFlux2Forward(new Layers({ g, weights: w, policy, adapter: lora?.adapter }), w.config);
  const { invariant, rest } = splitInvariant(g, new Set([...STEP_INVARIANT_INPUTS, ...(lora?.inputNames ?? [])]));
  return { graphs: [invariant, rest], carried: invariant.outputs.map((o) => o.value.name) };
}

/** The step-invariant values of one generation (device memory on a GPU); `dispose()` frees them. */
export class Flux2Context {
  disposed = false;
  constructor(
    readonly counts: Counts,
    readonly values: ReadonlyMap<string, ort.Tensor>,
    /** Host↔device copies its preparation made (zero on the CPU). */
    readonly transfers: HostTransfers,
    /** The LoRA set it was prepared with: its steps run on the LoRA sessions with these feeds. */
    readonly loras?: ActiveLoras,
  ) {}
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const v of this.values.values()) if (v.location === 'gpu-buffer') v.dispose();
  }
}

export interface Flux2LoadOptions {
  target: ExecutionTarget;
  /** First load of a checkpoint with a weight policy: after each weight is converted or quantized into the store. */
  onWeights?: (done: number, total: number, key: string) => void;
  /** Convert the weights again even if their store is valid (benchmarks of the first load). */
  rebuild?: boolean;
}

function checkCounts(inp: Counts): Counts {
  for (const [k, v] of Object.entries({ batch: inp.batch, nTokens: inp.nTokens, nCtx: inp.nCtx })) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`flux2 forward: ${k} must be a positive integer, got ${v}`);
  }
  return { batch: inp.batch, nTokens: inp.nTokens, nCtx: inp.nCtx };
}

function expectLength(name: string, arr: { length: number } | undefined, n: number): void {
  if (!arr) throw new RangeError(`flux2 forward: ${name} is required`);
  if (arr.length !== n) throw new RangeError(`flux2 forward: ${name} has ${arr.length} values, expected ${n}`);
}

/** A loaded FLUX.2 transformer: `forward` runs one model evaluation (one denoising step). */
export class Flux2Transformer {
  /** Host↔device copies of the last `step` (zero on the CPU). */
  lastTransfers: HostTransfers = { uploads: 0, downloads: 0 };
  /** The LoRA sessions (built by the first `setLoras` with a LoRA) and the set the next context is prepared with. */
  private lora?: { sessions: Sessions; adapter: LoraAdapter };
  private activeLoras?: ActiveLoras;
  /** The feeds built last, kept while requests without LoRAs run between two with the same set. */
  private lastLoras?: ActiveLoras;

  private constructor(
    private readonly base: Sessions,
    private readonly build: { weights: Flux2Weights; policy: WeightPolicy; store: WeightStore },
    readonly config: Flux2Config,
    readonly layout: Flux2Weights['layout'],
    readonly target: ExecutionTarget,
    /** What the products compute in: fp32, fp16 (GPU) or int8 (fast mode's block Linears; the rest fp32). */
    readonly computeDtype: 'fp32' | 'fp16' | 'int8',
    /** True when this load converted the weights (no valid weight store existed). */
    readonly weightsBuilt: boolean,
    /** fp16: weights beyond ±65504 clamped when the store was built. */
    readonly fp16Overflows: number,
    /** True when both compiled graphs came from the cache. */
    readonly graphCached: boolean,
  ) {}

  /** Opens a checkpoint (file, BFL folder or diffusers `transformer/` folder) on `opts.target`. */
  static async load(pathOrFolder: string, opts: Flux2LoadOptions): Promise<Flux2Transformer> {
    const w = openFlux2Checkpoint(pathOrFolder);
    const policy = policyFor(opts.target, { int8: isBlockLinear, int8SecondPass: readsUnnormalisedInput });
    const { graphs, carried } = splitForward(w, policy);
    const { store, sessions } = await openGraphs(graphs, { name: 'flux2-transformer', target: opts.target, policy, onWeights: opts.onWeights, rebuild: opts.rebuild }, [carried]);
    const [context, stepper] = sessions;
    const build = { weights: w, policy, store };
    return new Flux2Transformer({ context, stepper }, build, w.config, w.layout, opts.target, policy.dtype, store.built, store.stats.fp16Overflows, context.cached && stepper.cached);
  }

  /**
   * The LoRAs every context prepared from now on applies, each at its scale (several are stacked along the rank);
   * none, or all at scale 0: the base sessions, bit for bit. The first call with a LoRA opens the LoRA sessions
   * (same weights, graphs compiled once per content); later calls only build feeds (none for the set already
   * active: the same loaded files at the same scales). Contexts already prepared keep the set they were prepared
   * with.
   */
  async setLoras(loras: readonly AppliedLora[]): Promise<void> {
    if (!adaptsAnything(loras)) {
      this.activeLoras = undefined;
      return;
    }
    this.lora ??= await this.openLoraSessions();
    if (!this.lastLoras || !sameSet(this.lastLoras.set, loras)) {
      this.lastLoras = undefined; // the old feeds may go before the new ones are built
      const emptyRank = this.target.device === 'cpu' ? 0 : 1;
      this.lastLoras = { sessions: this.lora.sessions, feeds: loraFeeds(this.lora.adapter.inputs, loras, { emptyRank }), set: [...loras] };
    }
    this.activeLoras = this.lastLoras;
  }

  /** Whether the LoRA sessions are open (they stay open once a request used a LoRA). */
  get lorasOpen(): boolean {
    return this.lora !== undefined;
  }

  /** Whether the next prepared context applies LoRAs. */
  get lorasActive(): boolean {
    return this.activeLoras !== undefined;
  }

  private async openLoraSessions(): Promise<{ sessions: Sessions; adapter: LoraAdapter }> {
    const { weights, policy, store } = this.build;
    const adapter = new LoraAdapter({ carry: this.target.device !== 'cpu' });
    const { graphs, carried } = splitForward(weights, policy, adapter);
    const context = await GraphSession.open(graphs[0], store, this.target, policy, carried);
    try {
      return { sessions: { context, stepper: await GraphSession.open(graphs[1], store, this.target, policy) }, adapter };
    } catch (e) {
      await context.release();
      throw e;
    }
  }

  /** Velocity for every input token, [batch, nTokens, inChannels] (spec §1.3): `prepareContext`, then one `step`. */
  async forward(inp: Flux2ForwardInput): Promise<Float32Array> {
    const context = await this.prepareContext(inp);
    try {
      return await this.step(inp, context);
    } finally {
      context.dispose();
    }
  }

  /** Runs the step-invariant part once; a sampler passes the result to every `step` of a generation. */
  async prepareContext(inp: Flux2ContextInput): Promise<Flux2Context> {
    const c = this.config;
    const counts = checkCounts(inp);
    const { batch: B, nTokens: N, nCtx: L } = counts;
    const nAxes = c.axesDim.length;
    expectLength('xIds', inp.xIds, B * N * nAxes);
    expectLength('ctx', inp.ctx, B * L * c.contextInDim);
    expectLength('ctxIds', inp.ctxIds, B * L * nAxes);
    const feeds = new Map<string, ort.Tensor>([
      ['x_ids', i64(inp.xIds, [B, N, nAxes])],
      ['ctx', f32(inp.ctx, [B, L, c.contextInDim])],
      ['ctx_ids', i64(inp.ctxIds, [B, L, nAxes])],
    ]);
    const transfers = { uploads: 0, downloads: 0 };
    const loras = this.activeLoras;
    for (const [name, t] of loras?.feeds ?? []) feeds.set(name, t);
    const out = await (loras?.sessions ?? this.base).context.run(feeds, transfers);
    return new Flux2Context(counts, new Map(Object.entries(out)), transfers, loras);
  }

  /** One model evaluation with a prepared context: velocity for every input token, [batch, nTokens, inChannels]. */
  async step(inp: Flux2StepInput, context: Flux2Context): Promise<Float32Array> {
    const c = this.config;
    const { batch: B, nTokens: N, nCtx: L } = checkCounts(inp);
    if (context.disposed) throw new Error('flux2 step: the context was disposed');
    const k = context.counts;
    if (k.batch !== B || k.nTokens !== N || k.nCtx !== L) {
      throw new RangeError(`flux2 step: the context is for batch ${k.batch}, ${k.nTokens} tokens, ${k.nCtx} text tokens; the step has ${B}, ${N}, ${L}`);
    }
    expectLength('x', inp.x, B * N * c.inChannels);
    expectLength('timesteps', inp.timesteps, B);
    const values = new Map<string, ort.Tensor>([...(context.loras?.feeds ?? []), ...context.values, ['x', f32(inp.x, [B, N, c.inChannels])], ['timesteps', f32(inp.timesteps, [B])]]);
    if (c.useGuidanceEmbed) {
      expectLength('guidance', inp.guidance, B);
      values.set('guidance', f32(inp.guidance!, [B]));
    }
    const transfers = { uploads: 0, downloads: 0 };
    const out = await (context.loras?.sessions ?? this.base).stepper.run(values, transfers);
    this.lastTransfers = transfers;
    return out.output.data as Float32Array;
  }

  async close(): Promise<void> {
    const sessions = [this.base, ...(this.lora ? [this.lora.sessions] : [])];
    await Promise.all(sessions.flatMap((s) => [s.context.release(), s.stepper.release()]));
  }
}
