// ORT sessions over compiled graphs. A graph is serialized into its weight store's folder (its weights are external
// data there: the converted weights.bin and hard links to the checkpoint) under a name that hashes its bytes, so
// the cache follows the graph's content: a changed graph is a new file, an unchanged one is reused as is.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import ort from 'onnxruntime-node';
import type { Graph } from '../graph/onnx-graph.ts';
import type { WeightStore } from '../weights/weight-store.ts';
import { executionProviders, webgpuCpuNodes, type Device } from './device.ts';

export { ort };

export interface SessionOptions {
  device: Device;
  /** ORT intra-op threads; default all cores. */
  threads?: number;
  /**
   * Let ORT pre-pack constant weights into its kernels' layouts (anonymous memory, a copy of each packed weight).
   * Off for fp32 graphs: the mapped fp32 weights then stay page cache (measured within a few % of MatMul speed at
   * klein's shapes); on for int8, whose packed products are ~1.4× faster.
   */
  prepack: boolean;
  /**
   * WebGPU: graph outputs that stay in device memory (fed to another session on the device without a host copy;
   * the caller disposes them).
   */
  deviceOutputs?: readonly string[];
}

/** Writes `graph` into `store`'s folder (once per content) and returns the file's path. */
export function compileGraph(graph: Graph, store: WeightStore): { file: string; cached: boolean } {
  const bytes = graph.serialize((ref) => store.locate(ref));
  const hash = crypto.createHash('sha256').update(bytes).update(ort.env.versions.common).digest('hex').slice(0, 16);
  const file = path.join(store.folder, `${graph.name}-${hash}.onnx`);
  if (fs.existsSync(file)) return { file, cached: true };
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, bytes);
  fs.renameSync(tmp, file); // atomic: a concurrent reader sees either no file or a whole one
  return { file, cached: false };
}

export function sessionOptions(o: SessionOptions, forceCpuNodeNames?: string[]): ort.InferenceSession.SessionOptions {
  const opts: ort.InferenceSession.SessionOptions = {
    executionProviders: executionProviders(o.device, { forceCpuNodeNames }),
    graphOptimizationLevel: 'all',
    intraOpNumThreads: o.threads ?? os.availableParallelism(),
    interOpNumThreads: 1,
    executionMode: 'sequential',
    // one session per forward: its arena is reused across runs (with it off every intermediate is a fresh mmap,
    // and page faults made attention 2.6× slower, measured). ORT's memory pattern is off: it doubled the arena from
    // the second run of a shape on (VAE decode 1024²: 4.4 → 8.0 GiB anonymous) for no measurable speed
    enableCpuMemArena: true,
    enableMemPattern: false,
    extra: { session: { disable_prepacking: o.prepack ? '0' : '1' } },
  };
  if (o.deviceOutputs?.length && o.device === 'webgpu') {
    opts.preferredOutputLocation = Object.fromEntries(o.deviceOutputs.map((n) => [n, 'gpu-buffer' as const]));
  }
  // 0 = verbose: ORT then lists which nodes each provider got (how CPU fallbacks on webgpu/cuda were found)
  if (process.env.KLEIN_ORT_LOG_LEVEL) opts.logSeverityLevel = Number(process.env.KLEIN_ORT_LOG_LEVEL) as 0 | 1 | 2 | 3 | 4;
  return opts;
}

export async function openSession(file: string, o: SessionOptions): Promise<ort.InferenceSession> {
  const forceCpu = o.device === 'webgpu' ? await webgpuCpuNodes(file) : undefined;
  return ort.InferenceSession.create(file, sessionOptions(o, forceCpu));
}

export function f32(data: Float32Array, dims: readonly number[]): ort.Tensor {
  return new ort.Tensor('float32', data, dims);
}

export function i64(data: BigInt64Array, dims: readonly number[]): ort.Tensor {
  return new ort.Tensor('int64', data, dims);
}
