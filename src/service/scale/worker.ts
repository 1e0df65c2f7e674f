// A scale-out worker: takes jobs from the shared BullMQ queue one at a time (one device, one run), runs them on the
// local pipeline, reports progress to the API and uploads the images to it. Delivery is at least once: BullMQ's
// lock on the job is renewed while this process lives, and a job whose worker died (kill -9) is moved back to the
// queue by the stalled-job check of any other worker; the API accepts only the first result for a job.
import crypto from 'node:crypto';
import os from 'node:os';
import { type Job, Worker } from 'bullmq';
import type { Logger } from 'pino';
import { PipelineInputError } from '../../pipeline/request.ts';
import { MattingModelError } from '../../weights/matting-folder.ts';
import type { ImagePipeline, Precision, ProgressEvent } from '../../pipeline/types.ts';
import type { GpuDtype } from '../../runtime/target.ts';
import { type Announce, fromJob, type JobData, QUEUE_NAME, type ResultBody, WORKER_PREFIX } from './protocol.ts';
import { ENGINE_CRASHED, EngineCrashed } from '../engine-host.ts';
import { closableWhileStarting } from './closable.ts';
import { redisConnection } from './redis.ts';
import { ANNOUNCE_MS } from './registry.ts';

export interface WorkerOptions {
  queueUrl: string;
  apiUrl: string;
  token: string;
  pipeline: ImagePipeline;
  modelId: string;
  device: string;
  /** Announced to the API (shown per worker in /v1/health); default exact. */
  precision?: Precision;
  /** GPU devices: the pipeline's dtype, announced beside the precision; undefined on the CPU. */
  gpuDtype?: GpuDtype;
  log: Logger;
  /** How long a job stays locked without renewal before another worker may take it over (BullMQ lockDuration). */
  lockMs?: number;
  /** Times a job may go back to the queue after its worker died before BullMQ fails it (default 2). */
  maxStalledCount?: number;
  /** First wait before retrying a failed API call (doubling, at most 5 s); default 500 ms. */
  retryMs?: number;
  id?: string;
}

/** How long a stop waits for a worker's Redis connections to finish starting before it closes them anyway. */
const STARTUP_WAIT_MS = 2_000;

/**
 * Resolves once the BullMQ worker's connections have started, or after STARTUP_WAIT_MS (Redis out of reach).
 * Closed while starting, BullMQ 5.81 runs its first stalled-job check after the close and leaves its next-check
 * timer (stalledInterval: 15 s by default) keeping the process alive: a `klein serve --queue --workers 1` stopped
 * right after its start took 15 s to exit. Closed once started, it exits at once.
 */
function startedOrLate(worker: Worker): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    worker.waitUntilReady().then(() => undefined, () => undefined),
    new Promise<void>((resolve) => (timer = setTimeout(resolve, STARTUP_WAIT_MS))),
  ]).finally(() => clearTimeout(timer));
}

export class ApiCallError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

export class KleinWorker {
  readonly id: string;
  private worker: Worker<JobData> | null = null;
  private current: string | null = null;
  private timer: NodeJS.Timeout | null = null;
  readonly processed: string[] = [];

  constructor(private o: WorkerOptions) {
    this.id = o.id ?? `${os.hostname()}-${process.pid}-${crypto.randomBytes(3).toString('hex')}`;
  }

  private async call(path: string, body: unknown, retries = 0): Promise<any> {
    for (let attempt = 0; ; attempt++) {
      try {
        const res = await fetch(this.o.apiUrl + WORKER_PREFIX + path, {
          method: 'POST', headers: { authorization: `Bearer ${this.o.token}`, 'content-type': 'application/json' }, body: JSON.stringify(body),
        });
        const json = (await res.json().catch(() => ({}))) as any;
        if (!res.ok) throw new ApiCallError(res.status, `${path}: HTTP ${res.status} ${json?.code ?? ''} ${json?.message ?? ''}`.trim());
        return json;
      } catch (e) {
        // an API out of reach is an ApiCallError too (status 0), so process() hands it to BullMQ with this message
        const err = e instanceof ApiCallError ? e : new ApiCallError(0, `${path}: cannot reach the API at ${this.o.apiUrl}: ${((e as Error).cause as Error | undefined)?.message ?? (e as Error).message}`);
        // 4xx answers are final; network errors and 5xx are retried (the API may be restarting)
        const final = err.status >= 400 && err.status < 500;
        if (final || attempt >= retries) throw err;
        await new Promise((r) => setTimeout(r, Math.min((this.o.retryMs ?? 500) * 2 ** attempt, 5000)));
      }
    }
  }

