// Prometheus metrics of a `klein serve` (prom-client, one registry per service): request latency per route
// pattern, Node's default process metrics (event-loop lag included), the engine's busy time, outcomes and seconds per
// stage, the runs by status, and — scaled out — the Redis queue's figures (scale/api.ts adds them).
import type { MiddlewareHandler } from 'hono';
import { routePath } from 'hono/route';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry, Summary } from 'prom-client';
import type { GenerateOptions, GenerateRequest, GenerateResult, ImagePipeline } from '../pipeline/types.ts';
import { AttemptLost } from './queue.ts';
import { RUN_STATUSES, type Store } from './store.ts';

/** What an engine host reports about its processes (engine-host.ts); absent for in-process or remote pipelines. */
export interface EngineProcessStats {
  crashes: number;
  starts: number;
}

export type Outcome = 'succeeded' | 'failed' | 'cancelled' | 'lost';

const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
const STAGE_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600];

export class ServiceMetrics {
  readonly registry = new Registry();
  private readonly http: Histogram<'method' | 'route' | 'status'>;
  private readonly busy: Gauge;
  private readonly busySeconds: Counter;
  private readonly generations: Histogram<'outcome'>;
  private readonly stages: Histogram<'stage'>;
  private readonly steps: Summary;
  /** generations in progress, and since when at least one has been (for the busy-seconds counter) */
  private running = 0;
  private busySince = 0;

  constructor(store: Store, engines: EngineProcessStats[] = []) {
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry });
    this.http = new Histogram({ name: 'klein_http_request_duration_seconds', help: 'HTTP request latency until the response starts, per route pattern', labelNames: ['method', 'route', 'status'], buckets: LATENCY_BUCKETS, registers });
    const self = this;
    this.busy = new Gauge({ name: 'klein_engine_busy', help: 'Generations in progress (0: the engine is idle)', registers });
    this.busySeconds = new Counter({
      name: 'klein_engine_busy_seconds_total', help: 'Seconds during which at least one generation was in progress (idle fraction: 1 - rate of this)', registers,
      collect() {
        // the open busy stretch counts up to now, so a scrape during a long generation sees it move
        if (self.running > 0) {
          const now = performance.now();
          this.inc((now - self.busySince) / 1000);
          self.busySince = now;
        }
      },
    });
    this.generations = new Histogram({ name: 'klein_engine_generation_seconds', help: 'Wall seconds per generation attempt, by outcome (lost: the engine process or the worker died)', labelNames: ['outcome'], buckets: STAGE_BUCKETS, registers });
    this.stages = new Histogram({ name: 'klein_engine_stage_seconds', help: "Seconds per pipeline stage of each successful generation (the engine's own timings)", labelNames: ['stage'], buckets: STAGE_BUCKETS, registers });
    this.steps = new Summary({ name: 'klein_step_seconds', help: 'Seconds per denoising step, as progress reports them', percentiles: [], registers });
    new Gauge({
      name: 'klein_runs', help: 'Runs in the database by status', labelNames: ['status'], registers,
      collect() {
        const by = store.countByStatus();
        for (const s of RUN_STATUSES) this.set({ status: s }, by[s]);
      },
    });
    if (engines.length) {
      new Counter({ name: 'klein_engine_crashes_total', help: 'Engine processes that died (killed, out of memory, native crash); a fresh one is started', registers, collect() { this.reset(); this.inc(engines.reduce((s, e) => s + e.crashes, 0)); } });
      new Counter({ name: 'klein_engine_starts_total', help: 'Engine processes started, the first ones included', registers, collect() { this.reset(); this.inc(engines.reduce((s, e) => s + e.starts, 0)); } });
    }
  }

  /** Times every request by its route pattern (bounded label values, unlike raw URLs). */
  middleware(): MiddlewareHandler {
    return async (c, next) => {
      const end = this.http.startTimer();
      await next();
      end({ method: c.req.method, route: routePath(c, -1) || 'unmatched', status: String(c.res.status) });
    };
  }

  /** The pipeline as the run queue sees it, counted: busy time, outcomes, stage seconds and step seconds. */
  wrap(inner: ImagePipeline): ImagePipeline {
    return {
      generate: (req, opts) => this.generate(inner, req, opts),
      close: () => inner.close(),
    };
  }

  private async generate(inner: ImagePipeline, req: GenerateRequest, opts: GenerateOptions = {}): Promise<GenerateResult> {
    const t0 = performance.now();
    if (this.running++ === 0) this.busySince = t0;
    this.busy.inc();
    let lastStep: number | undefined;
    let outcome: Outcome = 'failed';
    try {
      const result = await inner.generate(req, {
        ...opts,
        onProgress: (e) => {
          if (e.stage === 'denoise' && e.step !== undefined) {
            const now = performance.now();
            // a step's time is the gap between two consecutive step reports of this attempt (the gap before step 1
            // also holds the transformer's per-generation set-up)
            if (lastStep !== undefined && e.step > 1) this.steps.observe((now - lastStep) / 1000);
            lastStep = now;
          }
          opts.onProgress?.(e);
        },
      });
      outcome = 'succeeded';
      for (const [stage, s] of Object.entries(result.timings)) if (stage !== 'total') this.stages.observe({ stage }, s);
      return result;
    } catch (e) {
      outcome = opts.signal?.aborted ? 'cancelled' : e instanceof AttemptLost ? 'lost' : 'failed';
      throw e;
    } finally {
      const now = performance.now();
      this.generations.observe({ outcome }, (now - t0) / 1000);
      this.busy.dec();
      if (--this.running === 0) this.busySeconds.inc((now - this.busySince) / 1000);
    }
  }

  async text(): Promise<{ body: string; contentType: string }> {
    return { body: await this.registry.metrics(), contentType: this.registry.contentType };
  }
}
