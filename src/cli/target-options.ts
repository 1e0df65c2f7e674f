// `--device`, `--precision`, `--gpu-dtype` (and `--threads`) on every command that runs graphs, each defaulting to
// its environment variable ($KLEIN_DEVICE, $KLEIN_PRECISION, $KLEIN_GPU_DTYPE, $KLEIN_THREADS): the one place the
// execution target is read from the outside world. It is checked here, with errors that name the flag or the
// variable at fault, and passed down resolved (runtime/target.ts); nothing below cli/ reads these variables.
import type { Command } from 'commander';
import { parseDevice, type Device, type DeviceRequest } from '../runtime/device.ts';
import { parseGpuDtype, parsePrecision, resolveTarget, type ExecutionTarget, type GpuDtype, type Precision } from '../runtime/target.ts';
import { DEFAULT_INT8_SCHEME } from '../graph/nn/weight-policy.ts';
import { parseMemorySize } from '../runtime/memory-plan.ts';
import { UsageError } from './errors.ts';

export const DEVICE_HELP = 'cpu, webgpu, cuda or auto (default: $KLEIN_DEVICE, else cpu)';
/** The bench and conform commands measure against the reference: exact unless asked. */
export const PRECISION_HELP = 'exact (fp32, matches the reference) or fast (int8 products in the text encoder and transformer; error in docs/benchmarks.md); default: $KLEIN_PRECISION, else exact';
/**
 * What the CPU computes in when neither `--precision` nor $KLEIN_PRECISION says, on the commands that make images
 * (generate, edit, serve, worker, mcp): fast mode holds issue 21's error bounds on the stress model at half the time
 * and 40 % of exact mode's memory (docs/benchmarks.md). GPUs compute exact (fast mode is CPU-only).
 */
export const CPU_DEFAULT_PRECISION: Precision = 'fast';
export const IMAGE_PRECISION_HELP = `exact (fp32, matches the reference) or fast (int8 products in the text encoder and transformer; error in docs/benchmarks.md); default: $KLEIN_PRECISION, else ${CPU_DEFAULT_PRECISION} on the CPU and exact on GPUs`;
export const GPU_DTYPE_HELP =
  "GPU devices only: the text encoder's and transformer's matrix products and weights in fp16 (half the memory) or fp32 (the reference numbers); norms, softmax, residual sums and the VAE stay fp32 either way. Default: $KLEIN_GPU_DTYPE, else fp16. The CPU always computes in fp32 (fp16 there is refused)";

/** The raw option values of a command (commander's camel case). */
export interface TargetFlags {
  device?: string;
  precision?: string;
  gpuDtype?: string;
  threads?: string;
}

/** Adds `--device`, `--precision` and `--gpu-dtype` (no commander defaults: the environment must supply them). */
export function addTargetOptions(cmd: Command): Command {
  return cmd.option('--device <device>', DEVICE_HELP).option('--precision <mode>', PRECISION_HELP).option('--gpu-dtype <dtype>', GPU_DTYPE_HELP);
}

