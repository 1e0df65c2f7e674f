// Execution-device selection: which ONNX Runtime execution provider runs the graphs.
//
// `listSupportedBackends()` only says what the native binding was *built* for: onnxruntime-node 1.30 lists
// `cuda` on linux/x64 even when its provider library (downloaded from NuGet at install time) is absent, and
// `webgpu` even when Dawn finds no adapter. So every candidate is probed with a real tiny session, once per
// process, and a failed probe is turned into an error that says how to get that device.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import onnxProto from 'onnx-proto';
import ort from 'onnxruntime-node';
import { UserError } from '../errors.ts';
import { Graph, MS_DOMAIN } from '../graph/onnx-graph.ts';

export type Device = 'cpu' | 'webgpu' | 'cuda';
/** What a user may ask for: a device, or `auto` = the best one that works here. */
export type DeviceRequest = Device | 'auto';

export const DEVICES: readonly Device[] = ['cpu', 'webgpu', 'cuda'];
export const DEVICE_REQUESTS: readonly DeviceRequest[] = [...DEVICES, 'auto'];
/** `auto` prefers the fastest provider: CUDA, then WebGPU, then the CPU. */
const AUTO_ORDER: readonly Device[] = ['cuda', 'webgpu', 'cpu'];

/** A requested device cannot be used here; the message says how to get it. Exit code 2 from the CLI. */
export class DeviceUnavailableError extends UserError {
  override name = 'DeviceUnavailableError';
  override readonly code = 'device_unavailable';
  constructor(
    readonly device: Device,
    message: string,
  ) {
    super(message);
  }
}

export interface DeviceProbe {
  device: Device;
  /** The provider is in this onnxruntime-node build (`listSupportedBackends`). */
  built: boolean;
  /** A tiny session ran on it and gave the right numbers. */
  available: boolean;
  /** Why not, in words a user can act on (only when !available). */
  reason?: string;
  /** ORT's own message from the failed probe, for bug reports. */
  detail?: string;
  /** Time the probe took (session creation + one run), ms. */
  ms: number;
}

/** `source` (a flag or variable name) prefixes the error. */
export function parseDevice(s: string, source?: string): DeviceRequest {
  const d = s.trim().toLowerCase();
  if ((DEVICE_REQUESTS as readonly string[]).includes(d)) return d as DeviceRequest;
  throw new UserError(`${source ? `${source}: ` : ''}unknown device "${s}"; use one of: ${DEVICE_REQUESTS.join(', ')}`);
}

/**
 * The providers list for a session on `device`. ORT places nodes the provider has no kernel for on the CPU by
 * itself; `forceCpuNodeNames` (WebGPU only) adds nodes whose kernel exists but gives wrong numbers.
 */
export function executionProviders(device: Device, opts: { forceCpuNodeNames?: string[] } = {}): ort.InferenceSession.ExecutionProviderConfig[] {
  switch (device) {
    case 'cpu':
      return ['cpu'];
    case 'webgpu':
      return [opts.forceCpuNodeNames?.length ? { name: 'webgpu', forceCpuNodeNames: opts.forceCpuNodeNames } : { name: 'webgpu' }];
    case 'cuda':
      return [{ name: 'cuda', deviceId: Number(process.env.KLEIN_CUDA_DEVICE ?? 0) }];
  }
}

/**
 * Op types whose WebGPU kernel in onnxruntime-node 1.30 can give wrong results, so they may run on the CPU
 * provider when the device is webgpu. MultiHeadAttention (com.microsoft): on Mesa 25 lavapipe its output is off by
 * up to 40 % of its range from 32 query positions on (exact below 32; every head count and head size 32–256
 * tried), while the same attention as MatMul/Softmax/MatMul matches the CPU to 1e-6. On an NVIDIA H200 (Vulkan)
 * the same kernel is right to 3e-6. So it is pinned only where a self-test on this adapter fails.
 */
export const WEBGPU_SUSPECT_OPS: readonly string[] = ['MultiHeadAttention'];

/**
 * max |device − cpu| of ORT's MultiHeadAttention kernel run unpinned over `positions` positions (2 heads of 64,
 * fixed pseudo-random inputs: q, k in [-4, 4), v in [-1, 1)).
 */
