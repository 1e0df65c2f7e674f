// `klein bench load`: many concurrent clients against create + poll over loopback, with the real pipeline on a tiny
// model in an engine process (as klein serve runs it; --in-process for the old way). Closed loop: each client
// creates a run, polls it once, and repeats until the request budget or the time budget is spent. Prints
// requests/s, p50/p99 latency per route, status counts and the server's memory over the run; the last line is JSON.
// `runLoad` is also the bounded load test's engine (test/reliability/load.test.ts). `--during-generation`: see
// load-generation.ts.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import v8 from 'node:v8';
import vm from 'node:vm';
import type { Command } from 'commander';
import { UsageError } from '../src/cli/errors.ts';
import { parseIntOption } from '../src/cli/option-parsers.ts';
import type { ImagePipeline } from '../src/pipeline/types.ts';
import { openPipeline } from '../src/pipeline/pipeline.ts';
import { cpuTarget } from '../src/runtime/target.ts';
import { createApp } from '../src/service/app.ts';
import { EngineHost } from '../src/service/engine-host.ts';
import { createKey } from '../src/service/auth.ts';
import { loadConfig } from '../src/service/config.ts';
import { createLogger } from '../src/service/logger.ts';
import { writeTinyModel } from '../src/fixtures/tiny-model.ts';
import { percentile } from './api.ts';
import { printDuringGeneration, runDuringGeneration } from './load-generation.ts';
import { benchCacheDir } from './util.ts';

export interface LoadOptions {
  pipeline: ImagePipeline;
  clients: number;
  /** total HTTP requests (creates + polls), the hard bound */
  requests: number;
  /** stop early after this long */
  maxSeconds: number;
  /** the key's run creations per minute: past it, 429 is the right answer */
  createsPerMinute: number;
}

export interface LoadFigures {
  clients: number; requests: number; wall_s: number; requests_per_s: number;
  status: Record<string, number>; errors: number; server_5xx: number;
  creates_ok: number; creates_429: number; first_429_after_creates: number | null; creates_per_minute: number;
  create_p50_ms: number; create_p99_ms: number; poll_p50_ms: number; poll_p99_ms: number;
  rss_mb_start: number; rss_mb_end: number; rss_mb_max: number; heap_mb_start: number; heap_mb_end: number;
}

const mb = (b: number) => Math.round(b / 1024 / 1024);

/** A full GC before the first and after the last sample, so heap start/end compare live objects, not garbage. */
function collect(): void {
  v8.setFlagsFromString('--expose-gc');
  (vm.runInNewContext('gc') as () => void)();
}

