// The API's scale-out routes: workers announce themselves, report progress and upload results under
// /internal/worker/* with the shared KLEIN_WORKER_TOKEN; the queue's figures join the service's /metrics. Registered
// by createApp only when the service runs with a Redis queue.
import crypto from 'node:crypto';
import type { Context } from 'hono';
import { Counter, Gauge, type Registry } from 'prom-client';
import type { App } from '../context.ts';
import { ApiError } from '../errors.ts';
import { type Announce, type FailureBody, type ProgressBody, type ResultBody, WORKER_PREFIX } from './protocol.ts';
import type { RemotePipeline } from './remote-pipeline.ts';
import { WorkerRegistry } from './registry.ts';

export interface ScaleExtension {
  register(app: App): void;
  /** Its figures on the service's /metrics (metrics.ts). */
  registerMetrics(registry: Registry): void;
  health(): Record<string, unknown>;
  /** Graceful stop: how long runs on remote workers get to finish (their uploads still answered) before the rest are requeued. */
  readonly drainMs: number;
  /** Graceful stop, first step: jobs no worker has taken leave Redis and their runs wait in the run queue again. */
  withdrawWaiting(): Promise<number>;
}

/**
 * Default drain on stop: a few 4B runs on a GPU finish well within it, and it stays under the 30 s grace period of
 * Kubernetes' and Docker's default stop (SIGKILL after that would lose the drain's bookkeeping, not the runs).
 */
export const DRAIN_MS = 20_000;

const digest = (s: string) => crypto.createHash('sha256').update(s).digest();

export class ScaleApi implements ScaleExtension {
  readonly registry = new WorkerRegistry();
  private token: Buffer;

  readonly drainMs: number;

  constructor(readonly remote: RemotePipeline, token: string, opts: { drainMs?: number } = {}) {
    if (token.length < 16) throw new Error('KLEIN_WORKER_TOKEN must be at least 16 characters');
    this.token = digest(token);
    this.drainMs = opts.drainMs ?? DRAIN_MS;
  }

  withdrawWaiting(): Promise<number> {
    return this.remote.withdrawWaiting();
  }

  private check(c: Context): void {
    const h = c.req.header('authorization') ?? '';
    const given = h.startsWith('Bearer ') ? h.slice(7) : '';
    // compare digests: constant time whatever the lengths
    if (!given || !crypto.timingSafeEqual(digest(given), this.token)) throw new ApiError(401, 'UNAUTHENTICATED', 'worker routes need "Authorization: Bearer <KLEIN_WORKER_TOKEN>"');
  }

  health(): Record<string, unknown> {
    const c = this.remote.counts;
    return {
      backend: 'redis',
      redis_queue: { waiting: (c.waiting ?? 0) + (c.prioritized ?? 0), active: c.active ?? 0, delayed: c.delayed ?? 0 },
      models: this.registry.perModel(),
      workers: this.registry.live().map((w) => ({ id: w.id, model_id: w.model_id, device: w.device, precision: w.precision ?? 'exact', ...(w.gpu_dtype ? { gpu_dtype: w.gpu_dtype } : {}), free_memory_bytes: w.free_memory_bytes, busy: w.job !== null, stage: w.stage })),
    };
  }

  /** The queue's figures under the names `--queue` has always exposed (klein_runs and klein_step_seconds are metrics.ts'). */
  registerMetrics(registry: Registry): void {
    const registers = [registry];
    const remote = this.remote;
    const workers = this.registry;
    new Gauge({
      name: 'klein_queue_depth', help: 'Jobs in the Redis queue by state', labelNames: ['state'], registers,
      collect() {
        const c = remote.counts;
        this.set({ state: 'waiting' }, (c.waiting ?? 0) + (c.prioritized ?? 0));
        this.set({ state: 'active' }, c.active ?? 0);
        this.set({ state: 'delayed' }, c.delayed ?? 0);
      },
    });
    new Counter({ name: 'klein_jobs_taken_over_total', help: 'Jobs finished by another worker than the one that started them', registers, collect() { this.reset(); this.inc(remote.takenOver); } });
    new Counter({ name: 'klein_jobs_lost_total', help: 'Attempts settled because their job failed, was removed or vanished in Redis', registers, collect() { this.reset(); this.inc(remote.lostJobs); } });
    new Gauge({ name: 'klein_workers', help: 'Live workers (announced within the last 15 s)', registers, collect() { this.set(workers.live().length); } });
    new Gauge({
      name: 'klein_workers_busy', help: 'Workers running a job, per model', labelNames: ['model'], registers,
      collect() {
        this.reset();
        for (const [m, x] of Object.entries(workers.perModel())) this.set({ model: m }, x.busy);
      },
    });
  }

  register(app: App): void {
    const body = async <T>(c: Context): Promise<T> => {
      try {
        return (await c.req.json()) as T;
      } catch {
        throw new ApiError(400, 'BAD_REQUEST', 'body must be JSON');
      }
    };
    app.post(`${WORKER_PREFIX}/announce`, async (c) => {
      this.check(c);
      const a = await body<Announce>(c);
      if (typeof a.id !== 'string' || typeof a.model_id !== 'string') throw new ApiError(400, 'BAD_REQUEST', 'announce needs id and model_id');
      if (a.model_id !== this.remote.modelId) throw new ApiError(409, 'MODEL_MISMATCH', `this API serves ${this.remote.modelId}; the worker has ${a.model_id}`);
      this.registry.announce(a);
      return c.json({ ok: true });
    });
    app.post(`${WORKER_PREFIX}/leave`, async (c) => {
      this.check(c);
      this.registry.leave((await body<{ id: string }>(c)).id);
      return c.json({ ok: true });
    });
    app.post(`${WORKER_PREFIX}/jobs/:id/progress`, async (c) => {
      this.check(c);
      const b = await body<ProgressBody>(c);
      this.registry.progress(b.worker, c.req.param('id'), b.event.stage);
      // `continue: false`: the run was cancelled or its attempt abandoned; the worker stops between steps
      return c.json({ continue: this.remote.progress(c.req.param('id'), b.worker, b.event) });
    });
    app.post(`${WORKER_PREFIX}/jobs/:id/result`, async (c) => {
      this.check(c);
      const b = await body<ResultBody>(c);
      if (!Array.isArray(b.images)) throw new ApiError(400, 'BAD_REQUEST', 'result needs images');
      if (this.remote.complete(c.req.param('id'), b) === 'unknown') throw new ApiError(409, 'ALREADY_SETTLED', 'nobody waits for this job: it was settled by another worker, cancelled, or the API restarted');
      return c.json({ accepted: true });
    });
    app.post(`${WORKER_PREFIX}/jobs/:id/failure`, async (c) => {
      this.check(c);
      const b = await body<FailureBody>(c);
      if (this.remote.fail(c.req.param('id'), b) === 'unknown') throw new ApiError(409, 'ALREADY_SETTLED', 'nobody waits for this job');
      return c.json({ accepted: true });
    });
  }
}
