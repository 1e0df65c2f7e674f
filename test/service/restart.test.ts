import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pollUntil, StandInPipeline, startService, tempDir, terminal } from './helpers.ts';

const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';
const input = { input: { prompt: 'survive', image_size: { width: 64, height: 64 } } };

test('restart: queued runs continue, a running run is retried once, then failed WORKER_LOST; nothing is lost', async () => {
  const dataDir = tempDir();
  // process 1: one run in flight (held mid-generation) and two queued behind it, then the process dies
  const stuck = new StandInPipeline({ manual: true });
  const a = await startService({ pipeline: stuck, dataDir });
  const first = await a.api('POST', T2I, input);
  const q1 = await a.api('POST', T2I, input);
  const q2 = await a.api('POST', T2I, input);
  await pollUntil(a, first.json.id, (r) => r.status_code === 'running');
  await a.svc.crash();

  // process 2: the interrupted run is requeued (attempt 2) and held again; the process dies again
  const stuck2 = new StandInPipeline({ manual: true });
  const b = await startService({ pipeline: stuck2, dataDir, key: a.key });
  const r2 = await pollUntil(b, first.json.id, (r) => r.status_code === 'running');
  assert.equal(r2.attempts, 2);
  await b.svc.crash();

  // process 3: the twice-interrupted run fails with WORKER_LOST; the queued ones run to the end
  const c = await startService({ pipeline: new StandInPipeline(), dataDir, key: a.key });
  const lost = (await c.api('GET', `/v1/runs/${first.json.id}`)).json;
  assert.equal(lost.status_code, 'failed');
  assert.equal(lost.failure_code, 'WORKER_LOST');
  assert.equal(lost.cost, '0.000');
  for (const id of [q1.json.id, q2.json.id]) {
    const done = await pollUntil(c, id, terminal);
    assert.equal(done.status_code, 'succeeded');
    assert.equal(done.attempts, 1);
  }
  await c.svc.close();
});

test('a graceful stop puts the running run back in the queue without using up its retry', async () => {
  const dataDir = tempDir();
  const a = await startService({ pipeline: new StandInPipeline({ manual: true }), dataDir });
  const r = await a.api('POST', T2I, input);
  await pollUntil(a, r.json.id, (x) => x.status_code === 'running');
  await a.svc.close();
  const b = await startService({ pipeline: new StandInPipeline(), dataDir, key: a.key });
  const done = await pollUntil(b, r.json.id, terminal);
  assert.equal(done.status_code, 'succeeded');
  assert.equal(done.attempts, 1);
  await b.svc.close();
});
