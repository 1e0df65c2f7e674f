// Scale-out end to end: Debian's redis-server, `klein serve --queue … --workers 0` and two `klein worker` processes
// on the tiny model, all real processes on 127.0.0.1. 20 runs; one worker is killed with SIGKILL mid-run; every run
// must succeed exactly once, with one callback each, one ledger row each, and metrics that agree.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import http from 'node:http';
import type net from 'node:net';
import path from 'node:path';
import Database from 'better-sqlite3';
import sharp from 'sharp';
import { realPipeline, tempDir } from '../service/helpers.ts';
import { startRedis } from './redis-helper.ts';

const ROOT = path.resolve(import.meta.dirname, '../..');
const TOKEN = 'test-worker-token-0123456789';
const started: ChildProcess[] = [];
after(() => {
  for (const p of started) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
});

/** Spawn and resolve once stdout matches `ready`. */
function launch(cmd: string, args: string[], ready: RegExp, env: Record<string, string> = {}): Promise<{ proc: ChildProcess; out: () => string; m: RegExpMatchArray }> {
  return new Promise((resolve, reject) => {
    const proc = spawn(cmd, args, { env: { ...process.env, KLEIN_LOG_LEVEL: 'warn', ...env } });
    started.push(proc);
    let out = '';
    const timer = setTimeout(() => reject(new Error(`${path.basename(cmd)} ${args[1] ?? ''} did not start: ${out}`)), 60_000);
    const on = (d: Buffer) => {
      out += d;
      const m = out.match(ready);
      if (m) {
        clearTimeout(timer);
        resolve({ proc, out: () => out, m });
      }
    };
    proc.stdout!.on('data', on);
    proc.stderr!.on('data', (d) => (out += d));
    proc.on('exit', (code) => reject(new Error(`${cmd} exited ${code}: ${out}`)));
  });
}

const klein = (args: string[], ready: RegExp) => launch(process.execPath, [path.join(ROOT, 'bin/klein.js'), ...args], ready, { KLEIN_WORKER_TOKEN: TOKEN });

let modelDir: string;
let redisUrl: string;
before(async () => {
  const p = await realPipeline();
  modelDir = p.modelDir;
  await p.close();
  const redis = await startRedis();
  started.push(redis.proc);
  redisUrl = redis.url;
});

