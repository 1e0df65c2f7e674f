// The run scheduler: picks queued runs oldest first, at most `workers` at once and at most the key's concurrency per
// key, runs them through the injected pipeline, and records every transition in the store before announcing it.
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import type { ImagePipeline, ProgressEvent } from '../pipeline/types.ts';
import { PipelineInputError } from '../pipeline/request.ts';
import { isMattingUnavailable, MATTING_UNAVAILABLE } from './background.ts';
import type { Callbacks } from './callbacks.ts';
import type { ServiceConfig } from './config.ts';
import type { FileStore, StoredImage } from './files.ts';
import { buildRequest, InputError, loadReference, type Reference } from './inputs.ts';
import { type ModelInput } from './models.ts';
import { type CostBreakdown, type ModelPrice, megapixels, priceRun } from './pricing.ts';
import { LoraError } from '../models/flux2/lora/load.ts';
import type { StoredOutput } from './present.ts';
import { type RunRow, type Store, TERMINAL } from './store.ts';
import { isoNow } from './time.ts';

/** A run interrupted by a crash or restart is retried once; the second loss fails it with WORKER_LOST. */
export const MAX_ATTEMPTS = 2;

/**
 * A pipeline's way to say an attempt was lost through no fault of the run's input (scale-out: the Redis queue
 * failed the job because its workers died or could not reach the API, or the job vanished). `counts`: the attempt
 * is used up and the crash policy applies (retried once, then WORKER_LOST); otherwise it is given back (a stop
 * handed the job back before any worker took it) and the run simply waits in the queue again.
 */
export class AttemptLost extends Error {
  constructor(
    message: string,
    readonly counts = true,
    /** The run's failure code once its retry is lost too (ENGINE_CRASHED: the engine process of engine-host.ts died). */
    readonly code = 'WORKER_LOST',
  ) {
    super(message);
    this.name = 'AttemptLost';
  }
}

export type RunEvent =
  | { type: 'status'; run: RunRow }
  | { type: 'progress'; run_id: string; progress: Progress };

export interface Progress {
  stage: string;
  step?: number;
  total?: number;
  percent: number;
  message?: string;
}

const STAGE_PERCENT: Record<string, number> = { queued: 0, preprocess: 2, load: 3, text: 5, reference: 8, denoise: 10, decode: 92, matting: 94, output: 97, done: 100 };

export function progressOf(e: ProgressEvent): Progress {
  let percent = STAGE_PERCENT[e.stage] ?? 0;
  if (e.stage === 'denoise' && e.step !== undefined && e.total) percent = 10 + Math.round((80 * e.step) / e.total);
  return { stage: e.stage, ...(e.step !== undefined ? { step: e.step, total: e.total } : {}), percent, ...(e.message ? { message: e.message } : {}) };
}

interface Active {
  ac: AbortController;
  keyId: string;
  reason?: 'cancel' | 'shutdown';
  done: Promise<void>;
}

export class RunQueue extends EventEmitter {
  private active = new Map<string, Active>();
  private stopped = true;
  private crashed = false;

  constructor(
    private store: Store,
    private pipeline: ImagePipeline,
    private files: FileStore,
    private callbacks: Callbacks,
    private cfg: ServiceConfig,
    private log: Logger,
    private priceOf: (modelId: string) => ModelPrice,
  ) {
    super();
    this.setMaxListeners(0);
  }

  /** After a crash or restart: runs left `running` go back to the queue once, then fail with WORKER_LOST. */
  recover(): { requeued: string[]; lost: string[] } {
    const requeued: string[] = [];
    const lost: string[] = [];
    const failed: RunRow[] = [];
    this.store.tx(() => {
      for (const r of this.store.runsWithStatus('running')) {
        if (r.attempts < MAX_ATTEMPTS) {
          this.store.updateRun(r.id, { status: 'queued', started_at: null, progress: JSON.stringify({ stage: 'queued', percent: 0, message: 'requeued after the worker stopped' }) });
          requeued.push(r.id);
        } else {
          this.finishUnbilled(r, 'failed', { failure_code: 'WORKER_LOST', failure_stage: 'inference', failure_message: `the worker stopped while running this run ${r.attempts} times; not retried again` });
          failed.push(this.store.getRun(r.id)!);
          lost.push(r.id);
        }
      }
    });
    for (const r of failed) this.callbacks.enqueue(r);
    if (requeued.length || lost.length) this.log.warn({ requeued, lost }, 'recovered runs left running by a previous process');
    return { requeued, lost };
  }

