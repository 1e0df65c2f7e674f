// `klein bench load --during-generation`: does the API keep answering while the engine works? Starts a real
// `klein serve` (its own process, a fresh data folder), creates one large run (1024² on the tiny model by default;
// its model load included), and while it runs sends a fixed-rate open-loop mix of health checks, polls, small run
// creations and SSE subscriptions from this process (after a short warm-up that starts no generation). Prints
// p50/p99/max per endpoint for the requests sent during the generation, and the last line as JSON. `--in-process` runs the server's engine on its event loop (the old way).
// A latency here includes this process's own pauses: its requests go through node:http (http-client.ts), not fetch,
// whose garbage and CPU per request showed up as 15-20 ms collections in the figures (docs/benchmarks.md).
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { percentile } from './api.ts';
import { LoadClient } from './http-client.ts';

const KLEIN = new URL('../bin/klein.js', import.meta.url).pathname;

export type Endpoint = 'health' | 'poll' | 'create' | 'sse';

/** Shares of the request rate (health and poll are what load balancers and clients do most). */
export const MIX: Record<Endpoint, number> = { health: 0.4, poll: 0.4, create: 0.1, sse: 0.1 };

export interface DuringGenerationOptions {
  model: string;
  width: number;
  height: number;
  steps?: number;
  /** requests per second, all endpoints together */
  rate: number;
  /** bound on the whole measurement */
  maxSeconds: number;
  precision?: string;
  inProcess?: boolean;
  threads?: number;
  /** seconds of uncounted requests that start no generation, before the large run (default 2) */
  warmupS?: number;
  /** writes every counted request (endpoint, sent at s after the large run's creation, ms, status) here as JSON */
  samplesFile?: string;
}

export interface EndpointFigures { count: number; errors: number; status: Record<string, number>; p50_ms: number; p99_ms: number; max_ms: number }

export interface DuringGenerationFigures {
  model: string; size: string; rate: number; in_process: boolean;
  server_start_s: number; generation_s: number; run_status: string; run_timings: Record<string, number> | null;
  /** the run's started→completed time in the service minus the engine's own total: request preparation, IPC, file and database writes */
  service_overhead_s: number | null;
  sent: number; achieved_rate: number; client_loop_delay_max_ms: number; warmup_s: number;
  /** the server's own event-loop delay over the generation (its /metrics: prom-client's monitorEventLoopDelay) */
  server_loop_delay_p99_ms: number; server_loop_delay_max_ms: number;
  load_average_before: number[]; load_average_after: number[];
  endpoints: Record<Endpoint, EndpointFigures>;
  /** the slowest requests: when they were sent (seconds after the large run was created) and how long they took */
  slowest: { endpoint: Endpoint; at_s: number; ms: number }[];
}

interface Server { proc: ChildProcess; url: string; key: string; http: LoadClient }
interface Sample { at: number; ms: number; status: number | 'error' }
/** The large run as its last poll saw it; `wallS`: from started to completed as the service recorded them. */
interface Finished { status: string; timings: Record<string, number> | null; wallS: number }

/** `klein serve` on 127.0.0.1:0 over `dataDir`; resolves with its URL and the admin key of its first start. */
function startServer(o: DuringGenerationOptions, dataDir: string): Promise<Server> {
  const args = [KLEIN, 'serve', '--model', o.model, '--port', '0', '--data', dataDir];
  if (o.precision) args.push('--precision', o.precision);
  if (o.inProcess) args.push('--in-process');
  if (o.threads) args.push('--threads', String(o.threads));
  const proc = spawn(process.execPath, args, { env: { ...process.env, KLEIN_LOG_LEVEL: 'silent' }, stdio: ['ignore', 'pipe', 'pipe'] });
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`klein serve did not start in 10 min: ${out}`)), 600_000);
    proc.stderr!.on('data', (d) => (out += d));
    proc.stdout!.on('data', (d) => {
      out += d;
      const url = out.match(/listening on (http:\/\/\S+)/)?.[1];
      const key = out.match(/\n(kl_live_\S+)\n/)?.[1];
      if (url && key) {
        clearTimeout(timer);
        resolve({ proc, url, key, http: new LoadClient(url) });
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`klein serve exited ${code}: ${out}`));
    });
  });
}

function figures(samples: Sample[]): EndpointFigures {
  const ok = samples.filter((s) => s.status !== 'error').map((s) => s.ms).sort((a, b) => a - b);
  const status: Record<string, number> = {};
  for (const s of samples) status[s.status] = (status[s.status] ?? 0) + 1;
  const r1 = (v: number) => Number(v.toFixed(1));
  return { count: samples.length, errors: samples.length - ok.length, status, p50_ms: r1(percentile(ok, 50)), p99_ms: r1(percentile(ok, 99)), max_ms: r1(ok.length ? ok[ok.length - 1] : NaN) };
}

