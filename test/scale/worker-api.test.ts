// The API's worker routes and the worker runtime in one process, on a real redis-server and the tiny model:
// token checks, first-result-wins, cancellation reaching a running worker, a graceful stop that finishes the run, and
// transparent backgrounds across the worker protocol.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { createLogger } from '../../src/service/logger.ts';
import { ScaleApi } from '../../src/service/scale/api.ts';
import { WORKER_PREFIX } from '../../src/service/scale/protocol.ts';
import { RemotePipeline } from '../../src/service/scale/remote-pipeline.ts';
import { KleinWorker } from '../../src/service/scale/worker.ts';
import sharp from 'sharp';
import { openPipeline } from '../../src/pipeline/pipeline.ts';
import { type Harness, modelFolderWithoutMatting, pollUntil, realPipeline, startService, tempDir, terminal } from '../service/helpers.ts';
import { startRedis } from './redis-helper.ts';
import { cpuTarget } from '../../src/runtime/target.ts';

const TOKEN = 'in-process-token-0123456789';
const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';
const log = createLogger('silent');

describe('scale-out API and worker', () => {
  let redis: Awaited<ReturnType<typeof startRedis>>;
  let engine: ImagePipeline & { modelDir: string };
  let remote: RemotePipeline;
  let h: Harness;
  let modelId: string;
  const post = (p: string, body: unknown, token: string | null = TOKEN) =>
    fetch(h.url + WORKER_PREFIX + p, { method: 'POST', headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) }, body: JSON.stringify(body) });

  before(async () => {
    redis = await startRedis();
    engine = await realPipeline();
    modelId = (engine as unknown as { variant: { id: string } }).variant.id;
    remote = new RemotePipeline(redis.url, modelId, log);
    h = await startService({ pipeline: remote, config: { workers: 64 }, ...{} });
  });
  after(async () => {
    await h?.svc.close();
    await remote?.close();
    await engine?.close();
    redis?.stop();
  });

  // startService builds its own app: the scale routes need createApp's `scale` option, so these tests mount them here
  test('worker routes need the token; a worker for another model is refused', async () => {
    const api = new ScaleApi(remote, TOKEN);
    api.register(h.svc.app as never);
    const a = { id: 'w-test', model_id: modelId, device: 'cpu', free_memory_bytes: 1, job: null };
    const none = await post('/announce', a, null);
    assert.equal(none.status, 401);
    assert.equal(((await none.json()) as any).code, 'UNAUTHENTICATED');
    assert.equal((await post('/announce', a, 'not-the-token-at-all')).status, 401);
    const other = await post('/announce', { ...a, model_id: 'some-other-model' });
    assert.equal(other.status, 409);
    assert.equal(((await other.json()) as any).code, 'MODEL_MISMATCH');
    assert.equal((await post('/announce', a)).status, 200);
    assert.deepEqual(api.registry.perModel(), { [modelId]: { workers: 1, busy: 0 } });
    assert.throws(() => new ScaleApi(remote, 'short'), /16 characters/);
  });

  test('the first uploaded result settles the run; a second upload for the job gets 409 and bills nothing more', async () => {
    const c = await h.api('POST', T2I, { input: { prompt: 'twice', image_size: { width: 64, height: 64 } } });
    assert.equal(c.status, 201);
    let job;
    for (const t0 = Date.now(); !(job = (await remote.queue.getWaiting())[0]); ) {
      assert.ok(Date.now() - t0 < 10_000, 'no job reached Redis');
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(job.data.prompt, 'twice');
    const real = await engine.generate({ prompt: 'twice', width: 64, height: 64, seed: job.data.seed, numImages: 1, outputFormat: 'png' });
    const body = { worker: 'w-test', seed: real.seed, timings: real.timings, images: real.images.map((i) => ({ data: Buffer.from(i.data).toString('base64'), width: i.width, height: i.height, content_type: i.contentType })) };
    assert.equal((await post(`/jobs/${job.id}/result`, body, 'wrong-token-wrong-token')).status, 401);
    assert.equal((await post(`/jobs/${job.id}/result`, body)).status, 200);
    const dup = await post(`/jobs/${job.id}/result`, body);
    assert.equal(dup.status, 409);
    assert.equal(((await dup.json()) as any).code, 'ALREADY_SETTLED');
    const run = await pollUntil(h, c.json.id, terminal);
    assert.equal(run.status_code, 'succeeded');
    const img = await fetch(run.output.images[0].url);
    assert.deepEqual(Buffer.from(await img.arrayBuffer()), Buffer.from(real.images[0].data));
    assert.equal(h.svc.store.usage({ keyId: h.keyId }).reduce((s, u) => s + u.runs, 0), 1);
    await remote.queue.remove(job.id!).catch(() => undefined);
  });

  test('a real worker: progress reaches the run; cancel stops it unbilled; SIGTERM-style stop finishes the run first', async () => {
    const w = new KleinWorker({ queueUrl: redis.url, apiUrl: h.url, token: TOKEN, pipeline: engine, modelId, device: 'cpu', log, lockMs: 5000 });
    await w.start();
    const ok = await h.api('POST', T2I, { input: { prompt: 'remote', image_size: { width: 64, height: 64 }, num_inference_steps: 4 } });
    const done = await pollUntil(h, ok.json.id, terminal, 60_000);
    assert.equal(done.status_code, 'succeeded', JSON.stringify(done));
    const metrics = await (await fetch(`${h.url}/metrics`, { headers: { authorization: `Bearer ${h.newKey({ admin: true })}` } })).text();
    assert.ok(Number(metrics.match(/^klein_step_seconds_count (\S+)$/m)?.[1]) >= 1, 'denoise steps were reported by the worker');

    // cancel while the worker runs it: the worker's next progress post is told to stop
    const c = await h.api('POST', T2I, { input: { prompt: 'cancel me', image_size: { width: 64, height: 64 } } });
    await pollUntil(h, c.json.id, (r) => r.status_code === 'running' && (r.progress?.percent ?? 0) > 2, 60_000);
    const cancel = await h.api('POST', `/v1/runs/${c.json.id}/cancellation`);
    assert.ok(cancel.status < 300, JSON.stringify(cancel.json));
    const cancelled = await pollUntil(h, c.json.id, terminal, 60_000);
    assert.equal(cancelled.status_code, 'cancelled');

    // graceful stop while a run is in progress: stop() resolves only after the run has been uploaded
    const g = await h.api('POST', T2I, { input: { prompt: 'finish me', image_size: { width: 64, height: 64 } } });
    // (a run is `running` in the API from when it is handed to Redis; progress past preprocess means a worker has it)
    await pollUntil(h, g.json.id, (r) => r.status_code === 'running' && (r.progress?.percent ?? 0) > 2, 60_000);
    await w.stop();
    assert.equal(w.processed.length, 3, "the worker took the three runs, the last one finished before stop() returned");
    // the upload was accepted before stop() returned; the API records it right after
    const after = await pollUntil(h, g.json.id, terminal, 2_000);
    assert.equal(after.status_code, 'succeeded');
    const usage = h.svc.store.usage({ keyId: h.keyId }).reduce((s, u) => s + u.runs, 0);
    assert.equal(usage, 3); // 'twice', 'remote', 'finish me'; the cancelled run is not billed
  });

  test('transparent through a worker: the job carries background and the upload the alpha; a worker without matting weights fails the run', async () => {
    const w = new KleinWorker({ queueUrl: redis.url, apiUrl: h.url, token: TOKEN, pipeline: engine, modelId, device: 'cpu', log, lockMs: 5000, id: 'w-matting' });
    await w.start();
    try {
      const t = await h.api('POST', T2I, { input: { prompt: 'remote cut-out', image_size: { width: 64, height: 64 }, num_inference_steps: 2, background: 'transparent', output_format: 'webp' } });
      const done = await pollUntil(h, t.json.id, terminal, 60_000);
      assert.equal(done.status_code, 'succeeded', JSON.stringify(done));
      assert.equal(done.output.background, 'transparent');
      assert.equal(done.output.images[0].has_alpha, true);
      const meta = await sharp(Buffer.from(await (await fetch(done.output.images[0].url)).arrayBuffer())).metadata();
      assert.deepEqual([meta.format, meta.channels], ['webp', 4]);
    } finally {
      await w.stop();
    }

    // the API cannot see a worker's files: the worker finds no matting model and the run fails with the API's code
    const saved = { home: process.env.KLEIN_HOME, matting: process.env.KLEIN_MATTING_MODEL };
    process.env.KLEIN_HOME = tempDir('klein-home-');
    delete process.env.KLEIN_MATTING_MODEL;
    const bare = await openPipeline({ target: cpuTarget(), model: modelFolderWithoutMatting(engine.modelDir) });
    const w2 = new KleinWorker({ queueUrl: redis.url, apiUrl: h.url, token: TOKEN, pipeline: bare, modelId, device: 'cpu', log, lockMs: 5000, id: 'w-no-matting' });
    await w2.start();
    try {
      const f = await h.api('POST', T2I, { input: { prompt: 'no weights here', image_size: { width: 64, height: 64 }, background: 'transparent' } });
      const failed = await pollUntil(h, f.json.id, terminal, 60_000);
      assert.deepEqual([failed.status_code, failed.failure_code, failed.failure_stage, failed.cost], ['failed', 'MATTING_UNAVAILABLE', 'preprocess', '0.000']);
      assert.match(failed.failure_message, /klein pull --matting/);
    } finally {
      await w2.stop();
      await bare.close();
      if (saved.home === undefined) delete process.env.KLEIN_HOME;
      else process.env.KLEIN_HOME = saved.home;
      if (saved.matting !== undefined) process.env.KLEIN_MATTING_MODEL = saved.matting;
    }
  });
});