  start(): void {
    this.stopped = false;
    this.crashed = false;
    this.kick();
  }

  get runningCount(): number {
    return this.active.size;
  }

  /** Start as many queued runs as the limits allow. */
  kick(): void {
    if (this.stopped) return;
    while (this.active.size < this.cfg.workers) {
      const next = this.pickNext();
      if (!next) return;
      this.launch(next);
    }
  }

  private pickNext(): RunRow | undefined {
    const perKey = new Map<string, number>();
    for (const a of this.active.values()) perKey.set(a.keyId, (perKey.get(a.keyId) ?? 0) + 1);
    const limits = new Map<string, number>();
    for (const r of this.store.runsWithStatus('queued', 500)) {
      if (!limits.has(r.key_id)) limits.set(r.key_id, this.store.keyById(r.key_id)?.max_concurrency ?? this.cfg.perKeyConcurrency);
      if ((perKey.get(r.key_id) ?? 0) < limits.get(r.key_id)!) return r;
    }
    return undefined;
  }

  private launch(run: RunRow): void {
    const now = isoNow();
    const progress: Progress = { stage: 'preprocess', percent: STAGE_PERCENT.preprocess };
    if (!this.store.updateRun(run.id, { status: 'running', started_at: now, attempts: run.attempts + 1, progress: JSON.stringify(progress) }, ['queued'])) return;
    const ac = new AbortController();
    const entry: Active = { ac, keyId: run.key_id, done: Promise.resolve() };
    this.active.set(run.id, entry);
    this.announce(run.id);
    entry.done = this.execute(this.store.getRun(run.id)!, entry)
      .catch((e) => this.log.error({ err: e, run: run.id }, 'run execution crashed'))
      .finally(() => {
        this.active.delete(run.id);
        this.kick();
      });
  }