/** Picks endpoints in MIX proportions, deterministically (request i of every 20 always gets the same one). */
function endpointOf(i: number): Endpoint {
  const slot = (i % 20) / 20;
  let acc = 0;
  for (const [e, share] of Object.entries(MIX) as [Endpoint, number][]) {
    acc += share;
    if (slot < acc - 1e-9) return e;
  }
  return 'health';
}

export async function runDuringGeneration(o: DuringGenerationOptions): Promise<DuringGenerationFigures> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-load-gen-'));
  // the limits are not what is measured: every request must reach the handlers
  fs.writeFileSync(path.join(dataDir, 'config.json'), JSON.stringify({ rateLimit: { createsPerMinute: 1e6, requestsPerMinute: 1e9 } }));
  const loadBefore = os.loadavg();
  const t0 = performance.now();
  const server = await startServer(o, dataDir);
  const serverStartS = (performance.now() - t0) / 1000;
  const headers = { authorization: `Bearer ${server.key}`, 'content-type': 'application/json' };
  const samples: Record<Endpoint, Sample[]> = { health: [], poll: [], create: [], sse: [] };
  const ids: string[] = [];
  const clientLoop = monitorEventLoopDelay({ resolution: 10 });
  try {
    const http = server.http;
    const models = JSON.parse((await http.request('GET', '/v1/models')).body) as { data: { id: string }[] };
    const modelId = models.data.find((m) => !m.id.endsWith('/edit'))!.id;
    const runBody = (prompt: string, width: number, height: number, steps?: number, seed = 1) => JSON.stringify({ input: { prompt, image_size: { width, height }, seed, ...(steps ? { num_inference_steps: steps } : {}) } });
    await warmUp(server, headers, modelId, o.rate, o.warmupS ?? 2);
    const created = await http.request('POST', `/v1/models/${modelId}/runs`, headers, runBody('a lighthouse at dusk, during the load', o.width, o.height, o.steps));
    if (created.status !== 201) throw new Error(`creating the large run: HTTP ${created.status} ${created.body}`);
    await serverLoopDelay(server); // the scrape resets the server's event-loop delay histogram
    const big = (JSON.parse(created.body) as { id: string }).id;
    ids.push(big);
    const tGen = performance.now();
    const deadline = tGen + o.maxSeconds * 1000;
    let finished: Finished | null = null;
    const inflight = new Set<Promise<void>>();
    const timed = (e: Endpoint, fn: () => Promise<number>) => {
      const s = performance.now();
      const at = s - tGen;
      const p = fn().then((status) => void samples[e].push({ at, ms: performance.now() - s, status }), () => void samples[e].push({ at, ms: performance.now() - s, status: 'error' }));
      inflight.add(p);
      void p.finally(() => inflight.delete(p));
    };
    const send = (i: number) => {
      const e = endpointOf(i);
      if (e === 'health') timed(e, async () => (await http.request('GET', '/v1/health')).status);
      else if (e === 'poll') {
        const id = i % 4 === 0 ? big : ids[(i * 7919) % ids.length];
        timed(e, async () => {
          const res = await http.request('GET', `/v1/runs/${id}`, headers);
          if (id !== big) return res.status;
          const run = JSON.parse(res.body) as { status_code?: string; started_at?: string; completed_at?: string; output?: { timings?: Record<string, number> } };
          if (['succeeded', 'failed', 'cancelled'].includes(run.status_code ?? '')) {
            finished ??= { status: run.status_code!, timings: run.output?.timings ?? null, wallS: (Date.parse(run.completed_at!) - Date.parse(run.started_at!)) / 1000 };
          }
          return res.status;
        });
      } else if (e === 'create') {
        timed(e, async () => {
          const res = await http.request('POST', `/v1/models/${modelId}/runs`, headers, runBody(`small ${i}`, 64, 64, 1, i));
          const run = JSON.parse(res.body) as { id?: string };
          if (run.id) ids.push(run.id);
          return res.status;
        });
      } else {
        // an SSE subscription: the latency is until its first event (the run's state as of subscribing)
        timed(e, () => http.firstChunk(`/v1/runs/${big}/events`, headers));
      }
    };
    clientLoop.enable();
    // open loop: request i is due at tGen + i / rate whatever the answers do
    let i = 0;
    while (!finished && performance.now() < deadline) {
      const due = tGen + (i * 1000) / o.rate;
      const wait = due - performance.now();
      if (wait > 1) await new Promise((r) => setTimeout(r, wait));
      send(i++);
    }
    clientLoop.disable();
    const genS = (performance.now() - tGen) / 1000;
    const serverLoop = await serverLoopDelay(server);
    await Promise.race([Promise.all(inflight), new Promise((r) => setTimeout(r, 30_000))]);
    if (o.samplesFile) fs.writeFileSync(o.samplesFile, JSON.stringify({ generation_s: genS, samples }));
    const endpoints = Object.fromEntries((Object.keys(samples) as Endpoint[]).map((e) => [e, figures(samples[e])])) as Record<Endpoint, EndpointFigures>;
    const slowest = (Object.entries(samples) as [Endpoint, Sample[]][]).flatMap(([endpoint, xs]) => xs.map((x) => ({ endpoint, at_s: Number((x.at / 1000).toFixed(2)), ms: Number(x.ms.toFixed(1)) })))
      .sort((a, b) => b.ms - a.ms).slice(0, 5);
    const f = finished as Finished | null;
    return {
      model: o.model, size: `${o.width}x${o.height}`, rate: o.rate, in_process: o.inProcess === true,
      server_start_s: Number(serverStartS.toFixed(1)), generation_s: Number(genS.toFixed(1)), run_status: f?.status ?? 'unfinished (time bound)', run_timings: f?.timings ?? null,
      service_overhead_s: f?.timings?.total !== undefined ? Number((f.wallS - f.timings.total).toFixed(3)) : null,
      sent: i, achieved_rate: Number((i / genS).toFixed(1)), client_loop_delay_max_ms: Number((clientLoop.max / 1e6).toFixed(1)),
      server_loop_delay_p99_ms: serverLoop.p99, server_loop_delay_max_ms: serverLoop.max, warmup_s: o.warmupS ?? 2,
      load_average_before: loadBefore.map((v) => Number(v.toFixed(2))), load_average_after: os.loadavg().map((v) => Number(v.toFixed(2))),
      endpoints, slowest,
    };
  } finally {
    server.http.close();
    await stopServer(server.proc);
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
}