export async function runLoad(o: LoadOptions): Promise<LoadFigures> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-load-'));
  const svc = createApp({
    pipeline: o.pipeline,
    config: loadConfig(dataDir, { rateLimit: { createsPerMinute: o.createsPerMinute, requestsPerMinute: 1e9 } }),
    logger: createLogger(process.env.KLEIN_LOG_LEVEL ?? 'silent'),
  });
  const { url } = await svc.listen(0, '127.0.0.1');
  const { key } = createKey(svc.store, { name: 'load' });
  const headers = { authorization: `Bearer ${key}`, 'content-type': 'application/json' };
  const status: Record<string, number> = {};
  const create: number[] = [];
  const poll: number[] = [];
  let sent = 0;
  let errors = 0;
  let createsOk = 0;
  let creates429 = 0;
  let first429: number | null = null;
  const mem: { rss: number; heap: number }[] = [];
  const sample = () => { const m = process.memoryUsage(); mem.push({ rss: m.rss, heap: m.heapUsed }); };
  collect();
  sample();
  const sampler = setInterval(sample, 200);
  const t0 = performance.now();
  const deadline = t0 + o.maxSeconds * 1000;
  const request = async (method: string, p: string, body?: string) => {
    const s = performance.now();
    // node's fetch opens as many keep-alive connections to the origin as there are requests in flight
    const res = await fetch(url + p, { method, headers, body });
    const json = (await res.json()) as { id?: string; code?: string };
    status[res.status] = (status[res.status] ?? 0) + 1;
    return { status: res.status, json, ms: performance.now() - s };
  };
  const client = async (c: number) => {
    let last: string | null = null;
    while (sent < o.requests && performance.now() < deadline) {
      sent++;
      try {
        if (last && sent % 2 === 0) {
          const r = await request('GET', `/v1/runs/${last}`);
          poll.push(r.ms);
        } else {
          const r = await request('POST', '/v1/models/flux-2-klein-4b/runs', JSON.stringify({ input: { prompt: `load ${c}`, image_size: { width: 64, height: 64 }, num_inference_steps: 1, seed: sent } }));
          create.push(r.ms);
          if (r.status === 201) { createsOk++; last = r.json.id!; }
          else if (r.status === 429) { creates429++; if (first429 === null) first429 = createsOk; }
        }
      } catch {
        errors++;
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: o.clients }, (_, c) => client(c)));
  } finally {
    clearInterval(sampler);
    collect();
    sample();
    await svc.close();
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
  const wall = (performance.now() - t0) / 1000;
  create.sort((a, b) => a - b);
  poll.sort((a, b) => a - b);
  const r1 = (v: number) => Number(v.toFixed(1));
  return {
    clients: o.clients, requests: sent, wall_s: r1(wall), requests_per_s: r1(sent / wall), status, errors,
    server_5xx: Object.entries(status).filter(([s]) => Number(s) >= 500).reduce((a, [, n]) => a + n, 0),
    creates_ok: createsOk, creates_429: creates429, first_429_after_creates: first429, creates_per_minute: o.createsPerMinute,
    create_p50_ms: r1(percentile(create, 50)), create_p99_ms: r1(percentile(create, 99)), poll_p50_ms: r1(percentile(poll, 50)), poll_p99_ms: r1(percentile(poll, 99)),
    rss_mb_start: mb(mem[0].rss), rss_mb_end: mb(mem[mem.length - 1].rss), rss_mb_max: mb(Math.max(...mem.map((m) => m.rss))),
    heap_mb_start: mb(mem[0].heap), heap_mb_end: mb(mem[mem.length - 1].heap),
  };
}

interface LoadCliOptions {
  model?: string; clients: string; requests: string; seconds?: string; createLimit: string;
  duringGeneration?: boolean; size: string; steps?: string; rate: string; precision?: string; inProcess?: boolean; threads?: string; warmup?: string; samples?: string;
}

/** `--during-generation`: a real `klein serve` answering a fixed-rate mix while it generates one large image. */
async function duringGeneration(o: LoadCliOptions, model: string): Promise<void> {
  const size = /^(\d+)x(\d+)$/.exec(o.size);
  if (!size) throw new UsageError(`--size must be WIDTHxHEIGHT, e.g. 1024x1024, got "${o.size}"`);
  const rate = Number(o.rate);
  if (!(rate > 0 && rate <= 2000)) throw new UsageError(`--rate must be requests per second in (0, 2000], got "${o.rate}"`);
  const seconds = parseIntOption(o.seconds, '--seconds') ?? 1800;
  if (seconds < 1 || seconds > 7200) throw new UsageError('--seconds must be 1–7200');
  const steps = parseIntOption(o.steps, '--steps');
  const threads = parseIntOption(o.threads, '--threads');
  process.stderr.write(`bench load --during-generation: ${o.size} on ${model}, ${rate} requests/s while it runs…\n`);
  const warmupS = o.warmup === undefined ? 2 : Number(o.warmup);
  if (!(warmupS >= 0 && warmupS <= 60)) throw new UsageError(`--warmup must be 0–60 seconds, got "${o.warmup}"`);
  const f = await runDuringGeneration({ model, width: Number(size[1]), height: Number(size[2]), steps, rate, maxSeconds: seconds, precision: o.precision, inProcess: o.inProcess, threads, warmupS, samplesFile: o.samples });
  printDuringGeneration(f);
}