test('20 runs over two workers, one killed with SIGKILL mid-run: each run succeeds once, one callback, right ledger and metrics', { timeout: 110_000 }, async (t) => {
  const T0 = Date.now();
  const data = tempDir('klein-scale-');
  // loopback callbacks over plain http are refused by default (SSRF guard): allow them for the receiver
  (await import('node:fs')).writeFileSync(path.join(data, 'config.json'), JSON.stringify({ inputs: { allowHttp: true, allowPrivate: ['127.0.0.1'] }, callbacks: { baseDelayMs: 50, maxDelayMs: 400, pollMs: 20 } }));
  const api = await klein(['serve', '--model', modelDir, '--data', data, '--port', '0', '--queue', redisUrl, '--workers', '0'], /listening on (http:\/\/\S+)[\s\S]*\n(kl_live_\S+)\n/);
  const url = api.m[1];
  const key = api.m[2];
  const call = async (method: string, p: string, body?: unknown, headers: Record<string, string> = {}) => {
    const res = await fetch(url + p, { method, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', ...headers }, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await res.text();
    return { status: res.status, json: text.startsWith('{') ? JSON.parse(text) : text };
  };

  const workerArgs = ['worker', '--queue', redisUrl, '--api', url, '--model', modelDir, '--lock-ms', '3000', '--threads', '1'];
  t.diagnostic(`api up after ${Date.now() - T0} ms`);
  // a worker with the wrong token is refused with a clear message and a non-zero exit
  const bad = spawn(process.execPath, [path.join(ROOT, 'bin/klein.js'), 'worker', '--queue', redisUrl, '--api', url, '--model', modelDir], { env: { ...process.env, KLEIN_WORKER_TOKEN: 'wrong-token-wrong-token' } });
  let badErr = '';
  bad.stderr.on('data', (d) => (badErr += d));
  const badCode = new Promise((r) => bad.on('exit', r));

  const [w1, w2] = await Promise.all([klein(workerArgs, /klein worker (\S+):/), klein(workerArgs, /klein worker (\S+):/)]);
  assert.equal(await badCode, 2);
  assert.match(badErr, /UNAUTHENTICATED/);

  t.diagnostic(`workers up after ${Date.now() - T0} ms`);
  const health = await call('GET', '/v1/health');
  assert.equal(health.json.backend, 'redis');
  assert.equal(health.json.workers.length, 2);
  assert.ok(health.json.workers.every((w: any) => w.device === 'cpu' && w.free_memory_bytes > 0));

  // the callback receiver counts deliveries per run
  const deliveries = new Map<string, number>();
  const receiver = http.createServer((req, res) => {
    let b = '';
    req.on('data', (d) => (b += d));
    req.on('end', () => {
      const id = JSON.parse(b).run_id as string;
      deliveries.set(id, (deliveries.get(id) ?? 0) + 1);
      res.end('ok');
    });
  });
  await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', () => r()));
  const cb = `http://127.0.0.1:${(receiver.address() as net.AddressInfo).port}/hook`;

  const ids: string[] = [];
  for (let i = 0; i < 20; i++) {
    const r = await call('POST', '/v1/models/black-forest-labs/flux-2-klein-4b/runs', { input: { prompt: `scale ${i}`, image_size: { width: 64, height: 64 }, seed: i }, callback_url: cb });
    assert.equal(r.status, 201, JSON.stringify(r.json));
    ids.push(r.json.id);
  }

  // SIGKILL worker 1 while it is in the middle of a run (a denoise step reported for its job)
  const w1id = w1.m[1];
  for (const t0 = Date.now(); ; ) {
    const h = await call('GET', '/v1/health');
    // mid-run: it has reported the denoising stage of a job it has not finished
    if (h.json.workers.some((w: any) => w.id === w1id && w.busy && w.stage === 'denoise')) break;
    if (Date.now() - t0 > 30_000) throw new Error('worker 1 never got a run');
    await new Promise((r) => setTimeout(r, 5));
  }
  w1.proc.kill('SIGKILL');
  t.diagnostic(`worker 1 killed after ${Date.now() - T0} ms`);

  const deadline = Date.now() + 80_000;
  const runs: any[] = [];
  for (const id of ids) {
    for (;;) {
      const r = await call('GET', `/v1/runs/${id}`);
      if (['succeeded', 'failed', 'cancelled'].includes(r.json.status_code)) {
        runs.push(r.json);
        break;
      }
      if (Date.now() > deadline) throw new Error(`run ${id} still ${r.json.status_code}`);
      await new Promise((res) => setTimeout(res, 100));
    }
  }
  t.diagnostic(`all runs terminal after ${Date.now() - T0} ms`);
  assert.deepEqual(runs.map((r) => r.status_code), ids.map(() => 'succeeded'));
  // each run has one real image, decoded back
  for (const r of runs) {
    assert.equal(r.output.images.length, 1);
    const img = await fetch(r.output.images[0].url);
    assert.equal(img.status, 200);
    const meta = await sharp(Buffer.from(await img.arrayBuffer())).metadata();
    assert.deepEqual([meta.width, meta.height], [64, 64]);
  }

  // callbacks: exactly one per run (wait until all 20 arrived, then a little longer for any duplicate)
  for (const t0 = Date.now(); deliveries.size < 20 && Date.now() - t0 < 20_000; ) await new Promise((r) => setTimeout(r, 50));
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(deliveries.size, 20);
  for (const id of ids) assert.equal(deliveries.get(id), 1, `callbacks for ${id}`);

  // the ledger: one usage row per run, its cost equal to the run's
  const db = new Database(path.join(data, 'klein.db'), { readonly: true });
  const usage = db.prepare('SELECT run_id, cost_micros FROM usage').all() as { run_id: string; cost_micros: number }[];
  const images = db.prepare("SELECT count(*) AS n FROM runs WHERE status = 'succeeded'").get() as { n: number };
  db.close();
  assert.equal(usage.length, 20);
  assert.deepEqual(new Set(usage.map((u) => u.run_id)), new Set(ids));
  const costOf = new Map(runs.map((r) => [r.id, r.cost_micros ?? null]));
  for (const u of usage) assert.ok(u.cost_micros > 0);
  assert.equal(images.n, 20);
  void costOf;

  // the run the killed worker held was retried (attempts 1 in the API: the job itself was handed over in Redis)
  const text = await (await fetch(`${url}/metrics`, { headers: { authorization: `Bearer ${key}` } })).text();
  const sample = (name: string) => Number(text.match(new RegExp(`^${name.replace(/[{}"]/g, (c) => `\\${c}`)} (\\S+)$`, 'm'))?.[1]);
  assert.equal(sample('klein_runs{status="succeeded"}'), 20);
  assert.equal(sample('klein_runs{status="queued"}'), 0);
  assert.equal(sample('klein_runs{status="running"}'), 0);
  assert.ok(sample('klein_step_seconds_count') > 0);
  assert.ok(sample('klein_step_seconds_sum') > 0);
  // the killed worker's run was finished by the other worker: BullMQ's stalled-job recovery, not an API retry
  assert.ok(sample('klein_jobs_taken_over_total') >= 1, text);
  // worker 1 is gone (it stops counting after its TTL); the survivor is live
  assert.ok(sample('klein_workers') >= 1);
  await new Promise((r) => setTimeout(r, 1100)); // the queue-depth cache refreshes every second
  const text2 = await (await fetch(`${url}/metrics`, { headers: { authorization: `Bearer ${key}` } })).text();
  assert.match(text2, /^klein_queue_depth\{state="waiting"\} 0$/m);

  // graceful stop: the worker and the API exit 0 on SIGTERM
  const exited = (p: ChildProcess) => new Promise((r) => p.once('exit', (code) => r(code)));
  const w2exit = exited(w2.proc);
  w2.proc.kill('SIGTERM');
  assert.equal(await w2exit, 0);
  const apiExit = exited(api.proc);
  api.proc.kill('SIGTERM');
  assert.equal(await apiExit, 0);
  receiver.close();
});
