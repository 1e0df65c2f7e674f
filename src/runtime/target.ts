// The execution target: where and how a pipeline computes, resolved once at the edge (CLI flags, environment,
// service config) and passed down as is. Combinations that cannot work are refused here, before anything loads.
import { UserError } from '../errors.ts';
import { resolveDevice, type Device, type DeviceRequest } from './device.ts';
import { INT8_SCHEMES, type Int8Scheme } from '../graph/nn/weight-policy.ts';

/**
 * `exact`: fp32 products, the reference numbers. `fast`: the large Linear layers of the text encoder and the
 * transformer as int8 products on the CPU (errors stated in docs/benchmarks.md).
 */
export type Precision = 'exact' | 'fast';
export const PRECISIONS: readonly Precision[] = ['exact', 'fast'];

/** What the products of the text encoder and transformer compute in on a GPU. */
export type GpuDtype = 'fp32' | 'fp16';
export const GPU_DTYPES: readonly GpuDtype[] = ['fp32', 'fp16'];

export interface TargetRequest {
  device?: DeviceRequest;
  precision?: Precision;
  /** GPU devices only; default fp16 there. */
  gpuDtype?: GpuDtype;
  /** ORT intra-op threads; default all cores. */
  threads?: number;
  /** Fast mode's activation scheme; default $KLEIN_INT8_SCHEME, else DEFAULT_INT8_SCHEME. */
  int8Scheme?: Int8Scheme;
}

export interface ExecutionTarget {
  device: Device;
  precision: Precision;
  /** The GPU products' dtype; `fp32` on the CPU (which computes in fp32 or int8). */
  gpuDtype: GpuDtype;
  threads?: number;
  /** How fast mode's int8 products quantize activations (weight-policy.ts); absent: DEFAULT_INT8_SCHEME. */
  int8Scheme?: Int8Scheme;
}

export function parsePrecision(s: string, source = '--precision'): Precision {
  if ((PRECISIONS as readonly string[]).includes(s)) return s as Precision;
  throw new UserError(`${source}: unknown precision "${s}"; use one of: ${PRECISIONS.join(', ')}`);
}

export function parseGpuDtype(s: string, source = '--gpu-dtype'): GpuDtype {
  if ((GPU_DTYPES as readonly string[]).includes(s)) return s as GpuDtype;
  throw new UserError(`${source}: unknown GPU dtype "${s}"; use one of: ${GPU_DTYPES.join(', ')}`);
}

export function parseInt8Scheme(s: string, source = 'KLEIN_INT8_SCHEME'): Int8Scheme {
  if ((INT8_SCHEMES as readonly string[]).includes(s)) return s as Int8Scheme;
  throw new UserError(`${source}: unknown int8 scheme "${s}"; use one of: ${INT8_SCHEMES.join(', ')}`);
}

/** The request's int8 scheme, else $KLEIN_INT8_SCHEME's (the one place it is read), else none (the default). */
function requestedInt8Scheme(req: TargetRequest): Int8Scheme | undefined {
  if (req.int8Scheme) return req.int8Scheme;
  const env = process.env.KLEIN_INT8_SCHEME;
  return env ? parseInt8Scheme(env) : undefined;
}

/** Checks a request and probes its device; the result is what every component of a pipeline runs with. */
export async function resolveTarget(req: TargetRequest = {}): Promise<ExecutionTarget> {
  const precision = req.precision ?? 'exact';
  const named = req.device ?? 'cpu';
  // answers that do not depend on the machine come before the device probe
  if (precision === 'fast' && named !== 'cpu' && named !== 'auto') throw new UserError(`precision fast (int8 products) runs on the CPU only; use precision exact on ${named}`, 'unsupported_target');
  if (req.gpuDtype === 'fp16' && named === 'cpu') throw new UserError('fp16 compute needs a GPU device (--device webgpu or cuda); the CPU computes in fp32', 'unsupported_target');
  if (req.threads !== undefined && (!Number.isInteger(req.threads) || req.threads < 1)) throw new UserError(`threads must be a positive integer, got ${req.threads}`);
  const int8Scheme = requestedInt8Scheme(req);
  const device = precision === 'fast' && named === 'auto' ? 'cpu' : await resolveDevice(named);
  if (req.gpuDtype === 'fp16' && device === 'cpu') throw new UserError('fp16 compute needs a GPU device; `auto` found none here', 'unsupported_target');
  return { device, precision, gpuDtype: device === 'cpu' ? 'fp32' : (req.gpuDtype ?? 'fp16'), threads: req.threads, ...(int8Scheme ? { int8Scheme } : {}) };
}

/** A target for tests and tools: the CPU, exact unless said otherwise. */
export function cpuTarget(precision: Precision = 'exact', threads?: number): ExecutionTarget {
  return { device: 'cpu', precision, gpuDtype: 'fp32', threads };
}