/** The flag's value, else the variable's, parsed; an error names the flag or the variable it came from, once. */
function fromFlagOrEnv<T>(flag: string | undefined, env: string, flagName: string, parse: (s: string, source: string) => T): T | undefined {
  const raw = flag ?? process.env[env];
  if (raw === undefined || raw === '') return undefined;
  try {
    return parse(raw.trim().toLowerCase(), flag !== undefined ? flagName : env);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

/** The device asked for: the flag, else $KLEIN_DEVICE, else cpu. */
export function requestedDevice(flag: string | undefined): DeviceRequest {
  return fromFlagOrEnv(flag, 'KLEIN_DEVICE', '--device', parseDevice) ?? 'cpu';
}

/** The precision asked for: the flag, else $KLEIN_PRECISION, else none (the command's default for the device). */
export function requestedPrecision(flag: string | undefined): Precision | undefined {
  return fromFlagOrEnv(flag, 'KLEIN_PRECISION', '--precision', parsePrecision);
}

function requestedGpuDtype(flag: string | undefined, device: DeviceRequest): GpuDtype | undefined {
  const dtype = fromFlagOrEnv(flag, 'KLEIN_GPU_DTYPE', '--gpu-dtype', parseGpuDtype);
  // the variable is about GPUs: on the CPU only the flag can be wrong
  if (flag === undefined && device === 'cpu') return undefined;
  if (dtype === 'fp16' && device === 'cpu') throw new UsageError('--gpu-dtype fp16: fp16 compute needs a GPU device (--device webgpu or cuda); the CPU computes in fp32');
  return dtype;
}

function requestedThreads(flag: string | undefined): number | undefined {
  const raw = flag ?? process.env.KLEIN_THREADS;
  if (raw === undefined || raw === '') return undefined;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`${flag !== undefined ? '--threads' : 'KLEIN_THREADS'}: must be a positive integer, got "${raw}"`);
  return n;
}

/**
 * Fast mode's int8 products exist only as CPU graphs: fast with a GPU device is a contradiction in the request,
 * refused before anything loads. `device` is the request, or the device `auto` chose.
 */
export function refuseFastOnGpu(precision: Precision, device: DeviceRequest | Device, flags: TargetFlags): void {
  if (precision !== 'fast' || device === 'cpu' || device === 'auto') return;
  const asked = (flags.device ?? process.env.KLEIN_DEVICE ?? '').trim().toLowerCase();
  const p = `--precision fast${flags.precision === undefined ? ' (from $KLEIN_PRECISION)' : ''}`;
  const d = `--device ${asked === device ? device : `${asked} (here ${device})`}${flags.device === undefined ? ' (from $KLEIN_DEVICE)' : ''}`;
  throw new UsageError(`${p} cannot run with ${d}: fast mode (int8 products) runs on the CPU only; use --precision exact on ${device}, or --device cpu`);
}

/**
 * Reads and checks the flags and their variables, probes the device: the target every component runs with. With
 * no precision asked for, `cpuPrecision` on the CPU (exact unless the command says) and exact on GPUs.
 */
export async function targetFromFlags(flags: TargetFlags, o: { cpuPrecision?: Precision } = {}): Promise<ExecutionTarget> {
  const asked = requestedPrecision(flags.precision);
  const device = requestedDevice(flags.device);
  const gpuDtype = requestedGpuDtype(flags.gpuDtype, device); // an unknown dtype fails before a GPU is probed
  const threads = requestedThreads(flags.threads);
  if (asked) refuseFastOnGpu(asked, device, flags);
  const target = await resolveTarget({ device: asked === 'fast' && device === 'auto' ? 'auto' : device, precision: 'exact', gpuDtype, threads });
  if (asked) refuseFastOnGpu(asked, target.device, flags); // `auto` may have chosen a GPU
  return { ...target, precision: asked ?? (target.device === 'cpu' ? (o.cpuPrecision ?? 'exact') : 'exact') };
}

/** The start-line note for fast mode nobody asked for: that it is the default, and the flag for the other. */
export function defaultPrecisionNote(flags: TargetFlags, t: ExecutionTarget): string {
  if (requestedPrecision(flags.precision) !== undefined || t.device !== 'cpu' || t.precision !== 'fast') return '';
  return ', the CPU default; --precision exact gives the reference numbers';
}

/** `cpu`, `cpu (fast: int8)` or `webgpu in fp16`: the target as start lines print it. */
export function describeTarget(t: ExecutionTarget): string {
  if (t.device !== 'cpu') return `${t.device} in ${t.gpuDtype}`;
  if (t.precision !== 'fast') return 'cpu';
  return `cpu (fast: int8 products, ${t.int8Scheme ?? DEFAULT_INT8_SCHEME} activations)`;
}

export const MEMORY_LIMIT_HELP = 'memory to plan with instead of what the machine reports, e.g. 16G (default: $KLEIN_MEMORY_LIMIT, else the cgroup limit or MemAvailable); a request that cannot fit is refused before anything loads';

/** `--memory-limit` or $KLEIN_MEMORY_LIMIT in bytes, or undefined (plan with what the machine reports). */
export function memoryLimitFromFlag(flag: string | undefined): number | undefined {
  const raw = flag ?? process.env.KLEIN_MEMORY_LIMIT;
  if (raw === undefined || raw === '') return undefined;
  try {
    return parseMemorySize(raw, flag !== undefined ? '--memory-limit' : 'KLEIN_MEMORY_LIMIT');
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}
