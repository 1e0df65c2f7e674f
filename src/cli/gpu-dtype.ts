// `--gpu-dtype fp16|fp32` for every command that opens a pipeline (generate, edit, serve, worker, mcp), with
// $KLEIN_GPU_DTYPE as the default. The rules themselves live in graph/compute-dtype.ts; this only names the source
// of a bad value (the flag or the environment variable) in the error, so the user knows which one to fix.
import type { Device } from '../graph/device.ts';
import { parseComputeDtype, resolveComputeDtype, type ComputeDtype } from '../graph/compute-dtype.ts';
import { UsageError } from './errors.ts';

export const GPU_DTYPE_HELP =
  'GPU devices only: the text encoder\'s and transformer\'s matrix products and weights in fp16 (half the memory) or fp32 (the reference numbers); norms, softmax, residual sums and the VAE stay fp32 either way. Default: $KLEIN_GPU_DTYPE, else fp16. The CPU always computes in fp32 (fp16 there is refused)';

/** The flag parsed on its own, before any device is probed (an unknown value fails fast). */
export function parseGpuDtypeFlag(flag: string | undefined): ComputeDtype | undefined {
  if (flag === undefined) return undefined;
  try {
    return parseComputeDtype(flag);
  } catch (e) {
    throw new UsageError(`--gpu-dtype: ${(e as Error).message}`);
  }
}

/**
 * The dtype a pipeline on `device` computes in: the flag, else $KLEIN_GPU_DTYPE, else fp16 — or undefined on the
 * CPU, which is always fp32 (asking for fp16 there by flag is a UsageError; the variable is about GPUs and ignored).
 */
export function resolveGpuDtype(flag: string | undefined, device: Device): ComputeDtype | undefined {
  const requested = parseGpuDtypeFlag(flag);
  let dtype: ComputeDtype;
  try {
    dtype = resolveComputeDtype(device, requested);
  } catch (e) {
    throw new UsageError(`${requested ? `--gpu-dtype ${requested}` : 'KLEIN_GPU_DTYPE'}: ${(e as Error).message}`);
  }
  return device === 'cpu' ? undefined : dtype;
}

/** `cpu`, or `webgpu in fp16`: the device as start lines print it. */
export function describeDevice(device: Device, gpuDtype: ComputeDtype | undefined): string {
  return gpuDtype ? `${device} in ${gpuDtype}` : device;
}
