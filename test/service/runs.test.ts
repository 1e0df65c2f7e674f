import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import sharp from 'sharp';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { type Harness, pollUntil, realPipeline, startService, terminal } from './helpers.ts';

const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';
const small = (extra: Record<string, unknown> = {}) => ({ input: { prompt: 'a red cube', image_size: { width: 64, height: 64 }, ...extra } });

describe('runs', () => {
  let h: Harness;
  let engine: ImagePipeline;
  before(async () => {
    engine = await realPipeline();
    h = await startService({ pipeline: engine });
  });
  after(async () => {
    await h.svc.close();
    await engine.close();
  });

  test('create → poll → fetch the image, decoded at the right size and format', async () => {
    const c = await h.api('POST', T2I, small({ seed: 7, output_format: 'webp', num_images: 2 }));
    assert.equal(c.status, 201);
    assert.equal(c.json.status_code, 'queued');
    assert.equal(c.json.model_id, 'black-forest-labs/flux-2-klein-4b');
    const run = await pollUntil(h, c.json.id, terminal, 120_000); // the first run loads the model
    assert.equal(run.status_code, 'succeeded', JSON.stringify(run));
    assert.equal(run.output.images.length, 2);
    assert.equal(run.output.seed, 7);
    for (const img of run.output.images) {
      const res = await fetch(img.url);
      assert.equal(res.status, 200);
      assert.equal(res.headers.get('content-type'), 'image/webp');
      const meta = await sharp(Buffer.from(await res.arrayBuffer())).metadata();
      assert.deepEqual([meta.format, meta.width, meta.height], ['webp', 64, 64]);
    }
    assert.ok(run.duration_ms >= 0 && run.started_at && run.completed_at);
    assert.equal(run.progress.percent, 100);
  });

  test('the short model id and presets resolve', async () => {
    const c = await h.api('POST', '/v1/models/flux-2-klein-4b/runs', { input: { prompt: 'x', image_size: 'square' }, client_ref: 'short' });
    assert.equal(c.status, 201);
    assert.equal(c.json.model_id, 'black-forest-labs/flux-2-klein-4b');
    assert.deepEqual(c.json.cost_breakdown.images[0].width, 512);
    await h.api('POST', `/v1/runs/${c.json.id}/cancellation`);
  });

  test('sync_mode returns the finished run with inline images; Prefer: wait=N too', async () => {
    const c = await h.api('POST', T2I, small({ sync_mode: true, output_format: 'jpeg' }));
    assert.equal(c.status, 201);
    assert.equal(c.json.status_code, 'succeeded');
    const url: string = c.json.output.images[0].url;
    assert.match(url, /^data:image\/jpeg;base64,/);
    const meta = await sharp(Buffer.from(url.split(',')[1], 'base64')).metadata();
    assert.deepEqual([meta.format, meta.width, meta.height], ['jpeg', 64, 64]);

    const w = await h.api('POST', T2I, small(), { Prefer: 'wait=20' });
    assert.equal(w.json.status_code, 'succeeded');
    assert.equal(w.headers.get('preference-applied'), 'wait=20');
    assert.match(w.json.output.images[0].url, /^http:\/\/127\.0\.0\.1:\d+\/v1\/files\//);
  });

  test('server-sent events: the current state, one progress event per step, then done', async () => {
    const c = await h.api('POST', T2I, small({ num_inference_steps: 3 }));
    const res = await fetch(`${h.url}/v1/runs/${c.json.id}/events`, { headers: { authorization: `Bearer ${h.key}` } });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /text\/event-stream/);
    const text = await res.text(); // the stream ends after `done`
    const events = [...text.matchAll(/event: (\w+)\ndata: (.*)\n/g)].map((m) => ({ event: m[1], data: JSON.parse(m[2]) }));
    const names = events.map((e) => e.event);
    assert.equal(names[names.length - 1], 'done');
    assert.equal(events[events.length - 1].data.status_code, 'succeeded');
    const steps = events.filter((e) => e.event === 'progress' && e.data.stage === 'denoise').map((e) => e.data.step);
    // the stream may join after the first step, but it sees every later one in order and the last
    assert.ok(steps.length >= 1 && steps[steps.length - 1] === 3, names.join(','));
    assert.deepEqual(steps, [...steps].sort());
  });

  test('list with filters and cursor pagination; statuses', async () => {
    for (let i = 0; i < 3; i++) await h.api('POST', T2I, { ...small(), client_ref: 'page-test' });
    const p1 = await h.api('GET', '/v1/runs?client_ref=page-test&limit=2');
    assert.equal(p1.status, 200);
    assert.equal(p1.json.data.length, 2);
    assert.equal(p1.json.has_more, true);
    const p2 = await h.api('GET', `/v1/runs?client_ref=page-test&limit=2&cursor=${p1.json.next_cursor}`);
    assert.equal(p2.json.data.length, 1);
    assert.equal(p2.json.has_more, false);
    const ids = [...p1.json.data, ...p2.json.data].map((r: any) => r.id);
    assert.equal(new Set(ids).size, 3);
    assert.deepEqual(ids, [...ids].sort().reverse());
    const bad = await h.api('GET', '/v1/runs?status=done');
    assert.equal(bad.status, 422);
    assert.deepEqual(bad.json.errors[0].loc, ['query', 'status']);
    const st = await h.api('GET', '/v1/runs/statuses');
    assert.deepEqual(st.json.data.map((s: any) => s.code), ['queued', 'running', 'succeeded', 'failed', 'cancelled']);
    // another key sees none of these runs
    const other = h.newKey();
    const mine = await fetch(`${h.url}/v1/runs?client_ref=page-test`, { headers: { authorization: `Bearer ${other}` } });
    assert.equal(((await mine.json()) as any).data.length, 0);
    const got = await fetch(`${h.url}/v1/runs/${ids[0]}`, { headers: { authorization: `Bearer ${other}` } });
    assert.equal(got.status, 404);
    assert.equal(((await got.json()) as any).code, 'RUN_NOT_FOUND');
  });

  test('envelopes: 401 without or with a bad key, 422 with field locations, 404 model, 400 bad JSON', async () => {
    const none = await fetch(`${h.url}/v1/runs`);
    assert.equal(none.status, 401);
    assert.deepEqual(Object.keys(await none.json()), ['code', 'message', 'errors']);
    const bad = await h.api('GET', '/v1/auth/me', undefined, { authorization: 'Bearer kl_live_nope' });
    assert.equal(bad.status, 401);
    assert.equal(bad.json.code, 'UNAUTHENTICATED');

    const v = await h.api('POST', T2I, { input: { prompt: '', image_size: { width: 65, height: 64 }, num_images: 9, output_format: 'gif' } });
    assert.equal(v.status, 422);
    assert.equal(v.json.code, 'VALIDATION_ERROR');
    const locs = v.json.errors.map((e: any) => e.loc.join('.'));
    for (const l of ['body.input.prompt', 'body.input.image_size', 'body.input.num_images', 'body.input.output_format']) assert.ok(locs.some((x: string) => x.startsWith(l)), `${l} in ${locs}`);
    const big = await h.api('POST', T2I, { input: { prompt: 'x', image_size: { width: 4096, height: 2048 } } });
    assert.equal(big.status, 422);
    const unknown = await h.api('POST', T2I, { input: { prompt: 'x', steps: 4 } });
    assert.equal(unknown.status, 422);
    assert.match(JSON.stringify(unknown.json.errors), /steps/);
    const m = await h.api('POST', '/v1/models/nope/runs', small());
    assert.equal(m.status, 404);
    assert.equal(m.json.code, 'MODEL_NOT_FOUND');
    const j = await h.api('POST', T2I, '{not json');
    assert.equal(j.status, 400);
    assert.equal(j.json.code, 'BAD_REQUEST');
    const nf = await h.api('GET', '/v1/nothing');
    assert.equal(nf.status, 404);
    assert.equal(nf.json.code, 'NOT_FOUND');
  });

  test('429 RATE_LIMITED with Retry-After once a key exceeds its creations per minute', async () => {
    const key = h.newKey({ rateLimitPerMin: 2 });
    const post = () => fetch(`${h.url}${T2I}`, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: JSON.stringify(small()) });
    assert.equal((await post()).status, 201);
    assert.equal((await post()).status, 201);
    const r = await post();
    assert.equal(r.status, 429);
    assert.ok(Number(r.headers.get('retry-after')) >= 1);
    assert.equal(r.headers.get('x-ratelimit-remaining'), '0');
    const body = (await r.json()) as any;
    assert.equal(body.code, 'RATE_LIMITED');
    assert.equal(body.errors, null);
  });

  test('Idempotency-Key: same body replays the same run, a different body is 409', async () => {
    const k = { 'Idempotency-Key': 'idem-1' };
    const a = await h.api('POST', T2I, small({ seed: 1 }), k);
    const b = await h.api('POST', T2I, small({ seed: 1 }), k);
    assert.equal(a.status, 201);
    assert.equal(b.status, 201);
    assert.equal(b.json.id, a.json.id);
    assert.equal(b.headers.get('idempotent-replayed'), 'true');
    const c = await h.api('POST', T2I, small({ seed: 2 }), k);
    assert.equal(c.status, 409);
    assert.equal(c.json.code, 'IDEMPOTENCY_CONFLICT');
    const list = await h.api('GET', '/v1/runs?limit=100');
    assert.equal(list.json.data.filter((r: any) => r.id === a.json.id).length, 1);
  });

  test('GET /v1/auth/me describes the key', async () => {
    const me = await h.api('GET', '/v1/auth/me');
    assert.equal(me.status, 200);
    assert.equal(me.json.key.id, h.keyId);
    assert.ok(!('hash' in me.json.key));
    assert.equal(me.json.limits.concurrent_runs, 2);
  });
});

