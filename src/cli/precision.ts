// `--precision exact|fast` for every command that opens a pipeline (generate, edit, serve, worker, mcp), with
// $KLEIN_PRECISION as the default like $KLEIN_DEVICE, so a host can be switched to fast mode without editing scripts.
import type { Command } from 'commander';
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

/** Adds the option (no commander default: the environment must be able to supply it). */
export function addPrecisionOption(cmd: Command): Command {
  return cmd.option('--precision <mode>', PRECISION_HELP);
}
