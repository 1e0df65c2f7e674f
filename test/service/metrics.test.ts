// GET /metrics on a plain `klein serve` app (no queue) over real HTTP: who may read it, and that a run moves the
// figures it should — request counts per route pattern (never a raw URL), engine outcomes, busy time, stage and
// step seconds, runs by status — beside Node's default metrics (event-loop lag).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { type Harness, pollUntil, realPipeline, startService, terminal } from './helpers.ts';

const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';

interface Sample { name: string; labels: Record<string, string>; value: number }

/** The samples of Prometheus' text format (enough of it for prom-client's output). */
function parse(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

/** Sum of the samples of `name` whose labels include `where`. */
function total(samples: Sample[], name: string, where: Record<string, string> = {}): number {
  return samples.filter((s) => s.name === name && Object.entries(where).every(([k, v]) => s.labels[k] === v)).reduce((a, s) => a + s.value, 0);
}

describe('/metrics', () => {
  let engine: ImagePipeline;
  let h: Harness;
  let admin: string;
  const scrape = async () => {
    const res = await fetch(`${h.url}/metrics`, { headers: { authorization: `Bearer ${admin}` } });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /^text\/plain/);
    return parse(await res.text());
  };

  before(async () => {
    engine = await realPipeline();
    h = await startService({ pipeline: engine });
    admin = h.newKey({ admin: true });
  });
  after(async () => {
    await h?.svc.close();
    await engine?.close();
  });

  test('needs an admin key: 401 without a key, 403 with a plain one', async () => {
    const none = await fetch(`${h.url}/metrics`);
    assert.equal(none.status, 401);
    assert.equal(((await none.json()) as any).code, 'UNAUTHENTICATED');
    const plain = await fetch(`${h.url}/metrics`, { headers: { authorization: `Bearer ${h.key}` } });
    assert.equal(plain.status, 403);
    assert.equal(((await plain.json()) as any).code, 'FORBIDDEN');
    const s = await scrape();
    // Node's default metrics: event-loop lag and CPU time are there and measured
    assert.ok(s.some((x) => x.name === 'nodejs_eventloop_lag_seconds' && x.value >= 0));
    assert.ok(total(s, 'process_cpu_user_seconds_total') > 0);
  });

  test('a run moves the request, engine and run figures', async () => {
    const before = await scrape();
    const created = await h.api('POST', T2I, { input: { prompt: 'counted', image_size: { width: 64, height: 64 }, num_inference_steps: 4 } });
    assert.equal(created.status, 201);
    const run = await pollUntil(h, created.json.id, terminal, 120_000);
    assert.equal(run.status_code, 'succeeded');
    const missing = await h.api('GET', '/v1/runs/run_does_not_exist');
    assert.equal(missing.status, 404);
    const text = await (await fetch(`${h.url}/metrics`, { headers: { authorization: `Bearer ${admin}` } })).text();
    const after = parse(text);
    const grew = (name: string, where: Record<string, string> = {}) => total(after, name, where) - total(before, name, where);

    // requests: labelled by route pattern and status; no run id (a raw URL) ever becomes a label
    assert.ok(!text.includes(created.json.id), 'a raw URL leaked into a label');
    const createRoute = after.find((x) => x.name === 'klein_http_request_duration_seconds_count' && x.labels.method === 'POST' && x.labels.status === '201');
    assert.ok(createRoute, 'the creation is counted');
    assert.match(createRoute.labels.route, /^\/v1\/models\/:.*\/runs$/);
    assert.equal(grew('klein_http_request_duration_seconds_count', { method: 'POST', route: createRoute.labels.route, status: '201' }), 1);
    assert.ok(grew('klein_http_request_duration_seconds_count', { method: 'GET', route: '/v1/runs/:id', status: '200' }) >= 1);
    assert.equal(grew('klein_http_request_duration_seconds_count', { method: 'GET', route: '/v1/runs/:id', status: '404' }), 1);
    assert.ok(grew('klein_http_request_duration_seconds_sum') > 0);

    // the engine: one more successful generation, its stages and steps timed, idle again, busy time counted
    assert.equal(grew('klein_engine_generation_seconds_count', { outcome: 'succeeded' }), 1);
    assert.ok(grew('klein_engine_generation_seconds_sum', { outcome: 'succeeded' }) > 0);
    for (const stage of ['text', 'denoise', 'decode', 'output']) assert.equal(grew('klein_engine_stage_seconds_count', { stage }), 1, stage);
    assert.ok(grew('klein_engine_stage_seconds_sum', { stage: 'denoise' }) > 0);
    assert.equal(grew('klein_step_seconds_count'), 3, 'steps 2–4 of 4 are timed from the previous step');
    assert.equal(total(after, 'klein_engine_busy'), 0);
    assert.ok(grew('klein_engine_busy_seconds_total') > 0);

    // runs by status, from the database
    assert.equal(grew('klein_runs', { status: 'succeeded' }), 1);
    assert.equal(total(after, 'klein_runs', { status: 'running' }), 0);
  });
});

test('/metrics without a key when config.json says metrics.public', async () => {
  const engine = await realPipeline();
  const h = await startService({ pipeline: engine, config: { metrics: { public: true } } });
  try {
    const res = await fetch(`${h.url}/metrics`);
    assert.equal(res.status, 200);
    assert.match(await res.text(), /^# HELP klein_engine_busy /m);
  } finally {
    await h.svc.close();
    await engine.close();
  }
});
