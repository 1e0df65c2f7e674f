// Small graphs on the engine's own parts, as a model runtime builds them: a checkpoint's tensors as ModelWeights, the
// layer library with a weight policy, the weight store, compileGraph and an ORT session on a device.
import type { Graph } from '../../src/graph/onnx-graph.ts';
import { Layers, type ModelWeights } from '../../src/graph/nn/layers.ts';
import type { WeightPolicy } from '../../src/graph/nn/weight-policy.ts';
import type { Device } from '../../src/runtime/device.ts';
import { INT8_QUANTIZER_MODULE } from '../../src/runtime/int8-quantizer.ts';
import { compileGraph, openSession, type ort } from '../../src/runtime/session.ts';
import type { Checkpoint } from '../../src/weights/safetensors.ts';
import { WeightStore } from '../../src/weights/weight-store.ts';

/** A checkpoint's tensors under their stored names (no layout mapping). */
export function weightsOf(ck: Checkpoint): ModelWeights {
  return { parts: (name) => [ck.info(name)], has: (name) => ck.has(name) };
}

/** The layer library over `ck` writing into `g` with `policy`. */
export function layersOf(g: Graph, ck: Checkpoint, policy: WeightPolicy): Layers {
  return new Layers({ g, weights: weightsOf(ck), policy });
}

export interface Compiled {
  store: WeightStore;
  file: string;
  /** The compiled graph file already existed (same content). */
  cached: boolean;
}

/** Materialises `g`'s weights in a weight store (under $KLEIN_CACHE_DIR) and writes the graph beside them. */
export async function compile(g: Graph, policy: WeightPolicy, component = `test-${g.name}`): Promise<Compiled> {
  const store = await WeightStore.open({ component, tag: policy.tag, refs: [...g.weights.values()], quantizer: INT8_QUANTIZER_MODULE });
  return { store, ...compileGraph(g, store) };
}

/** An ORT session over a compiled graph on `device`, pre-packing weights as the runtime does for `policy`. */
export function sessionFor(file: string, device: Device, policy: WeightPolicy): Promise<ort.InferenceSession> {
  return openSession(file, { device, threads: 1, prepack: policy.dtype === 'int8' });
}