  private async execute(run: RunRow, entry: Active): Promise<void> {
    const input = JSON.parse(run.input) as ModelInput;
    const log = this.log.child({ run: run.id });
    let stage = 'preprocess';
    try {
      const urls = 'image_urls' in input ? input.image_urls : [];
      const refs: Reference[] = await Promise.all(urls.map((u, i) => loadReference(u, i, this.cfg)));
      if (this.gone(entry)) return this.settleInterrupted(run, entry);
      const req = buildRequest(input, run.seed, refs);
      stage = 'inference';
      log.info({ width: req.width, height: req.height, images: req.numImages, refs: refs.length }, 'run started');
      const result = await this.pipeline.generate(req, {
        signal: entry.ac.signal,
        onProgress: (e) => {
          if (this.gone(entry)) return;
          const p = progressOf(e);
          this.store.updateRun(run.id, { progress: JSON.stringify(p) });
          this.emit('event', run.id, { type: 'progress', run_id: run.id, progress: p } satisfies RunEvent);
        },
      });
      if (this.gone(entry)) return this.settleInterrupted(run, entry);
      stage = 'postprocess';
      // never hand out an opaque image for a transparent request: clients rely on the alpha being there
      if (req.background === 'transparent' && result.images.some((img) => img.hasAlpha !== true)) {
        throw new Error('the pipeline returned an image without an alpha channel for a transparent background');
      }
      const images: StoredImage[] = await Promise.all(result.images.map((img, i) => this.files.save(run.id, i, img)));
      const background = images.length > 0 && images.every((img) => img.has_alpha) ? 'transparent' : 'opaque';
      const output: StoredOutput = { images, seed: result.seed, prompt: input.prompt, background, timings: result.timings, ...(result.promptTruncated ? { prompt_truncated: true } : {}) };
      const loras = req.loras?.length ?? 0;
      const priced = priceRun(this.priceOf(run.model_id), { width: req.width, height: req.height, count: images.length }, refs, { loras });
      const breakdown: CostBreakdown = { ...priced.breakdown, state: 'billed' };
      const completed = isoNow();
      const ok = this.store.tx(() => {
        const changed = this.store.updateRun(run.id, {
          status: 'succeeded', output: JSON.stringify(output), completed_at: completed, cost_micros: priced.micros,
          cost_breakdown: JSON.stringify(breakdown), progress: JSON.stringify({ stage: 'done', percent: 100 }),
        }, ['running']);
        if (changed) {
          this.store.insertUsage({
            run_id: run.id, key_id: run.key_id, day: completed.slice(0, 10), model_id: run.model_id, images: images.length,
            output_mp: megapixels(req.width, req.height) * images.length, input_mp: refs.reduce((s, r) => s + megapixels(r.width, r.height), 0),
            lora_mp: loras ? megapixels(req.width, req.height) * images.length : 0, cost_micros: priced.micros,
          });
        }
        return changed;
      });
      log.info({ ok, cost: priced.micros, timings: result.timings }, 'run succeeded');
      this.settled(run.id);
    } catch (e) {
      if (this.gone(entry)) return this.settleInterrupted(run, entry);
      if (e instanceof AttemptLost) return this.lost(run, e);
      const err = e as Error;
      // the pipeline re-validates the request against the model variant; its rejections are the client's input
      const inputFault = e instanceof InputError || e instanceof PipelineInputError || e instanceof LoraError;
      // no matting weights: found before anything is generated; the server's lack, not the input's fault
      const noMatting = isMattingUnavailable(e);
      if (e instanceof PipelineInputError || e instanceof LoraError || noMatting) stage = 'preprocess';
      const code = e instanceof InputError ? e.code : e instanceof LoraError ? e.code.toUpperCase() : inputFault ? 'INPUT_VALIDATION_FAILED' : noMatting ? MATTING_UNAVAILABLE : stage === 'postprocess' ? 'OUTPUT_FAILED' : 'GENERATION_FAILED';
      log.warn({ err, code, stage }, 'run failed');
      this.finishUnbilled(run, 'failed', { failure_code: code, failure_stage: stage, failure_message: err.message });
      this.settled(run.id);
    }
  }

  /** True when the run must stop: cancelled, shutting down, or the process is being abandoned (tests' crash). */
  private gone(entry: Active): boolean {
    return this.crashed || entry.ac.signal.aborted;
  }

  private settleInterrupted(run: RunRow, entry: Active): void {
    if (this.crashed || !this.store.db.open) return; // a crash leaves the row `running`; recover() deals with it
    if (entry.reason === 'shutdown') {
      // a deliberate stop is not the run's fault: back to the queue without using up an attempt
      this.store.updateRun(run.id, { status: 'queued', started_at: null, attempts: run.attempts - 1, progress: null }, ['running']);
      return;
    }
    this.finishUnbilled(run, 'cancelled', {});
    this.settled(run.id);
  }

  /** An attempt lost by the pipeline: back to the queue (the next kick starts it again) or, once too often, its code (WORKER_LOST). */
  private lost(run: RunRow, e: AttemptLost): void {
    const log = this.log.child({ run: run.id });
    if (!this.store.db.open) return; // the service is closing: the row stays `running` and recover() deals with it
    if (!e.counts || run.attempts < MAX_ATTEMPTS) {
      const message = e.counts ? `requeued after attempt ${run.attempts} was lost: ${e.message}` : `requeued: ${e.message}`;
      this.store.updateRun(run.id, { status: 'queued', started_at: null, ...(e.counts ? {} : { attempts: run.attempts - 1 }), progress: JSON.stringify({ stage: 'queued', percent: 0, message }) }, ['running']);
      log.warn({ reason: e.message, attempts: run.attempts }, 'attempt lost; run requeued');
      this.announce(run.id);
      return;
    }
    log.warn({ reason: e.message, attempts: run.attempts }, 'attempt lost; run failed');
    this.finishUnbilled(run, 'failed', { failure_code: e.code, failure_stage: 'inference', failure_message: `${e.message} (attempt ${run.attempts} of ${MAX_ATTEMPTS}; not retried again)` });
    this.settled(run.id);
  }

