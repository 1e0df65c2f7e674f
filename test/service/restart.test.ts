import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { pollUntil, realPipeline, startService, tempDir, terminal } from './helpers.ts';

const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';
const input = (steps = 4) => ({ input: { prompt: 'survive', image_size: { width: 64, height: 64 }, num_inference_steps: steps } });
// a 50-step run is caught mid-generation; the "process" is then dropped without writing anything, as kill -9 would
const midRun = (attempts: number) => (r: any) => r.status_code === 'running' && r.attempts === attempts && r.progress?.step >= 1;

let engine: ImagePipeline;
before(async () => {
  engine = await realPipeline();
});
after(async () => engine.close());

test('restart: queued runs continue, a running run is retried once, then failed WORKER_LOST; nothing is lost', async () => {
  const dataDir = tempDir();
  const a = await startService({ pipeline: engine, dataDir });
  const first = await a.api('POST', T2I, input(50));
  const q1 = await a.api('POST', T2I, input());
  const q2 = await a.api('POST', T2I, input());
  await pollUntil(a, first.json.id, midRun(1), 120_000);
  await a.svc.crash();

  // the interrupted run is requeued and runs again (attempt 2); the process dies again
  const b = await startService({ pipeline: engine, dataDir, key: a.key });
  await pollUntil(b, first.json.id, midRun(2), 60_000);
  await b.svc.crash();

  // the twice-interrupted run fails with WORKER_LOST; the queued ones run to the end
  const c = await startService({ pipeline: engine, dataDir, key: a.key });
  const lost = (await c.api('GET', `/v1/runs/${first.json.id}`)).json;
  assert.equal(lost.status_code, 'failed');
  assert.equal(lost.failure_code, 'WORKER_LOST');
  assert.equal(lost.cost, '0.000');
  for (const id of [q1.json.id, q2.json.id]) {
    const done = await pollUntil(c, id, terminal, 60_000);
    assert.equal(done.status_code, 'succeeded');
    assert.equal(done.attempts, 1);
    assert.equal(done.output.images.length, 1);
  }
  await c.svc.close();
});

test('a graceful stop puts the running run back in the queue without using up its retry', async () => {
  const dataDir = tempDir();
  const a = await startService({ pipeline: engine, dataDir });
  const r = await a.api('POST', T2I, input(50));
  await pollUntil(a, r.json.id, midRun(1), 120_000);
  await a.svc.close();
  const b = await startService({ pipeline: engine, dataDir, key: a.key });
  const done = await pollUntil(b, r.json.id, terminal, 60_000);
  assert.equal(done.status_code, 'succeeded');
  assert.equal(done.attempts, 1);
  await b.svc.close();
});
