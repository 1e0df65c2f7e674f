// Runtime sessions: compiled graphs are cached on disk beside the weights they reference and opened with
// onnxruntime-node. The cache key covers the graph's config, the weight files' identity and the runtime version,
// so a second start reuses the file and a changed checkpoint or upgrade rebuilds it.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import ort from 'onnxruntime-node';
import type { Graph } from './onnx-graph.ts';
import type { ComputeDtype } from './compute-dtype.ts';
import { defaultDevice, executionProviders, resolveDevice, webgpuCpuNodes, type Device, type DeviceRequest } from './device.ts';

export { ort };

/** Bump when graph-building code changes in a way the config key does not capture. */
export const GRAPH_FORMAT_VERSION = 1;

export type { Device, DeviceRequest } from './device.ts';

export interface SessionConfig {
  /** Default $KLEIN_DEVICE, else cpu; `auto` and GPU devices are checked (and resolved) by openSession, see device.ts. */
  device?: DeviceRequest;
  /** Intra-op threads; default: all cores. */
  threads?: number;
  /**
   * GPU devices: what the model's products compute in (default $KLEIN_GPU_DTYPE, else fp16; see
   * graph/compute-dtype.ts). Ignored on the CPU, which computes in fp32. Each model decides what stays fp32.
   */
  gpuDtype?: ComputeDtype;
  /**
   * Large models turn ORT's arena and memory patterns off: with them on, RSS grows by a copy of every
   * activation buffer per run (measured 5.3 GiB vs 1.1 GiB for a 1 GiB bf16 weight).
   */
  lowMemory?: boolean;
  /** Nodes to run on the CPU although the device is webgpu (openSession fills it from device.ts's list). */
  forceCpuNodeNames?: string[];
  /**
   * Bytes of initializers declared with `Graph.inMemoryWeight` (weights converted at load time), by location.
   * ORT reads them while the session is created; they may be dropped afterwards.
   */
  externalData?: Array<{ path: string; data: Uint8Array }>;
  /** Where ORT writes its optimised graph, for inspection (debugging only). */
  optimizedModelPath?: string;
  /**
   * Where the session's outputs are returned: `'gpu-buffer'` keeps them in WebGPU device memory, to be fed to
   * another session on the same device without a host copy (the caller must `dispose()` them). Default: host.
   */
  preferredOutputLocation?: ort.InferenceSession.SessionOptions['preferredOutputLocation'];
}

export interface CompiledGraph {
  /** Path of the .onnx file. */
  file: string;
  /** True when the file came from the cache and the graph was not rebuilt. */
  cached: boolean;
}

function fileIdentity(f: string): string {
  const st = fs.statSync(f);
  return `${fs.realpathSync(f)}:${st.size}:${Math.floor(st.mtimeMs)}`;
}

/** The deepest folder holding every file (ORT resolves external data only below the model file's folder). */
export function commonFolder(files: string[]): string {
  const dirs = files.map((f) => path.dirname(fs.realpathSync(f)).split(path.sep));
  const first = dirs[0];
  let n = first.length;
  for (const d of dirs.slice(1)) {
    let i = 0;
    while (i < n && i < d.length && d[i] === first[i]) i++;
    n = i;
  }
  return first.slice(0, n).join(path.sep) || path.sep;
}

function writable(dir: string): boolean {
  try {
    fs.accessSync(dir, fs.constants.W_OK);
  } catch {
    return false;
  }
  // access() says yes to root even on a read-only (r-x) folder such as a shared golden or model store; a folder
  // without any write bit is treated as read-only so klein never writes into it.
  return (fs.statSync(dir).mode & 0o222) !== 0;
}

/**
 * Returns the .onnx file for `key`, building it with `build()` only when no cached file exists. `weightFiles`
 * are the checkpoint files the graph will reference; the graph is written in their common folder. If that
 * folder is read-only, the graph goes into `$KLEIN_CACHE_DIR/graphs/<hash>/` with hard links to the weights
 * (no copy; ORT refuses symlinks that leave the model's folder).
 */
