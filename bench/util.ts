// Small helpers shared by the `klein bench` drivers: peak-RSS measurement and the benchmark cache folder.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/**
 * Resets the process's peak-RSS mark (Linux: writing "5" to /proc/self/clear_refs), so a figure covers only the
 * stage measured and not, say, the writing of a random checkpoint before it. Returns false where unsupported.
 */
export function resetPeakRss(): boolean {
  try {
    fs.writeFileSync('/proc/self/clear_refs', '5');
    return true;
  } catch {
    return false;
  }
}

/** Peak resident set size in bytes since start or the last `resetPeakRss()`. */
export function peakRssBytes(): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'));
    if (m) return Number(m[1]) * 1024;
  } catch {
    // not Linux: fall through
  }
  return process.resourceUsage().maxRSS * 1024;
}

/** Where benchmarks keep their generated inputs (random checkpoints): `$KLEIN_CACHE_DIR/bench` or ~/.cache/klein/bench. */
export function benchCacheDir(...sub: string[]): string {
  const dir = path.join(process.env.KLEIN_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'klein'), 'bench', ...sub);
  fs.mkdirSync(dir, { recursive: true });
  return dir;
}

/** Seconds taken by `fn`. */
export async function seconds<T>(fn: () => Promise<T> | T): Promise<[number, T]> {
  const t0 = performance.now();
  const r = await fn();
  return [(performance.now() - t0) / 1000, r];
}

export const GiB = 2 ** 30;
