// Memory is planned, never discovered: before a component loads, what the request needs is compared with what the
// machine has, and a plan that fits is picked (everything resident, or one component at a time) or the request is
// refused with a message that says what is needed, what is free and what to do. A process killed by the kernel's
// OOM killer is the one outcome that is never acceptable.
//
// Two kinds of memory are told apart. Anonymous memory (activations, ORT arenas, pre-packed int8 weights) cannot be
// reclaimed: it must fit. File-backed memory (weights ORT maps from the weight store) is page cache: the kernel can
// drop it, but a component whose weights do not stay cached re-reads them from disk on every step — it runs, slowly.
import fs from 'node:fs';
import os from 'node:os';
import { UserError } from '../errors.ts';

export const GiB = 2 ** 30;

/** What one component needs while it runs a request. */
export interface ComponentNeed {
  name: string;
  /** Weights mapped from files (page cache while they are used). */
  fileBacked: number;
  /** Activations, arenas, pre-packed weights: memory the kernel cannot take back. */
  anon: number;
}

export interface MachineMemory {
  /** Bytes this process may still use: the cgroup limit minus its usage, or MemAvailable, whichever is smaller. */
  available: number;
  /** Where the figure comes from (cgroup v2 / v1, /proc/meminfo, a configured limit). */
  source: string;
}

/** Memory kept free for the process itself, Node, ORT's code and what the rest of the machine does meanwhile. */
export const HEADROOM = 1.5 * GiB;

function readNumber(file: string): number | undefined {
  try {
    const s = fs.readFileSync(file, 'utf8').trim();
    if (s === 'max') return undefined;
    const n = Number(s);
    return Number.isFinite(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

function memAvailable(): number | undefined {
  try {
    const m = /MemAvailable:\s+(\d+) kB/.exec(fs.readFileSync('/proc/meminfo', 'utf8'));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The memory this process can count on: `limit` (a configured cap, e.g. --memory-limit) when given, else the
 * smaller of the cgroup's room (v2 memory.max − memory.current, or v1) and MemAvailable. `resident` is what the
 * caller already holds and may count as its own (components it is about to release).
 */
export function machineMemory(limit?: number, resident = 0): MachineMemory {
  if (limit !== undefined) return { available: limit, source: 'the configured memory limit' };
  const candidates: Array<[number, string]> = [];
  const v2max = readNumber('/sys/fs/cgroup/memory.max');
  const v2cur = readNumber('/sys/fs/cgroup/memory.current');
  if (v2max !== undefined && v2cur !== undefined) candidates.push([v2max - v2cur + resident, 'the cgroup v2 limit']);
  const v1max = readNumber('/sys/fs/cgroup/memory/memory.limit_in_bytes');
  const v1cur = readNumber('/sys/fs/cgroup/memory/memory.usage_in_bytes');
  if (v1max !== undefined && v1cur !== undefined && v1max < 2 ** 60) candidates.push([v1max - v1cur + resident, 'the cgroup v1 limit']);
  const avail = memAvailable();
  candidates.push(avail !== undefined ? [avail + resident, 'MemAvailable'] : [os.freemem() + resident, 'free memory']);
  const [available, source] = candidates.reduce((a, b) => (b[0] < a[0] ? b : a));
  return { available, source };
}

/** Parses `12G`, `512M`, `16GiB`, `1e10` (bytes) for --memory-limit / KLEIN_MEMORY_LIMIT. */
export function parseMemorySize(s: string, source = '--memory-limit'): number {
  const m = /^\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(i?b)?\s*$/i.exec(s);
  const n = m ? Number(m[1]) : NaN;
  if (!m || !Number.isFinite(n) || n <= 0) throw new UserError(`${source}: "${s}" is not a memory size (e.g. 16G, 512M)`);
  const unit = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[m[2].toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  return Math.round(n * unit);
}

/** A request that cannot fit this machine's memory in any plan. */
export class InsufficientMemoryError extends UserError {
  override name = 'InsufficientMemoryError';
  constructor(
    message: string,
    readonly needed: number,
    readonly available: number,
  ) {
    super(message, 'insufficient_memory');
  }
}

export interface Residency {
  /** Every component stays loaded between stages and requests. */
  keepLoaded: boolean;
  /** The largest need of the chosen plan (bytes, anonymous + file-backed). */
  peak: number;
  /** The largest anonymous need. */
  peakAnon: number;
}

const gib = (b: number) => `${(b / GiB).toFixed(1)} GiB`;

function total(n: ComponentNeed): number {
  return n.fileBacked + n.anon;
}

/**
 * Picks where components live for a request: all resident when `keep` allows it and their sum fits, else one at
 * a time (each loaded for its stage, released after); throws InsufficientMemoryError when even the largest single
 * component does not fit. `advice` says what the user can change (precision, size), appended to the message.
 */
export function planResidency(needs: readonly ComponentNeed[], machine: MachineMemory, keep: boolean | 'auto', advice: string): Residency {
  const room = machine.available - HEADROOM;
  const sum = { anon: needs.reduce((a, n) => a + n.anon, 0), all: needs.reduce((a, n) => a + total(n), 0) };
  const largest = needs.reduce((a, n) => (total(n) > total(a) ? n : a), needs[0]);
  const largestAnon = Math.max(...needs.map((n) => n.anon));
  if (keep !== false && sum.all <= room) return { keepLoaded: true, peak: sum.all, peakAnon: sum.anon };
  if (keep === true) {
    throw new InsufficientMemoryError(
      `keeping every component loaded needs ${gib(sum.all)} (${needs.map((n) => `${n.name} ${gib(total(n))}`).join(', ')}), but ${gib(machine.available)} is available (${machine.source}) and klein keeps ${gib(HEADROOM)} free: drop --keep-loaded to load one component at a time${advice ? `, or ${advice}` : ''}`,
      sum.all,
      machine.available,
    );
  }
  if (total(largest) > room) {
    throw new InsufficientMemoryError(
      `this request needs ${gib(total(largest))} for the ${largest.name} (${gib(largest.fileBacked)} of weights mapped from disk + ${gib(largest.anon)} of activations), but ${gib(machine.available)} is available (${machine.source}) and klein keeps ${gib(HEADROOM)} free${advice ? `: ${advice}` : ''}`,
      total(largest),
      machine.available,
    );
  }
  return { keepLoaded: false, peak: total(largest), peakAnon: largestAnon };
}
