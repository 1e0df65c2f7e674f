// Number flags as every command (and `klein bench …`) parses them: a bad value is a UsageError naming the flag.
import { UsageError } from './errors.ts';

/** A whole number from a CLI string, or a UsageError naming the option. */
export function parseIntOption(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v.trim())) throw new UsageError(`${name} must be a whole number, got "${v}"`);
  const n = Number(v);
  if (!Number.isSafeInteger(n)) throw new UsageError(`${name} is too large: ${v}`);
  return n;
}

/** A finite number from a CLI string, or a UsageError naming the option. */
export function parseNumberOption(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n)) throw new UsageError(`${name} must be a number, got "${v}"`);
  return n;
}