  private announce(): Promise<void> {
    const a: Announce = { id: this.id, model_id: this.o.modelId, device: this.o.device, precision: this.o.precision ?? 'exact', ...(this.o.gpuDtype ? { gpu_dtype: this.o.gpuDtype } : {}), free_memory_bytes: os.freemem(), job: this.current };
    return this.call('/announce', a).then(() => undefined);
  }

  /** Announce to the API (fails clearly on a wrong token or model), then start taking jobs. */
  async start(): Promise<void> {
    await this.announce();
    this.timer = setInterval(() => void this.announce().catch((e) => this.o.log.warn({ err: e }, 'announce failed')), ANNOUNCE_MS);
    const lockDuration = this.o.lockMs ?? 30_000;
    // a stop may come while its connections are still starting (serve --queue stopped right after its start)
    this.worker = closableWhileStarting(new Worker<JobData>(QUEUE_NAME, (job) => this.process(job), {
      connection: redisConnection(this.o.queueUrl),
      concurrency: 1, // one run at a time per device
      lockDuration,
      stalledInterval: Math.max(1000, Math.floor(lockDuration / 2)),
      // a job whose worker vanished goes to another, twice; the third loss fails it in BullMQ, and the API then
      // settles the attempt (AttemptLost: the run is retried once, then fails WORKER_LOST)
      maxStalledCount: this.o.maxStalledCount ?? 2,
      autorun: true,
    }), this.o.log);
    this.worker.on('error', (e) => this.o.log.warn({ err: e }, 'bullmq worker error'));
  }

  private async process(job: Job<JobData>): Promise<void> {
    const jobId = job.id!;
    const log = this.o.log.child({ job: jobId });
    if (job.data.model_id !== this.o.modelId) throw new Error(`job for ${job.data.model_id}; this worker has ${this.o.modelId}`);
    this.current = jobId;
    void this.announce().catch(() => undefined);
    const ac = new AbortController();
    let chain = Promise.resolve();
    const report = (event: ProgressEvent) => {
      chain = chain
        .then(() => this.call(`/jobs/${jobId}/progress`, { worker: this.id, event }))
        .then((r) => {
          if (r.continue === false && !ac.signal.aborted) ac.abort(new Error('the API no longer waits for this job'));
        })
        .catch((e) => log.warn({ err: e }, 'progress report failed'));
    };
    try {
      log.info('job started');
      const result = await this.o.pipeline.generate(fromJob(job.data), { signal: ac.signal, onProgress: report });
      await chain;
      if (ac.signal.aborted) return;
      const body: ResultBody = {
        worker: this.id, seed: result.seed, timings: result.timings, ...(result.promptTruncated ? { prompt_truncated: true } : {}),
        images: result.images.map((i) => ({ data: Buffer.from(i.data).toString('base64'), width: i.width, height: i.height, content_type: i.contentType, ...(i.hasAlpha ? { has_alpha: true } : {}) })),
      };
      try {
        await this.call(`/jobs/${jobId}/result`, body, 6);
        log.info({ images: body.images.length }, 'job uploaded');
      } catch (e) {
        if (e instanceof ApiCallError && e.status === 409) log.warn('result refused: the job was settled elsewhere');
        else throw e;
      }
    } catch (e) {
      await chain;
      if (ac.signal.aborted) {
        log.info('job abandoned: cancelled or given up by the API');
        return;
      }
      if (e instanceof ApiCallError) throw e; // could not reach the API: let BullMQ record the failure
      const input = e instanceof PipelineInputError;
      log.warn({ err: e }, 'job failed');
      await this.call(`/jobs/${jobId}/failure`, {
        worker: this.id, message: (e as Error).message, input,
        ...(input ? { code: e.code, ...(e.field ? { field: e.field } : {}) } : e instanceof MattingModelError ? { code: e.code } : e instanceof EngineCrashed ? { code: ENGINE_CRASHED } : {}),
      }, 6).catch((err) => {
        if (err instanceof ApiCallError && err.status >= 400 && err.status < 500) return log.warn({ err }, 'failure report refused');
        // the API never heard of it: fail the job in BullMQ with the reason, and the API learns it from there
        throw new Error(`${(e as Error).message} (the failure could not be reported to the API: ${(err as Error).message})`);
      });
    } finally {
      this.processed.push(jobId);
      this.current = null;
      void this.announce().catch(() => undefined);
    }
  }

  /**
   * Graceful stop: take no new job, let the running one finish and upload, then leave. `force` hands the running job
   * back instead: its lock lapses and another worker takes it over.
   */
  async stop(force = false): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    if (this.worker) await startedOrLate(this.worker);
    await this.worker?.close(force);
    await this.call('/leave', { id: this.id }).catch(() => undefined);
  }
}