describe('cancellation', () => {
  let h: Harness;
  let engine: ImagePipeline;
  before(async () => {
    engine = await realPipeline();
    h = await startService({ pipeline: engine, config: { workers: 1 } });
  });
  after(async () => {
    await h.svc.close();
    await engine.close();
  });

  test('a queued run is cancelled at once; a running one between steps; neither is billed', async () => {
    // 50 steps keep the run busy long enough to catch it between steps
    const running = await h.api('POST', T2I, small({ num_inference_steps: 50 }));
    const queued = await h.api('POST', T2I, small());
    await pollUntil(h, running.json.id, (r) => r.progress?.step >= 1, 120_000);
    assert.equal((await h.api('GET', `/v1/runs/${queued.json.id}`)).json.status_code, 'queued');

    const cq = await h.api('POST', `/v1/runs/${queued.json.id}/cancellation`);
    assert.equal(cq.status, 201);
    assert.equal(cq.json.status_code, 'cancelled');
    assert.equal(cq.json.cost, '0.000');
    assert.equal(cq.json.cost_breakdown.state, 'waived');

    const cr = await h.api('POST', `/v1/runs/${running.json.id}/cancellation`);
    assert.equal(cr.status, 201);
    assert.equal(cr.json.status_code, 'cancelled');
    assert.equal(cr.json.output, null);
    assert.equal(cr.json.cost, '0.000');
    assert.ok(cr.json.progress.step < 50, `stopped between steps (at ${cr.json.progress.step} of 50)`);

    const again = await h.api('POST', `/v1/runs/${running.json.id}/cancellation`);
    assert.equal(again.status, 200);
    const usage = await h.api('GET', '/v1/usage');
    assert.equal(usage.json.total_cost, '0.000');
  });
});