export async function attentionError(device: Device, positions: number): Promise<number> {
  const [heads, dh] = [2, 64];
  const g = new Graph('klein-attention-check');
  const ins = ['q', 'k', 'v'].map((n) => g.input(n, 'float32', [1, positions, heads * dh]));
  g.output(g.op('MultiHeadAttention', ins, { num_heads: heads }, { domain: MS_DOMAIN }), 'y');
  const model = g.serialize();
  let seed = 1;
  const rnd = (amp: number) => Float32Array.from({ length: positions * heads * dh }, () => ((seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0) / 2 ** 31 - 1) * amp);
  const dims = [1, positions, heads * dh];
  const feeds = { q: new ort.Tensor('float32', rnd(4), dims), k: new ort.Tensor('float32', rnd(4), dims), v: new ort.Tensor('float32', rnd(1), dims) };
  const out: Float32Array[] = [];
  for (const d of ['cpu', device] as Device[]) {
    const session = await ort.InferenceSession.create(model, { executionProviders: executionProviders(d), logSeverityLevel: 3 });
    try {
      out.push((await session.run(feeds)).y.data as Float32Array);
    } finally {
      await session.release();
    }
  }
  let err = 0;
  for (let i = 0; i < out[0].length; i++) err = Math.max(err, Math.abs(out[0][i] - out[1][i]));
  return err;
}

let attentionBroken: Promise<boolean> | undefined;

/**
 * The nodes of a compiled graph to run on the CPU although the device is webgpu: with KLEIN_WEBGPU_CPU_OPS set
 * (comma-separated op types; empty = none), those ops; otherwise the graph's MultiHeadAttention nodes when the
 * kernel fails its self-test on this adapter (run once per process, and only for graphs that have such nodes).
 */
export async function webgpuCpuNodes(modelFile: string): Promise<string[]> {
  const env = process.env.KLEIN_WEBGPU_CPU_OPS;
  if (env !== undefined) return nodesOfTypes(modelFile, env.split(',').map((s) => s.trim()).filter(Boolean));
  const suspects = nodesOfTypes(modelFile, WEBGPU_SUSPECT_OPS);
  if (suspects.length === 0) return [];
  attentionBroken ??= attentionError('webgpu', 64).then((e) => !(e < 1e-4));
  return (await attentionBroken) ? suspects : [];
}

/** Names of the nodes in a compiled .onnx file whose op type is in `opTypes` (weights are external: the file is small). */
export function nodesOfTypes(modelFile: string, opTypes: readonly string[]): string[] {
  if (opTypes.length === 0) return [];
  const model = onnxProto.onnx.ModelProto.decode(fs.readFileSync(modelFile));
  return (model.graph?.node ?? []).filter((n) => opTypes.includes(n.opType ?? '')).map((n) => n.name ?? '').filter(Boolean);
}

/** The folder holding onnxruntime-node's native libraries for this platform. */
export function ortNativeDir(): string {
  const req = createRequire(import.meta.url);
  const pkg = path.dirname(req.resolve('onnxruntime-node/package.json'));
  return path.join(pkg, 'bin', 'napi-v6', process.platform, process.arch);
}

function cudaMissingReason(): string {
  return (
    'the CUDA execution provider is not installed. onnxruntime-node does not ship it in the npm package: its ' +
    'install script downloads libonnxruntime_providers_cuda.so from NuGet (built for CUDA 12 + cuDNN 9), which ' +
    'was skipped (ONNXRUNTIME_NODE_INSTALL=skip) or had no network. On a machine with an NVIDIA GPU and network ' +
    'access run `ONNXRUNTIME_NODE_INSTALL=cuda12 node node_modules/onnxruntime-node/script/install.js` ' +
    '(see README, "GPU"), or use --device webgpu, which runs on NVIDIA GPUs through Vulkan'
  );
}

function cudaLoadReason(detail: string): string {
  return (
    `the CUDA execution provider is installed but did not start (${firstLine(detail)}). It needs an NVIDIA ` +
    'driver, the CUDA 12 runtime libraries (libcudart, libcublas, libcufft, libcurand) and cuDNN 9 on the ' +
    'library path (LD_LIBRARY_PATH); see README, "GPU"'
  );
}

function webgpuReason(detail: string): string {
  if (/adapter/i.test(detail)) {
    return (
      'no WebGPU adapter: Dawn found no usable Vulkan driver. On a GPU machine install its Vulkan driver and ' +
      'the loader (Debian: libvulkan1; NVIDIA ships its ICD with the driver). On a CPU-only Debian 12 machine run ' +
      '`eval "$(scripts/setup-webgpu.sh)"` (Mesa 25 lavapipe; Debian 12\'s own Mesa 22 is too old for Dawn)' +
      (process.env.VK_ICD_FILENAMES ? `; VK_ICD_FILENAMES=${process.env.VK_ICD_FILENAMES} gave no adapter` : '')
    );
  }
  return `the WebGPU provider failed to start: ${firstLine(detail)}`;
}

