// The workers the API has heard from: what each announced (model, device, free memory, current job) and when.
// In memory on purpose: workers re-announce every few seconds, so a restarted API knows them again at once.
import type { Announce } from './protocol.ts';

/** A worker silent for this long no longer counts (it announces every ANNOUNCE_MS). */
export const WORKER_TTL_MS = 15_000;
export const ANNOUNCE_MS = 3_000;

export interface KnownWorker extends Announce {
  /** the last progress stage it reported for its current job */
  stage: string | null;
  seen_at: number;
  first_seen_at: number;
}

export class WorkerRegistry {
  private workers = new Map<string, KnownWorker>();

  announce(a: Announce, now = Date.now()): void {
    const prev = this.workers.get(a.id);
    const stage = prev && prev.job === a.job ? prev.stage : null;
    this.workers.set(a.id, { ...a, stage, seen_at: now, first_seen_at: prev?.first_seen_at ?? now });
  }

  /** A progress post: the worker is alive and at this stage of this job. */
  progress(id: string, job: string, stage: string, now = Date.now()): void {
    const w = this.workers.get(id);
    if (w) Object.assign(w, { job, stage, seen_at: now });
  }

  leave(id: string): void {
    this.workers.delete(id);
  }

  live(now = Date.now()): KnownWorker[] {
    for (const [id, w] of this.workers) if (now - w.seen_at > WORKER_TTL_MS) this.workers.delete(id);
    return [...this.workers.values()];
  }

  /** Per model: live workers (capacity: one run at a time each) and how many of them are busy. */
  perModel(now = Date.now()): Record<string, { workers: number; busy: number }> {
    const out: Record<string, { workers: number; busy: number }> = {};
    for (const w of this.live(now)) {
      const m = (out[w.model_id] ??= { workers: 0, busy: 0 });
      m.workers++;
      if (w.job) m.busy++;
    }
    return out;
  }
}
