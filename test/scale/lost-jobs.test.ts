// Scale-out runs never stay `running`: a job that dies in Redis (failed by BullMQ because its worker could not reach
// the API or stalled, removed, or lost with the data) settles its attempt — retried once, then failed WORKER_LOST,
// unbilled, called back — and a stopping API drains the runs on remote workers, then hands the rest to its next
// start. Real redis-server (one database per test), real API on 127.0.0.1, real workers on the tiny model.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { Worker } from 'bullmq';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { createLogger } from '../../src/service/logger.ts';
import { ScaleApi } from '../../src/service/scale/api.ts';
import { QUEUE_NAME } from '../../src/service/scale/protocol.ts';
import { redisConnection } from '../../src/service/scale/redis.ts';
import { RemotePipeline } from '../../src/service/scale/remote-pipeline.ts';
import { KleinWorker } from '../../src/service/scale/worker.ts';
import { type Harness, pollUntil, realPipeline, startService, terminal } from '../service/helpers.ts';
import { freePort, startRedis } from './redis-helper.ts';

const TOKEN = 'lost-jobs-token-0123456789';
const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';
const log = createLogger('silent');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A TCP relay to `port` that can be shut, leaving a closed port behind (a worker whose API went out of reach). */
async function relay(port: number): Promise<{ url: string; shut: () => Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((inbound) => {
    const outbound = net.connect(port, '127.0.0.1');
    for (const s of [inbound, outbound]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => undefined);
    }
    inbound.pipe(outbound).pipe(inbound);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const url = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  return {
    url,
    shut: () => new Promise<void>((r) => {
      server.close(() => r());
      for (const s of sockets) s.destroy();
    }),
  };
}

/** A callback receiver: the deliveries per run id. */
async function receiver(): Promise<{ url: string; got: Map<string, any[]>; close: () => void }> {
  const got = new Map<string, any[]>();
  const server = http.createServer((req, res) => {
    let b = '';
    req.on('data', (d) => (b += d));
    req.on('end', () => {
      const body = JSON.parse(b);
      got.set(body.run_id, [...(got.get(body.run_id) ?? []), body]);
      res.end('ok');
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/hook`, got, close: () => server.close() };
}

async function metric(h: Harness, name: string): Promise<number> {
  const text = await (await fetch(`${h.url}/metrics`, { headers: { authorization: `Bearer ${h.newKey({ admin: true })}` } })).text();
  return Number(text.match(new RegExp(`^${name} (\\S+)$`, 'm'))?.[1]);
}

describe('scale-out: lost jobs and a draining stop', () => {
  let redis: Awaited<ReturnType<typeof startRedis>>;
  let engine: ImagePipeline & { modelDir: string };
  let modelId: string;
  let db = 0;
  const cleanup: (() => Promise<unknown> | unknown)[] = [];

  before(async () => {
    redis = await startRedis();
    engine = await realPipeline();
    modelId = (engine as unknown as { variant: { id: string } }).variant.id;
  });
  after(async () => {
    for (const f of cleanup.reverse()) await f();
    await engine?.close();
    redis?.stop();
  });

  /** An API scaled out over its own Redis database (tests stay apart), with a fast sweep. */
  async function scaledApi(o: { drainMs?: number; dataDir?: string; port?: number; key?: string; queueUrl?: string } = {}) {
    const url = o.queueUrl ?? `${redis.url}/${++db}`;
    const remote = new RemotePipeline(url, modelId, log, 300);
    const h = await startService({ pipeline: remote, config: { workers: 64 }, scale: new ScaleApi(remote, TOKEN, { drainMs: o.drainMs ?? 0 }), ...(o.dataDir ? { dataDir: o.dataDir } : {}), ...(o.port ? { port: o.port } : {}), ...(o.key ? { key: o.key } : {}) });
    let closed = false;
    const close = async () => {
      if (closed) return;
      closed = true;
      await h.svc.close();
      await remote.close();
    };
    cleanup.push(close);
    return { h, remote, queueUrl: url, close };
  }

  function worker(queueUrl: string, apiUrl: string, extra: Partial<ConstructorParameters<typeof KleinWorker>[0]> = {}): KleinWorker {
    const w = new KleinWorker({ queueUrl, apiUrl, token: TOKEN, pipeline: engine, modelId, device: 'cpu', log, lockMs: 2000, retryMs: 20, ...extra });
    cleanup.push(() => w.stop(true));
    return w;
  }

  test('a worker that cannot reach the API: BullMQ fails its jobs, the run is retried once, then failed WORKER_LOST, unbilled, called back', { timeout: 90_000 }, async () => {
    const { h, queueUrl } = await scaledApi();
    const cb = await receiver();
    cleanup.push(cb.close);
    // the worker joins through a relay, which then goes away: its uploads meet a closed port
    const r = await relay(Number(new URL(h.url).port));
    const w = worker(queueUrl, r.url);
    await w.start();
    await r.shut();
    const t0 = Date.now();
    const c = await h.api('POST', T2I, { input: { prompt: 'nobody hears me', image_size: { width: 64, height: 64 }, num_inference_steps: 2 }, callback_url: cb.url });
    assert.equal(c.status, 201);
    const run = await pollUntil(h, c.json.id, terminal, 60_000);
    assert.deepEqual([run.status_code, run.failure_code, run.failure_stage, run.attempts, run.cost], ['failed', 'WORKER_LOST', 'inference', 2, '0.000'], JSON.stringify(run));
    assert.match(run.failure_message, /the job failed on its worker: \/jobs\/\S+\/result: cannot reach the API at http:\/\/127\.0\.0\.1:\d+: .*ECONNREFUSED.*\(attempt 2 of 2; not retried again\)/);
    assert.equal(w.processed.length, 2, 'one job per attempt, each generated and failed in BullMQ');
    assert.equal(h.svc.store.usage({ keyId: h.keyId }).reduce((s, u) => s + u.runs, 0), 0);
    assert.equal(await metric(h, 'klein_jobs_lost_total'), 2);
    for (const t = Date.now(); !cb.got.has(c.json.id) && Date.now() - t < 10_000; ) await sleep(20);
    assert.deepEqual(cb.got.get(c.json.id)?.map((d) => d.status), ['failed']);
    console.log(`# unreachable API: run failed after ${Date.now() - t0} ms`);
  });

  test('a worker that dies holding the job: BullMQ fails it as stalled, the run is retried and succeeds on a live worker, billed once', { timeout: 90_000 }, async () => {
    const { h, queueUrl } = await scaledApi();
    // the dying worker: it takes the job, then its process is gone (force-closed: no more lock renewals)
    let took: string | undefined;
    const dying = new Worker(QUEUE_NAME, async (job) => {
      took = job.id;
      await new Promise(() => undefined);
    }, { connection: redisConnection(queueUrl), lockDuration: 1000, stalledInterval: 500 });
    cleanup.push(() => dying.close(true));
    const c = await h.api('POST', T2I, { input: { prompt: 'survive my worker', image_size: { width: 64, height: 64 }, num_inference_steps: 2 } });
    for (const t = Date.now(); !took; await sleep(20)) assert.ok(Date.now() - t < 10_000, 'the dying worker never took the job');
    await dying.close(true);
    // the live worker's stalled check finds the lock gone; with no stall allowed, BullMQ fails the job at once
    const w = worker(queueUrl, h.url, { maxStalledCount: 0 });
    await w.start();
    const run = await pollUntil(h, c.json.id, terminal, 60_000);
    assert.deepEqual([run.status_code, run.attempts], ['succeeded', 2], JSON.stringify(run));
    assert.equal(h.svc.store.usage({ keyId: h.keyId }).reduce((s, u) => s + u.runs, 0), 1);
    assert.equal(await metric(h, 'klein_jobs_lost_total'), 1);
    assert.ok(!w.processed.includes(took!), 'the stalled job was failed, not run again');
  });

  test('jobs removed or lost from Redis while waiting: the removal is seen at once, the loss by the sweep; failed WORKER_LOST', { timeout: 60_000 }, async () => {
    const { h, remote } = await scaledApi();
    const c = await h.api('POST', T2I, { input: { prompt: 'nobody takes me', image_size: { width: 64, height: 64 } } });
    const waiting = async (not?: string) => {
      for (const t = Date.now(); ; await sleep(20)) {
        const job = (await remote.queue.getWaiting()).find((j) => j.id !== not);
        if (job) return job;
        assert.ok(Date.now() - t < 10_000, 'no job in Redis');
      }
    };
    const first = await waiting();
    await remote.queue.remove(first.id!); // as an operator's dashboard would
    const second = await waiting(first.id);
    const requeued = (await h.api('GET', `/v1/runs/${c.json.id}`)).json;
    assert.deepEqual([requeued.status_code, requeued.attempts], ['running', 2]);
    await ((await remote.queue.client) as unknown as { flushdb(): Promise<unknown> }).flushdb(); // the data is gone: no event says so
    const run = await pollUntil(h, c.json.id, terminal, 10_000);
    assert.deepEqual([run.status_code, run.failure_code, run.cost], ['failed', 'WORKER_LOST', '0.000'], JSON.stringify(run));
    assert.match(run.failure_message, /no longer in Redis .*\(attempt 2 of 2; not retried again\)/);
    assert.equal(await metric(h, 'klein_jobs_lost_total'), 2);
    void second;
  });

  test('stop with runs on a remote worker: the running one finishes within the drain, the waiting one goes back; one past the drain is requeued; after restarts all succeed, each billed once', { timeout: 120_000 }, async () => {
    const port = await freePort();
    const a = await scaledApi({ drainMs: 30_000, port });
    const restart = (drainMs: number) => scaledApi({ drainMs, port, dataDir: a.h.dataDir, key: a.h.key, queueUrl: a.queueUrl });
    const w = worker(a.queueUrl, a.h.url);
    await w.start();
    const r1 = await a.h.api('POST', T2I, { input: { prompt: 'finish while stopping', image_size: { width: 64, height: 64 }, num_inference_steps: 8 } });
    const r2 = await a.h.api('POST', T2I, { input: { prompt: 'wait for the next start', image_size: { width: 64, height: 64 }, num_inference_steps: 2 } });
    await pollUntil(a.h, r1.json.id, (r) => r.progress?.stage === 'denoise', 30_000);
    let t0 = Date.now();
    await a.close();
    const drainedMs = Date.now() - t0;
    assert.ok(drainedMs < 30_000, `the drain ended with the run (${drainedMs} ms)`);
    // (the worker records r1's job once the API answered its upload, a moment after the API settled the run)
    for (const t = Date.now(); w.processed.length < 1 && Date.now() - t < 5_000; ) await sleep(20);
    await sleep(500);
    assert.equal(w.processed.length, 1, 'the waiting job was withdrawn before the worker could take it');

    // the next start: r1 finished during the drain; r2 is in the queue again, with no attempt used, and runs now
    const b = await restart(100);
    const r1done = (await b.h.api('GET', `/v1/runs/${r1.json.id}`)).json;
    assert.deepEqual([r1done.status_code, r1done.attempts], ['succeeded', 1], JSON.stringify(r1done));
    const r2done = await pollUntil(b.h, r2.json.id, terminal, 30_000);
    assert.deepEqual([r2done.status_code, r2done.attempts], ['succeeded', 1], JSON.stringify(r2done));

    // a run longer than the 100 ms drain: requeued when it is up (the worker's late upload is refused), runs again
    const r3 = await b.h.api('POST', T2I, { input: { prompt: 'outlive the drain', image_size: { width: 64, height: 64 }, num_inference_steps: 24 } });
    await pollUntil(b.h, r3.json.id, (r) => r.progress?.stage === 'denoise', 30_000);
    t0 = Date.now();
    await b.close();
    const cutMs = Date.now() - t0;
    const c = await restart(0);
    const r3back = (await c.h.api('GET', `/v1/runs/${r3.json.id}`)).json;
    assert.notEqual(r3back.status_code, 'succeeded', 'the run outlived the drain');
    const r3done = await pollUntil(c.h, r3.json.id, terminal, 60_000);
    assert.deepEqual([r3done.status_code, r3done.attempts], ['succeeded', 1], JSON.stringify(r3done));
    const usage = c.h.svc.store.usage({ keyId: c.h.keyId }).reduce((s, u) => s + u.runs, 0);
    assert.equal(usage, 3, 'three runs, three ledger rows');
    console.log(`# drain: r1 finished in ${drainedMs} ms of a 30 s drain; stop past a 100 ms drain took ${cutMs} ms`);
  });
});