function firstLine(s: string): string {
  // ORT prefixes messages with the source location; the part after the last "] " or ".cc:NNN " is the news.
  const line = s.split('\n').find((l) => l.trim()) ?? s;
  return line.replace(/^.*\.cc:\d+ [^ ]+ /, '').trim();
}

let probeModel: Uint8Array | undefined;
/** y = x * 2 + 1 over a [2, 4] input: enough to start a provider and check it computes. */
function tinyModel(): Uint8Array {
  if (!probeModel) {
    const g = new Graph('klein-device-probe');
    const x = g.input('x', 'float32', [2, 4]);
    g.output(g.op('Add', [g.op('Mul', [x, g.scalarF32(2)]), g.scalarF32(1)]), 'y');
    probeModel = g.serialize();
  }
  return probeModel;
}

async function runProbe(device: Device): Promise<DeviceProbe> {
  const t0 = performance.now();
  const built = ort.listSupportedBackends().some((b) => b.name === device);
  const result = (available: boolean, reason?: string, detail?: string): DeviceProbe => ({ device, built, available, reason, detail, ms: Math.round(performance.now() - t0) });
  if (!built) return result(false, `this onnxruntime-node build has no ${device} provider`);
  if (device === 'cuda' && !fs.existsSync(path.join(ortNativeDir(), 'libonnxruntime_providers_cuda.so'))) return result(false, cudaMissingReason());
  let session: ort.InferenceSession | undefined;
  try {
    // logSeverityLevel 4 (fatal only): a failed provider logs its own error before throwing ours.
    session = await ort.InferenceSession.create(tinyModel(), { executionProviders: executionProviders(device), logSeverityLevel: 4 });
    const x = new Float32Array([0, 1, 2, 3, -1, -2, 0.5, 100]);
    const out = await session.run({ x: new ort.Tensor('float32', x, [2, 4]) });
    const y = out.y.data as Float32Array;
    const bad = Array.from(x).findIndex((v, i) => y[i] !== v * 2 + 1);
    if (bad >= 0) return result(false, `the ${device} provider computed wrong numbers in a self-test (x=${x[bad]}: ${y[bad]}, expected ${x[bad] * 2 + 1})`);
    return result(true);
  } catch (e) {
    const detail = e instanceof Error ? e.message : String(e);
    const reason = device === 'cuda' ? cudaLoadReason(detail) : device === 'webgpu' ? webgpuReason(detail) : `the CPU provider failed: ${firstLine(detail)}`;
    return result(false, reason, detail);
  } finally {
    await session?.release();
  }
}

const probes = new Map<Device, Promise<DeviceProbe>>();

/** Probes one device (cached for the process: a provider does not appear or vanish while we run). */
export function probeDevice(device: Device): Promise<DeviceProbe> {
  let p = probes.get(device);
  if (!p) {
    p = runProbe(device);
    probes.set(device, p);
  }
  return p;
}

/** Probes every device, in `auto`'s order of preference. */
export async function probeDevices(): Promise<DeviceProbe[]> {
  const out: DeviceProbe[] = [];
  // One after another: two providers initialising at once in one process gains nothing and muddles errors.
  for (const d of AUTO_ORDER) out.push(await probeDevice(d));
  return out;
}

/**
 * Turns a request into a device that works here: `auto` → the first available of cuda, webgpu, cpu; a named
 * device → itself, or a DeviceUnavailableError saying how to get it.
 */
export async function resolveDevice(req: DeviceRequest = 'cpu'): Promise<Device> {
  if (req === 'cpu') return 'cpu'; // always there; not worth a probe session
  if (req === 'auto') {
    for (const d of AUTO_ORDER) if (d === 'cpu' || (await probeDevice(d)).available) return d;
    return 'cpu';
  }
  if (!(DEVICES as readonly string[]).includes(req)) throw new UserError(`unknown device "${String(req)}"; use one of: ${DEVICE_REQUESTS.join(', ')}`);
  const p = await probeDevice(req);
  if (!p.available) throw new DeviceUnavailableError(req, `device ${req} is not available: ${p.reason}`);
  return req;
}