export function registerLoadBench(bench: Command): void {
  bench
    .command('load')
    .description('load over loopback (tiny model): concurrent clients creating and polling runs; requests/s, p50/p99, errors, memory (--during-generation: API latency while the engine generates)')
    .option('-m, --model <dir>', 'model folder (default: a tiny random model in the bench cache)')
    .option('--clients <n>', 'concurrent clients', '200')
    .option('--requests <n>', 'total requests (bounded)', '20000')
    .option('--seconds <n>', 'time bound (default 60; with --during-generation 1800)')
    .option('--create-limit <n>', 'run creations per minute for the key (429 past it)', '600')
    .option('--during-generation', 'a real `klein serve` generating one large image while health, poll, create and SSE requests arrive at --rate; p50/p99/max per endpoint')
    .option('--size <WxH>', 'with --during-generation: the large image', '1024x1024')
    .option('--steps <n>', 'with --during-generation: its denoising steps (default: the model\'s)')
    .option('--rate <n>', 'with --during-generation: requests per second, all endpoints together', '200')
    .option('--precision <mode>', 'with --during-generation: passed to klein serve (fast for real-size weights)')
    .option('--threads <n>', 'with --during-generation: passed to klein serve')
    .option('--in-process', 'the server runs its engine on its own event loop (the old way, for comparison)')
    .option('--samples <file>', 'with --during-generation: every counted request (endpoint, when it was sent, ms, status) as JSON, for plotting the tail over time')
    .option('--warmup <s>', 'with --during-generation: seconds of uncounted requests that start no generation, first (default 2)')
    .action(async (o: LoadCliOptions) => {
      let model = o.model;
      if (!model) {
        model = benchCacheDir('api-tiny-model');
        if (!fs.existsSync(path.join(model, 'model_index.json'))) writeTinyModel(model, { layout: 'diffusers' });
      }
      if (o.duringGeneration) return duringGeneration(o, model);
      const clients = parseIntOption(o.clients, '--clients')!;
      const requests = parseIntOption(o.requests, '--requests')!;
      const seconds = parseIntOption(o.seconds, '--seconds') ?? 60;
      const limit = parseIntOption(o.createLimit, '--create-limit')!;
      if (clients < 1 || clients > 2000) throw new UsageError('--clients must be 1–2000');
      if (requests < 1 || requests > 1_000_000) throw new UsageError('--requests must be 1–1000000');
      if (seconds < 1 || seconds > 3600) throw new UsageError('--seconds must be 1–3600');
      if (limit < 1) throw new UsageError('--create-limit must be at least 1');
      // as klein serve runs it: the engine in a child process (--in-process: on this event loop, the old way)
      const options = { model, target: cpuTarget(), keepLoaded: true };
      const pipeline = o.inProcess ? await openPipeline(options) : await EngineHost.start(options);
      process.stderr.write(`bench load: ${clients} clients, at most ${requests} requests or ${seconds} s…\n`);
      try {
        const f = await runLoad({ pipeline, clients, requests, maxSeconds: seconds, createsPerMinute: limit });
        console.log(`requests: ${f.requests} in ${f.wall_s} s = ${f.requests_per_s} req/s with ${f.clients} clients; status ${JSON.stringify(f.status)}; client errors ${f.errors}; 5xx ${f.server_5xx}`);
        console.log(`create: p50 ${f.create_p50_ms} ms, p99 ${f.create_p99_ms} ms; poll: p50 ${f.poll_p50_ms} ms, p99 ${f.poll_p99_ms} ms`);
        console.log(`creations: ${f.creates_ok} accepted, ${f.creates_429} rate-limited (first 429 after ${f.first_429_after_creates ?? '—'} accepted; limit ${limit}/min)`);
        console.log(`server memory: rss ${f.rss_mb_start} → ${f.rss_mb_end} MB (max ${f.rss_mb_max}), heap ${f.heap_mb_start} → ${f.heap_mb_end} MB`);
        console.log(JSON.stringify(f));
      } finally {
        await pipeline.close();
      }
    });
}
