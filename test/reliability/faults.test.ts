// Faults: the real `klein serve` process is killed with SIGKILL (no handler runs, nothing is flushed) while one run
// is generating, two wait in the queue and a callback is in flight to a receiver that hangs. After a restart every
// run ends (succeeded, or failed with a reason), the usage ledger matches the succeeded runs, every served file is a
// whole image, and the interrupted callback is delivered.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import Database from 'better-sqlite3';
import sharp from 'sharp';
import { realPipeline, tempDir } from '../service/helpers.ts';
import { startServe, type ServeProcess } from '../cli/helpers.ts';

const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';
const started: ChildProcess[] = [];
after(() => {
  for (const p of started) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
});

function serve(modelDir: string, dataDir: string): Promise<ServeProcess> {
  return startServe(['--model', modelDir, '--data', dataDir, '--port', '0', '--threads', '1'], { track: started, timeoutMs: 90_000 });
}

test('kill -9 while a run generates, two are queued and a callback is in flight: after restart all end, ledger matches, callbacks arrive', async () => {
  const engine = await realPipeline(); // makes (or reuses) the tiny model folder
  const modelDir = engine.modelDir;
  await engine.close();
  const dataDir = tempDir('klein-faults-');
  fs.writeFileSync(path.join(dataDir, 'config.json'), JSON.stringify({
    callbacks: { baseDelayMs: 50, maxDelayMs: 200, pollMs: 20, timeoutMs: 60_000, maxAttempts: 50 },
    inputs: { allowHttp: true, allowPrivate: ['127.0.0.1'] },
  }));

  // the callback receiver: first it accepts and never answers (the server dies mid-callback), then it answers 200
  let hang = true;
  const received: { run: string; event: string; status: string }[] = [];
  const pending: http.ServerResponse[] = [];
  const receiver = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', () => {
      const p = JSON.parse(body);
      if (hang) { pending.push(res); received.push({ run: p.run_id, event: String(req.headers['runflow-event']), status: 'hung' }); return; }
      received.push({ run: p.run_id, event: String(req.headers['runflow-event']), status: 'ok' });
      res.writeHead(200).end('ok');
    });
  });
  await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
  const hook = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hook`;

  const first = await serve(modelDir, dataDir);
  const key = first.out().match(/\n(kl_live_\S+)\n/)![1];
  const api = async (url: string, method: string, p: string, body?: unknown) => {
    const res = await fetch(url + p, { method, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
    return { status: res.status, json: (await res.json()) as any };
  };
  const make = async (steps: number, prompt: string) => {
    const r = await api(first.url, 'POST', T2I, { input: { prompt, image_size: { width: 64, height: 64 }, num_inference_steps: steps }, callback_url: hook });
    assert.equal(r.status, 201, JSON.stringify(r.json));
    return r.json.id as string;
  };
  const done = await make(2, 'finished before the crash');
  const long = await make(50, 'interrupted mid-generation');
  const q1 = await make(2, 'queued 1');
  const q2 = await make(2, 'queued 2');
  const ids = [done, long, q1, q2];

  // wait for the moment: `done` succeeded with its callback hanging, `long` mid-denoise, q1/q2 queued
  for (const t0 = Date.now(); ; await new Promise((r) => setTimeout(r, 20))) {
    assert.ok(Date.now() - t0 < 120_000, 'the crash moment never came');
    const l = (await api(first.url, 'GET', `/v1/runs/${long}`)).json;
    if (received.some((x) => x.run === done) && l.status_code === 'running' && l.progress?.step >= 1) break;
  }
  const before = Object.fromEntries(await Promise.all(ids.map(async (id) => [id, (await api(first.url, 'GET', `/v1/runs/${id}`)).json.status_code])));
  assert.equal(before[done], 'succeeded');
  assert.equal(before[long], 'running');
  first.proc.kill('SIGKILL');
  await new Promise((r) => first.proc.once('exit', r));
  assert.equal(first.proc.signalCode, 'SIGKILL');

  hang = false;
  for (const res of pending) res.destroy();
  const second = await serve(modelDir, dataDir);
  const final: Record<string, any> = {};
  for (const t0 = Date.now(); ; await new Promise((r) => setTimeout(r, 50))) {
    for (const id of ids) final[id] = (await api(second.url, 'GET', `/v1/runs/${id}`)).json;
    const allEnded = ids.every((id) => ['succeeded', 'failed', 'cancelled'].includes(final[id].status_code));
    const allCalled = ids.every((id) => received.some((x) => x.run === id && x.status === 'ok'));
    if (allEnded && allCalled) break;
    assert.ok(Date.now() - t0 < 150_000, `not settled: ${JSON.stringify(ids.map((id) => [final[id].status_code, final[id].progress]))} callbacks ${JSON.stringify(received)}`);
  }
  // the interrupted run ran again (attempt 2); the queued ones ran once; a failure would have to carry a reason
  for (const id of ids) {
    const r = final[id];
    if (r.status_code === 'failed') assert.ok(r.failure_code && r.failure_message, JSON.stringify(r));
    else assert.equal(r.status_code, 'succeeded', JSON.stringify(r));
  }
  assert.equal(final[long].attempts, 2);
  assert.equal(final[q1].attempts, 1);
  assert.equal(final[done].attempts, 1);
  // served files are whole images
  for (const id of ids.filter((i) => final[i].status_code === 'succeeded')) {
    const res = await fetch(final[id].output.images[0].url);
    assert.equal(res.status, 200);
    const meta = await sharp(Buffer.from(await res.arrayBuffer())).stats();
    assert.equal(meta.channels.length >= 3, true);
  }
  second.proc.kill('SIGTERM');
  await new Promise((r) => second.proc.once('exit', r));
  receiver.closeAllConnections();
  receiver.close();

  // the ledger: one usage row per succeeded run, none for failed ones, costs equal; no half-written files on disk
  const db = new Database(path.join(dataDir, 'klein.db'), { readonly: true });
  const usage = db.prepare('SELECT run_id, cost_micros FROM usage').all() as { run_id: string; cost_micros: number }[];
  const runs = db.prepare('SELECT id, status, cost_micros FROM runs').all() as { id: string; status: string; cost_micros: number }[];
  const succeeded = runs.filter((r) => r.status === 'succeeded');
  assert.deepEqual(usage.map((u) => u.run_id).sort(), succeeded.map((r) => r.id).sort());
  for (const u of usage) assert.equal(u.cost_micros, succeeded.find((r) => r.id === u.run_id)!.cost_micros);
  const deliveries = db.prepare("SELECT run_id, status FROM callback_deliveries").all() as { run_id: string; status: string }[];
  assert.ok(ids.every((id) => deliveries.some((d) => d.run_id === id && d.status === 'succeeded')), JSON.stringify(deliveries));
  db.close();
  const leftovers = fs.readdirSync(path.join(dataDir, 'outputs'), { recursive: true }).map(String).filter((f) => f.endsWith('.tmp'));
  assert.deepEqual(leftovers, []);
});
