// Small helpers shared by the `klein bench` drivers: peak-RSS measurement and the benchmark cache folder.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';

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

/** Resident memory split as the kernel reports it: anonymous (heap, ORT arenas) vs file-backed (mapped weights). */
export interface MemoryFigures {
  rss: number;
  anon: number;
  file: number;
}

export function memoryNow(): MemoryFigures {
  const s = fs.readFileSync('/proc/self/status', 'utf8');
  const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(s)?.[1] ?? 0) * 1024;
  return { rss: kb('VmRSS'), anon: kb('RssAnon'), file: kb('RssFile') };
}

/**
 * Samples this process's /proc/self/status every `ms` into `peaks` (KiB: VmRSS, RssAnon, RssFile), from a worker
 * thread: onnxruntime-node runs a session synchronously on the main thread, so a timer there never fires mid-run.
 */
const SAMPLER_WORKER = `
const { workerData } = require('node:worker_threads');
const fs = require('node:fs');
const peaks = new Int32Array(workerData.peaks);
const keys = ['VmRSS', 'RssAnon', 'RssFile'];
setInterval(() => {
  const s = fs.readFileSync('/proc/self/status', 'utf8');
  keys.forEach((k, i) => {
    const m = new RegExp(k + ':\\\\s+(\\\\d+) kB').exec(s);
    if (m && Number(m[1]) > Atomics.load(peaks, i)) Atomics.store(peaks, i, Number(m[1]));
  });
}, workerData.ms);
`;

/**
 * Peak resident memory, anonymous and file-backed separately, sampled every `ms` by a worker thread (so also while
 * a session runs). The kernel's VmHWM covers the total only.
 */
export class MemorySampler {
  peak: MemoryFigures = { rss: 0, anon: 0, file: 0 };
  private readonly peaks = new Int32Array(new SharedArrayBuffer(12));
  private readonly worker?: Worker;
  constructor(ms = 100) {
    this.sample();
    if (fs.existsSync('/proc/self/status')) {
      this.worker = new Worker(SAMPLER_WORKER, { eval: true, workerData: { peaks: this.peaks.buffer, ms } });
      this.worker.unref();
    }
  }
  sample(): void {
    const m = memoryNow();
    const kib = (i: number) => Atomics.load(this.peaks, i) * 1024;
    this.peak = {
      rss: Math.max(this.peak.rss, m.rss, kib(0), peakRssBytes()),
      anon: Math.max(this.peak.anon, m.anon, kib(1)),
      file: Math.max(this.peak.file, m.file, kib(2)),
    };
  }
  stop(): MemoryFigures {
    void this.worker?.terminate();
    this.sample();
    return this.peak;
  }
}

/** `12.34 GiB (anonymous 1.23, file-backed 11.11)`. */
export function formatMemory(m: MemoryFigures): string {
  return `${(m.rss / GiB).toFixed(2)} GiB (anonymous ${(m.anon / GiB).toFixed(2)}, file-backed ${(m.file / GiB).toFixed(2)})`;
}