/**
 * A freshly started server compiles its code paths on their first requests; a deployed one has long done so. So the
 * same rate of health checks, polls and creations first runs for `seconds`, none of which starts a generation (the
 * poll asks for no run: 404; the creation is refused: 422), and none of which is counted.
 */
async function warmUp(server: Server, headers: Record<string, string>, modelId: string, rate: number, seconds: number): Promise<void> {
  const t0 = performance.now();
  const pending: Promise<unknown>[] = [];
  for (let i = 0; performance.now() - t0 < seconds * 1000; i++) {
    const wait = t0 + (i * 1000) / rate - performance.now();
    if (wait > 1) await new Promise((r) => setTimeout(r, wait));
    const e = endpointOf(i);
    const req = e === 'health' ? server.http.request('GET', '/v1/health')
      : e === 'poll' ? server.http.request('GET', `/v1/runs/run_warm_up_${i}`, headers)
      : server.http.request('POST', `/v1/models/${modelId}/runs`, headers, JSON.stringify({ input: { prompt: 'warm-up', image_size: { width: 100, height: 100 } } }));
    pending.push(req.catch(() => undefined));
  }
  await Promise.all(pending);
}

/** The server's event-loop delay p99 and max since its previous scrape, in ms (an admin key reads /metrics). */
async function serverLoopDelay(server: Server): Promise<{ p99: number; max: number }> {
  const text = (await server.http.request('GET', '/metrics', { authorization: `Bearer ${server.key}` })).body;
  const ms = (name: string) => Number((Number(text.match(new RegExp(`^${name} (\\S+)$`, 'm'))?.[1]) * 1000).toFixed(1));
  return { p99: ms('nodejs_eventloop_lag_p99_seconds'), max: ms('nodejs_eventloop_lag_max_seconds') };
}

function stopServer(proc: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
    const timer = setTimeout(() => proc.kill('SIGKILL'), 60_000);
    proc.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    proc.kill('SIGTERM');
  });
}

export function printDuringGeneration(f: DuringGenerationFigures): void {
  console.log(`server: ${f.in_process ? 'engine in process (--in-process)' : 'engine in a child process'}, started in ${f.server_start_s} s; model ${f.model}`);
  console.log(`generation: ${f.size} ${f.run_status} in ${f.generation_s} s (engine: ${f.run_timings ? Object.entries(f.run_timings).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(', ') : '—'}; the service's started→completed beyond the engine's total: ${f.service_overhead_s ?? '—'} s)`);
  console.log(`load: ${f.sent} requests at ${f.achieved_rate}/s (asked ${f.rate}/s; mix ${Object.entries(MIX).map(([e, s]) => `${e} ${s * 100}%`).join(', ')}); client event-loop delay max ${f.client_loop_delay_max_ms} ms`);
  console.log(`server event-loop delay over the generation: p99 ${f.server_loop_delay_p99_ms} ms, max ${f.server_loop_delay_max_ms} ms (after a ${f.warmup_s} s warm-up)`);
  console.log(`load average before ${f.load_average_before.join(' ')}, after ${f.load_average_after.join(' ')} (${os.cpus().length} cores)`);
  for (const [e, x] of Object.entries(f.endpoints)) {
    console.log(`${e.padEnd(6)} n ${String(x.count).padStart(5)}  p50 ${x.p50_ms} ms  p99 ${x.p99_ms} ms  max ${x.max_ms} ms  status ${JSON.stringify(x.status)}`);
  }
  console.log(`slowest: ${f.slowest.map((x) => `${x.endpoint} sent at ${x.at_s} s took ${x.ms} ms`).join('; ')}`);
  console.log(JSON.stringify(f));
}
