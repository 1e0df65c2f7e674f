// The API's side of scale-out: an ImagePipeline whose generate() puts a BullMQ job in Redis and resolves when a
// worker uploads the result over HTTP. The run scheduler (queue.ts), the store and the ledger are unchanged: they
// still see one generate() per attempt, so a run is billed and called back once whatever the workers do.
// An attempt whose job dies in Redis (failed by BullMQ, removed, or gone) is rejected with AttemptLost, so no run
// waits forever on a result that cannot come.
import crypto from 'node:crypto';
import { Queue, QueueEvents } from 'bullmq';
import type { Logger } from 'pino';
import { type PipelineInputCode, PipelineInputError } from '../../pipeline/request.ts';
import { MattingModelError } from '../../weights/matting-folder.ts';
import type { GenerateOptions, GenerateRequest, GenerateResult, ImagePipeline, ProgressEvent } from '../../pipeline/types.ts';
import { AttemptLost } from '../queue.ts';
import { ENGINE_CRASHED, EngineCrashed } from '../engine-host.ts';
import { type FailureBody, type JobData, QUEUE_NAME, type ResultBody, toJob } from './protocol.ts';
import { closableWhileStarting } from './closable.ts';
import { redisConnection } from './redis.ts';

interface Pending {
  resolve: (r: GenerateResult) => void;
  reject: (e: Error) => void;
  opts?: GenerateOptions;
  /** every worker that reported progress for the job (more than one: it was taken over) */
  workers: Set<string>;
  /** the job is in Redis (queue.add resolved): from then on its fate there is checked */
  added: boolean;
  /** a stop is removing it from Redis: its 'removed' event is ours, not a loss */
  withdrawing?: boolean;
}

/** How often pending jobs are looked up in Redis, for fates no event reported (missed while disconnected, removed). */
export const SWEEP_MS = 5_000;

/** What BullMQ's failedReason means for someone reading a failed run. */
export function explainFailure(reason: string | undefined): string {
  if (!reason) return 'the Redis queue failed the job without a reason';
  if (/stalled more than allowable limit/.test(reason)) return `the job's workers stopped or lost its lock too many times (${reason})`;
  return `the job failed on its worker: ${reason}`;
}

export type Outcome = 'accepted' | 'unknown';

export class RemotePipeline implements ImagePipeline {
  readonly queue: Queue<JobData>;
  private pending = new Map<string, Pending>();
  /** Results for jobs that another worker had started (its worker died or stalled): stalled-job recovery at work. */
  takenOver = 0;
  /** Cached job counts, refreshed in the background so /v1/health and /metrics never wait on Redis. */
  counts: Record<string, number> = { waiting: 0, active: 0, delayed: 0 };
  /** Jobs this API settled from Redis' side (failed, removed or vanished there) rather than from a worker's post. */
  lostJobs = 0;
  private timer: NodeJS.Timeout;
  private sweeper: NodeJS.Timeout;
  /** BullMQ's event stream: a job failed in Redis (stalled too often, or its worker threw) settles its attempt. */
  private events: QueueEvents;

  constructor(url: string, readonly modelId: string, private log: Logger, sweepMs = SWEEP_MS) {
    this.queue = closableWhileStarting(new Queue<JobData>(QUEUE_NAME, { connection: redisConnection(url) }), log);
    this.queue.on('error', (e) => this.log.warn({ err: e }, 'redis queue error'));
    // its own connection (XREAD blocks); ioredis reconnects and the stream is read on from the last event seen
    this.events = closableWhileStarting(new QueueEvents(QUEUE_NAME, { connection: redisConnection(url) }), log);
    this.events.on('error', (e) => this.log.warn({ err: e }, 'redis queue events error'));
    this.events.on('failed', ({ jobId, failedReason }) => this.lose(jobId, explainFailure(failedReason)));
    this.events.on('removed', ({ jobId }) => this.lose(jobId, 'the job was removed from Redis before a worker finished it'));
    this.timer = setInterval(() => void this.refresh(), 1000);
    this.timer.unref();
    this.sweeper = setInterval(() => void this.sweep(), sweepMs);
    this.sweeper.unref();
  }

  /** Settle a pending attempt whose job is dead in Redis. */
  private lose(jobId: string, reason: string): void {
    const p = this.pending.get(jobId);
    if (!p || p.withdrawing) return;
    this.pending.delete(jobId);
    this.lostJobs++;
    this.log.warn({ job: jobId, workers: [...p.workers], reason }, 'job lost in the Redis queue');
    p.reject(new AttemptLost(reason));
  }