  private finishUnbilled(run: RunRow, status: 'failed' | 'cancelled', failure: Partial<RunRow>): boolean {
    const bd = run.cost_breakdown ? (JSON.parse(run.cost_breakdown) as CostBreakdown) : null;
    return this.store.updateRun(run.id, {
      status, completed_at: isoNow(), cost_micros: 0,
      cost_breakdown: bd ? JSON.stringify({ ...bd, state: 'waived', total_usd: '0.000' }) : null,
      ...failure,
    }, ['queued', 'running']);
  }

  /** Announce a terminal state and queue its callback. */
  private settled(id: string): void {
    const r = this.store.getRun(id)!;
    this.announce(id);
    if (TERMINAL.has(r.status)) this.callbacks.enqueue(r);
  }

  private announce(id: string): void {
    const r = this.store.getRun(id);
    if (r) this.emit('event', id, { type: 'status', run: r } satisfies RunEvent);
  }

  /**
   * Cancel: a queued run stops at once; a running one is aborted (the pipeline stops between steps) and this waits
   * for it to settle. Returns whether this call changed the run's state.
   */
  async cancel(id: string, waitMs = 30_000): Promise<boolean> {
    const r = this.store.getRun(id);
    if (!r || TERMINAL.has(r.status)) return false;
    if (r.status === 'queued' && this.finishUnbilled(r, 'cancelled', {})) {
      this.settled(id);
      return true;
    }
    const a = this.active.get(id);
    if (!a) return false;
    a.reason = 'cancel';
    a.ac.abort(new Error('cancelled'));
    await Promise.race([a.done, new Promise((res) => setTimeout(res, waitMs).unref())]);
    return this.store.getRun(id)?.status === 'cancelled';
  }

  /** Resolve with the run once it is terminal, or with its current state after `timeoutMs`. */
  waitFor(id: string, timeoutMs: number): Promise<RunRow> {
    return new Promise((resolve) => {
      const now = this.store.getRun(id)!;
      if (TERMINAL.has(now.status) || timeoutMs <= 0) return resolve(now);
      const done = () => {
        clearTimeout(timer);
        this.off('event', on);
        resolve(this.store.getRun(id)!);
      };
      const on = (rid: string, e: RunEvent) => {
        if (rid === id && e.type === 'status' && TERMINAL.has(e.run.status)) done();
      };
      const timer = setTimeout(done, timeoutMs);
      this.on('event', on);
    });
  }

  /**
   * The first half of a draining stop (scale-out: runs on remote workers can finish while the API still answers
   * them): start nothing new, run `prepare` (hand back what no worker has taken), then wait at most `ms` for the
   * running runs to settle by themselves. stop() deals with what is left.
   */
  async drain(ms: number, prepare?: () => Promise<unknown>): Promise<void> {
    this.stopped = true;
    await prepare?.();
    if (this.active.size === 0 || ms <= 0) return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.all([...this.active.values()].map((a) => a.done)), new Promise((res) => (timer = setTimeout(res, ms)))]);
    clearTimeout(timer);
  }

  /** Graceful stop: running runs are aborted and put back in the queue for the next start. */
  async stop(): Promise<void> {
    this.stopped = true;
    for (const a of this.active.values()) {
      a.reason ??= 'shutdown';
      a.ac.abort(new Error('shutting down'));
    }
    await Promise.all([...this.active.values()].map((a) => a.done));
  }

  /** Abandon everything without touching the store, as a killed process would (restart tests). */
  async crash(): Promise<void> {
    this.stopped = true;
    this.crashed = true;
    for (const a of this.active.values()) a.ac.abort(new Error('crashed'));
    // the abandoned generations write nothing, but wait for them so the engine is free for the next service
    await Promise.all([...this.active.values()].map((a) => a.done));
  }
}
