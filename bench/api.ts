// `klein bench api`: the runs API over loopback with the real pipeline on a tiny model. Creates runs at a fixed
// request rate (open loop: the schedule does not wait for answers), polls each until it ends, and prints create,
// poll and create→done latency percentiles. The tiny model keeps generation short, so the figures are about the
// service (HTTP, SQLite, queue), not the engine. The last line is JSON.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { UsageError } from '../src/cli/errors.ts';
import { parseIntOption } from '../src/cli/option-parsers.ts';
import { openPipeline } from '../src/pipeline/pipeline.ts';
import { cpuTarget } from '../src/runtime/target.ts';
import { createApp } from '../src/service/app.ts';
import { createKey } from '../src/service/auth.ts';
import { loadConfig } from '../src/service/config.ts';
import { createLogger } from '../src/service/logger.ts';
import { writeTinyModel } from '../src/fixtures/tiny-model.ts';
import { benchCacheDir } from './util.ts';

interface ApiBenchOptions {
  model?: string;
  requests: string;
  rate: string;
  size: string;
  steps: string;
  pollMs: string;
}

/** Nearest-rank percentile of an ascending array. */
export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

const ms = (v: number) => `${v.toFixed(1)} ms`;

export function registerApiBench(bench: Command): void {
  bench
    .command('api')
    .description('runs API over loopback (tiny model): create and poll latency at a fixed request rate')
    .option('-m, --model <dir>', 'model folder (default: a tiny random model in the bench cache)')
    .option('--requests <n>', 'runs to create (bounded)', '40')
    .option('--rate <n>', 'run creations per second (fixed schedule)', '4')
    .option('--size <px>', 'image side', '64')
    .option('--steps <n>', 'denoising steps per run', '4')
    .option('--poll-ms <n>', 'poll interval per run', '50')
    .action(async (o: ApiBenchOptions) => {
      const n = parseIntOption(o.requests, '--requests')!;
      const rate = Number(o.rate);
      const size = parseIntOption(o.size, '--size')!;
      const steps = parseIntOption(o.steps, '--steps')!;
      const pollMs = parseIntOption(o.pollMs, '--poll-ms')!;
      if (n < 1 || n > 10_000) throw new UsageError('--requests must be 1–10000');
      if (!(rate > 0 && rate <= 1000)) throw new UsageError(`--rate must be a number of creations per second in (0, 1000], got "${o.rate}"`);
      if (size < 64 || size % 16) throw new UsageError('--size must be a multiple of 16, at least 64');

      let model = o.model;
      if (!model) {
        model = benchCacheDir('api-tiny-model');
        if (!fs.existsSync(path.join(model, 'model_index.json'))) writeTinyModel(model, { layout: 'diffusers' });
      }
      const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-bench-api-'));
      const pipeline = await openPipeline({ model, target: cpuTarget(), keepLoaded: true });
      const svc = createApp({
        pipeline,
        config: loadConfig(dataDir, { rateLimit: { createsPerMinute: 1e9, requestsPerMinute: 1e9 } }),
        logger: createLogger(process.env.KLEIN_LOG_LEVEL ?? 'silent'),
      });
      const { url } = await svc.listen(0, '127.0.0.1');
      const { key } = createKey(svc.store, { name: 'bench', maxConcurrency: 1 });
      const headers = { authorization: `Bearer ${key}`, 'content-type': 'application/json' };
      const body = (i: number) => JSON.stringify({ input: { prompt: `bench run ${i % 8}`, image_size: { width: size, height: size }, num_inference_steps: steps, seed: i } });

      try {
        // warm-up (not measured): loads the model and compiles graphs, then fills the prompt cache
        process.stderr.write('bench api: warming up (model load)…\n');
        for (let i = 0; i < 8; i++) {
          await fetch(`${url}/v1/models/flux-2-klein-4b/runs`, { method: 'POST', headers: { ...headers, prefer: 'wait=300' }, body: body(i) }).then((r) => r.json());
        }

        const create: number[] = [];
        const poll: number[] = [];
        const e2e: number[] = [];
        let failed = 0;
        const t0 = performance.now();
        const one = async (i: number) => {
          await new Promise((r) => setTimeout(r, Math.max(0, t0 + (i * 1000) / rate - performance.now())));
          const s = performance.now();
          const res = await fetch(`${url}/v1/models/flux-2-klein-4b/runs`, { method: 'POST', headers, body: body(i) });
          const run = (await res.json()) as { id: string };
          create.push(performance.now() - s);
          if (res.status !== 201) { failed++; return; }
          for (;;) {
            await new Promise((r) => setTimeout(r, pollMs));
            const p0 = performance.now();
            const g = (await (await fetch(`${url}/v1/runs/${run.id}`, { headers })).json()) as { status_code: string };
            poll.push(performance.now() - p0);
            if (['succeeded', 'failed', 'cancelled'].includes(g.status_code)) {
              if (g.status_code !== 'succeeded') failed++;
              e2e.push(performance.now() - s);
              return;
            }
          }
        };
        await Promise.all(Array.from({ length: n }, (_, i) => one(i)));
        const wall = (performance.now() - t0) / 1000;
        for (const a of [create, poll, e2e]) a.sort((x, y) => x - y);
        const figures = {
          requests: n, rate_per_s: rate, size, steps, failed, wall_s: Number(wall.toFixed(2)), completed_per_s: Number((e2e.length / wall).toFixed(2)),
          create_p50_ms: percentile(create, 50), create_p99_ms: percentile(create, 99),
          poll_p50_ms: percentile(poll, 50), poll_p99_ms: percentile(poll, 99), polls: poll.length,
          create_to_done_p50_ms: percentile(e2e, 50), create_to_done_p99_ms: percentile(e2e, 99),
        };
        console.log(`requests: ${n} at ${rate}/s (${size}×${size}, ${steps} steps, poll every ${pollMs} ms), failed: ${failed}`);
        console.log(`create (POST …/runs): p50 ${ms(figures.create_p50_ms)}, p99 ${ms(figures.create_p99_ms)}`);
        console.log(`poll (GET /v1/runs/{id}): p50 ${ms(figures.poll_p50_ms)}, p99 ${ms(figures.poll_p99_ms)} over ${poll.length} polls`);
        console.log(`create → succeeded seen: p50 ${ms(figures.create_to_done_p50_ms)}, p99 ${ms(figures.create_to_done_p99_ms)}`);
        console.log(`throughput: ${figures.completed_per_s} runs/s over ${figures.wall_s} s`);
        for (const k of Object.keys(figures) as (keyof typeof figures)[]) if (typeof figures[k] === 'number' && !Number.isInteger(figures[k])) (figures as Record<string, number>)[k] = Number((figures[k] as number).toFixed(2));
        console.log(JSON.stringify(figures));
      } finally {
        await svc.close();
        await pipeline.close();
        fs.rmSync(dataDir, { recursive: true, force: true });
      }
    });
}