export function compileGraph(name: string, key: unknown, weightFiles: string[], build: () => Graph): CompiledGraph {
  if (weightFiles.length === 0) throw new Error(`graph ${name}: no weight files`);
  const hash = crypto
    .createHash('sha256')
    .update(JSON.stringify({ key, weights: weightFiles.map(fileIdentity).sort(), ort: ort.env.versions.common, v: GRAPH_FORMAT_VERSION }))
    .digest('hex')
    .slice(0, 16);
  let dir = commonFolder(weightFiles);
  const linkedFiles = new Map<string, string>();
  if (!writable(dir)) {
    const cacheRoot = process.env.KLEIN_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'klein');
    const linked = path.join(cacheRoot, 'graphs', `${name}-${hash}`);
    fs.mkdirSync(linked, { recursive: true });
    for (const f of weightFiles) {
      const target = path.join(linked, path.relative(dir, fs.realpathSync(f)));
      linkedFiles.set(fs.realpathSync(f), target);
      if (!fs.existsSync(target)) {
        fs.mkdirSync(path.dirname(target), { recursive: true });
        try {
          fs.linkSync(fs.realpathSync(f), target);
        } catch (e) {
          throw new Error(`cannot write the compiled graph beside ${f} (read-only) nor hard-link it into ${linked}: ${(e as Error).message}. Make the model folder writable.`);
        }
      }
    }
    dir = linked;
  }
  const file = path.join(dir, `.klein-${name}-${hash}.onnx`);
  if (fs.existsSync(file)) return { file, cached: true };
  const graph = build();
  const bytes = graph.serialize(dir, linkedFiles);
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, bytes);
  fs.renameSync(tmp, file); // atomic: a concurrent reader sees either no file or a whole one
  return { file, cached: false };
}

export function sessionOptions(cfg: SessionConfig = {}): ort.InferenceSession.SessionOptions {
  const threads = cfg.threads ?? Number(process.env.KLEIN_THREADS ?? os.availableParallelism());
  const opts: ort.InferenceSession.SessionOptions = {
    executionProviders: executionProviders(concreteDevice(cfg.device), { forceCpuNodeNames: cfg.forceCpuNodeNames }),
    graphOptimizationLevel: 'all',
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    executionMode: 'sequential',
  };
  if (cfg.lowMemory) {
    opts.enableCpuMemArena = false;
    opts.enableMemPattern = false;
  }
  if (cfg.optimizedModelPath) opts.optimizedModelFilePath = cfg.optimizedModelPath;
  if (cfg.externalData) opts.externalData = cfg.externalData;
  if (cfg.preferredOutputLocation) opts.preferredOutputLocation = cfg.preferredOutputLocation;
  // 0 = verbose: ORT then lists which nodes each provider got (how CPU fallbacks on webgpu/cuda were found).
  if (process.env.KLEIN_ORT_LOG_LEVEL) opts.logSeverityLevel = Number(process.env.KLEIN_ORT_LOG_LEVEL) as 0 | 1 | 2 | 3 | 4;
  return opts;
}

function concreteDevice(d: DeviceRequest | undefined): Device {
  const r = d ?? defaultDevice();
  if (r === 'auto') throw new Error("sessionOptions needs a concrete device: resolve 'auto' with resolveDevice() first (openSession does)");
  return r;
}

export async function openSession(file: string, cfg: SessionConfig = {}): Promise<ort.InferenceSession> {
  // Resolving first turns ORT's bare "Failed to load shared library" into an error that says how to get the device.
  const device = await resolveDevice(cfg.device ?? defaultDevice());
  const forceCpuNodeNames = device === 'webgpu' ? [...(cfg.forceCpuNodeNames ?? []), ...(await webgpuCpuNodes(file))] : cfg.forceCpuNodeNames;
  return ort.InferenceSession.create(file, sessionOptions({ ...cfg, device, forceCpuNodeNames }));
}

/** Compiles (or reuses) a graph and opens a session on it. */
export async function loadGraph(name: string, key: unknown, weightFiles: string[], build: () => Graph, cfg: SessionConfig = {}): Promise<{ session: ort.InferenceSession } & CompiledGraph> {
  const compiled = compileGraph(name, key, weightFiles, build);
  return { ...compiled, session: await openSession(compiled.file, cfg) };
}

export function f32(data: Float32Array, dims: readonly number[]): ort.Tensor {
  return new ort.Tensor('float32', data, dims);
}

export function i64(data: BigInt64Array, dims: readonly number[]): ort.Tensor {
  return new ort.Tensor('int64', data, dims);
}