  /**
   * Look every pending job up in Redis: catches what no event said — a 'failed' published while this API was
   * disconnected, a job gone with the data (FLUSHALL, eviction), or one a worker completed without a result reaching
   * this API. A result posted meanwhile wins: only jobs still pending after the lookup are settled.
   */
  async sweep(): Promise<void> {
    const ids = [...this.pending].filter(([, p]) => p.added && !p.withdrawing).map(([id]) => id);
    await Promise.all(ids.map(async (id) => {
      try {
        const state = await this.queue.getJobState(id);
        if (state === 'failed') {
          const job = await this.queue.getJob(id);
          this.lose(id, explainFailure(job?.failedReason));
        } else if (state === 'unknown') this.lose(id, 'the job is no longer in Redis (removed, or the data was lost) and no worker reported a result');
        else if (state === 'completed') this.lose(id, 'a worker completed the job in Redis without its result reaching the API');
      } catch (e) {
        this.log.warn({ err: e, job: id }, 'cannot look the job up in Redis');
      }
    }));
  }

  /**
   * A stopping API hands back the jobs no worker has taken (removed from Redis; their runs go back to the run queue
   * without using an attempt) and leaves the running ones to finish while it drains. Returns how many it withdrew.
   */
  async withdrawWaiting(): Promise<number> {
    let n = 0;
    await Promise.all([...this.pending].filter(([, p]) => p.added).map(async ([id, p]) => {
      p.withdrawing = true;
      // a job a worker holds is locked: remove() refuses it (0) and it runs on
      const removed = await this.queue.remove(id).catch(() => 0);
      p.withdrawing = false;
      if (removed !== 1 || this.pending.get(id) !== p) return;
      this.pending.delete(id);
      n++;
      p.reject(new AttemptLost('the API stopped before a worker took the job', false));
    }));
    return n;
  }

  async refresh(): Promise<Record<string, number>> {
    try {
      this.counts = await this.queue.getJobCounts('waiting', 'active', 'delayed', 'prioritized');
    } catch (e) {
      this.log.warn({ err: e }, 'cannot read queue depth');
    }
    return this.counts;
  }

  get inFlight(): number {
    return this.pending.size;
  }

  async generate(req: GenerateRequest, opts?: GenerateOptions): Promise<GenerateResult> {
    // a fresh id per attempt: a job left in Redis by an attempt the API gave up on can never complete this one
    const id = crypto.randomUUID();
    const done = new Promise<GenerateResult>((resolve, reject) => this.pending.set(id, { resolve, reject, opts, workers: new Set(), added: false }));
    const onAbort = () => {
      const p = this.pending.get(id);
      if (!p) return;
      this.pending.delete(id);
      // a waiting job is removed; a locked (running) one cannot be, and its worker learns from its next progress post
      void this.queue.remove(id).catch(() => undefined);
      p.reject(opts!.signal!.reason instanceof Error ? opts!.signal!.reason : new Error('aborted'));
    };
    opts?.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      // removeOnComplete/Fail keep Redis small; the run record in SQLite is the history
      await this.queue.add('generate', toJob(this.modelId, req), { jobId: id, removeOnComplete: true, removeOnFail: 1000 });
      const p = this.pending.get(id);
      if (p) p.added = true;
      return await done;
    } finally {
      this.pending.delete(id);
      opts?.signal?.removeEventListener('abort', onAbort);
    }
  }

  /** A worker's progress event. Returns false when nobody waits for the job any more (the worker should stop). */
  progress(jobId: string, worker: string, e: ProgressEvent): boolean {
    const p = this.pending.get(jobId);
    if (!p) return false;
    p.workers.add(worker);
    p.opts?.onProgress?.(e);
    return true;
  }

  /** The first result for a job wins; a second one (a worker presumed dead that was not) is refused. */
  complete(jobId: string, body: ResultBody): Outcome {
    const p = this.pending.get(jobId);
    if (!p) return 'unknown';
    this.pending.delete(jobId);
    if ([...p.workers].some((w) => w !== body.worker)) {
      this.takenOver++;
      this.log.info({ job: jobId, from: [...p.workers], by: body.worker }, 'job finished by another worker than it started on');
    }
    p.resolve({
      seed: body.seed, timings: body.timings, ...(body.prompt_truncated ? { promptTruncated: true } : {}),
      images: body.images.map((i) => ({ data: new Uint8Array(Buffer.from(i.data, 'base64')), width: i.width, height: i.height, contentType: i.content_type, ...(i.has_alpha ? { hasAlpha: true } : {}) })),
    });
    return 'accepted';
  }

  fail(jobId: string, body: FailureBody): Outcome {
    const p = this.pending.get(jobId);
    if (!p) return 'unknown';
    this.pending.delete(jobId);
    p.reject(
      body.input
        ? new PipelineInputError((body.code ?? 'invalid_prompt') as PipelineInputCode, body.message, body.field)
        : body.code === 'matting_model_missing' || body.code === 'matting_model_invalid'
          ? new MattingModelError(body.code, `worker ${body.worker}: ${body.message}`)
          : body.code === ENGINE_CRASHED
            ? new EngineCrashed(`worker ${body.worker}: ${body.message}`) // the attempt is lost: retried once, like a dead worker's
            : new Error(`worker ${body.worker}: ${body.message}`),
    );
    return 'accepted';
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    clearInterval(this.sweeper);
    await this.events.close();
    await this.queue.close();
  }
}
