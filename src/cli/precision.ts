// `--precision exact|fast` for every command that opens a pipeline (generate, edit, serve, worker, mcp), with
// $KLEIN_PRECISION as the default like $KLEIN_DEVICE, so a host can be switched to fast mode without editing scripts.
import type { Device, DeviceRequest } from '../graph/device.ts';
import type { Precision } from '../pipeline/types.ts';
import { UsageError } from './errors.ts';

export const PRECISIONS: readonly Precision[] = ['exact', 'fast'];

export const PRECISION_HELP = 'exact (fp32, matches the reference) or fast (int8 products in the text encoder and transformer; error in docs/benchmarks.md); default: $KLEIN_PRECISION, else exact';

/** A precision from the command line or the environment; `where` names the source in the error. */
export function parsePrecision(s: string, where = '--precision'): Precision {
  const p = s.trim().toLowerCase();
  if ((PRECISIONS as readonly string[]).includes(p)) return p as Precision;
  throw new UsageError(`${where}: unknown precision "${s}"; use one of: ${PRECISIONS.join(', ')}`);
}

/** The flag when given, else $KLEIN_PRECISION, else exact. */
export function resolvePrecision(flag: string | undefined): Precision {
  if (flag !== undefined) return parsePrecision(flag);
  const env = process.env.KLEIN_PRECISION;
  return env ? parsePrecision(env, 'KLEIN_PRECISION') : 'exact';
}

/**
 * Fast mode's int8 products exist only as CPU graphs, so fast with a GPU device is a contradiction in the request:
 * refused here, before anything loads, instead of failing deep inside a model's load. Call it with the requested
 * device (a named GPU is refused without probing it: the answer does not depend on the machine) and again with the
 * resolved one (`auto` that chose a GPU). `flags` are the raw option values: they tell a flag from the variable.
 */
export function refuseFastOnGpu(precision: Precision, device: DeviceRequest | Device, flags: { precision?: string; device?: string }): void {
  if (precision !== 'fast' || device === 'cpu' || device === 'auto') return;
  const asked = (flags.device ?? process.env.KLEIN_DEVICE ?? '').trim().toLowerCase();
  const p = `--precision fast${flags.precision === undefined ? ' (from $KLEIN_PRECISION)' : ''}`;
  const d = `--device ${asked === device ? device : `${asked} (here ${device})`}${flags.device === undefined ? ' (from $KLEIN_DEVICE)' : ''}`;
  throw new UsageError(`${p} cannot run with ${d}: fast mode (int8 products) runs on the CPU only; use --precision exact on ${device}, or --device cpu`);
}
