// A model component at run time: its forward built once with the target's weight policy, cut by the planner into
// the graphs it runs as (e.g. a step-invariant part and a per-step part), their weights materialised in one weight
// store, and one ORT session per graph. Host↔device copies are counted per run.
import type { Graph } from '../graph/onnx-graph.ts';
import { Fp32Policy, GpuPolicy, Int8Policy, type WeightPolicy } from '../graph/nn/weight-policy.ts';
import { WeightStore } from '../weights/weight-store.ts';
import { compileGraph, openSession, ort } from './session.ts';
import { INT8_QUANTIZER_MODULE } from './int8-quantizer.ts';
import type { Device } from './device.ts';
import type { ExecutionTarget } from './target.ts';

/** Host↔device copies of runs on a GPU device (zero on the CPU). */
export interface HostTransfers {
  /** Host tensors fed to a session on the device. */
  uploads: number;
  /** Outputs returned to the host. */
  downloads: number;
}

/**
 * The weight policy a component computes with on `target`. `int8` names the Linears fast mode quantizes (the text
 * encoder and the transformer pass theirs; the VAE and matting model none: they stay exact), `int8SecondPass` those
 * of them that also multiply their activation's rounding residual (Int8Policy). `gpuDtype` overrides
 * the target's for components that must stay fp32 on GPUs (the VAE: ORT's WebGPU Conv accumulates in fp16).
 */
export function policyFor(target: ExecutionTarget, o: { int8?: (name: string) => boolean; int8SecondPass?: (name: string) => boolean; gpuDtype?: 'fp32' | 'fp16' } = {}): WeightPolicy {
  if (target.device !== 'cpu') return new GpuPolicy(o.gpuDtype ?? target.gpuDtype);
  if (target.precision === 'fast' && o.int8) return new Int8Policy(o.int8, target.int8Scheme, o.int8SecondPass);
  return new Fp32Policy();
}

/** One compiled graph's session on the target's device. */
export class GraphSession {
  private constructor(
    readonly session: ort.InferenceSession,
    readonly device: Device,
    /** True when the compiled graph came from the cache folder. */
    readonly cached: boolean,
  ) {}

  static async open(graph: Graph, store: WeightStore, target: ExecutionTarget, policy: WeightPolicy, deviceOutputs?: readonly string[]): Promise<GraphSession> {
    const { file, cached } = compileGraph(graph, store);
    const session = await openSession(file, { device: target.device, threads: target.threads, prepack: policy.dtype === 'int8', deviceOutputs });
    return new GraphSession(session, target.device, cached);
  }

  get inputNames(): readonly string[] {
    return this.session.inputNames;
  }

  /** Runs with the feeds the session takes from `values`, counting host tensors fed to and returned by a GPU. */
  async run(values: ReadonlyMap<string, ort.Tensor>, transfers: HostTransfers): Promise<Record<string, ort.Tensor>> {
    const feeds: Record<string, ort.Tensor> = {};
    for (const name of this.session.inputNames) {
      const v = values.get(name);
      if (!v) throw new Error(`session input ${name} has no value`);
      feeds[name] = v;
      if (this.device !== 'cpu' && v.location !== 'gpu-buffer') transfers.uploads++;
    }
    const out = await this.session.run(feeds);
    if (this.device !== 'cpu') for (const v of Object.values(out)) if (v.location !== 'gpu-buffer') transfers.downloads++;
    return out;
  }

  release(): Promise<void> {
    return this.session.release();
  }
}

export interface ComponentLoad {
  /** Names the component in the weight store (`flux2-transformer`). */
  name: string;
  target: ExecutionTarget;
  policy: WeightPolicy;
  /** While the weight store is built (first load of a checkpoint with this policy): after each weight. */
  onWeights?: (done: number, total: number, key: string) => void;
  /** Build the weight store again even if it is valid (benchmarks of the first load). */
  rebuild?: boolean;
}

/** Materialises the weights of `graphs` and opens a session per graph (`deviceOutputs[i]`: outputs kept on a GPU). */
export async function openGraphs(graphs: Graph[], o: ComponentLoad, deviceOutputs: Array<readonly string[] | undefined> = []): Promise<{ store: WeightStore; sessions: GraphSession[] }> {
  const refs = graphs.flatMap((g) => [...g.weights.values()]);
  const store = await WeightStore.open({ component: o.name, tag: o.policy.tag, refs, onProgress: o.onWeights, rebuild: o.rebuild, quantizer: INT8_QUANTIZER_MODULE });
  const sessions: GraphSession[] = [];
  try {
    for (const [i, g] of graphs.entries()) sessions.push(await GraphSession.open(g, store, o.target, o.policy, deviceOutputs[i]));
  } catch (e) {
    await Promise.all(sessions.map((s) => s.release()));
    throw e;
  }
  return { store, sessions };
}
