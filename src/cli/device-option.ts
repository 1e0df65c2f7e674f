// `--device cpu|webgpu|cuda|auto` on every command that runs graphs (generate, edit, serve, worker, mcp, conform),
// with $KLEIN_DEVICE as the default on all of them: one variable means the same whatever command a host runs.
import { defaultDevice, parseDevice, type DeviceRequest } from '../graph/device.ts';
import { UsageError } from './errors.ts';

export const DEVICE_HELP = 'cpu, webgpu, cuda or auto (default: $KLEIN_DEVICE, else cpu)';

/** The flag when given, else $KLEIN_DEVICE, else cpu; a bad value names its source so the user knows what to fix. */
export function requestedDevice(flag: string | undefined): DeviceRequest {
  try {
    return flag !== undefined ? parseDevice(flag) : defaultDevice();
  } catch (e) {
    throw new UsageError(`${flag !== undefined ? '--device' : 'KLEIN_DEVICE'}: ${(e as Error).message}`);
  }
}
