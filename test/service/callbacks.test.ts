import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { type Harness, pollUntil, realPipeline, startService, terminal } from './helpers.ts';

const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';

/** A receiver on 127.0.0.1 that records raw bodies and answers from a script of status codes. */
async function receiver(script: number[]) {
  const hits: { body: string; headers: http.IncomingHttpHeaders; status: number }[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const status = script[hits.length] ?? 200;
      hits.push({ body: Buffer.concat(chunks).toString('utf8'), headers: req.headers, status });
      res.writeHead(status, { 'content-type': 'text/plain' }).end(status === 200 ? 'ok' : 'try later');
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { hits, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/hook`, close: () => new Promise((r) => server.close(r)) };
}

const verify = (secret: string, body: string, sig: string | string[] | undefined) =>
  typeof sig === 'string' && crypto.timingSafeEqual(Buffer.from(crypto.createHmac('sha256', secret).update(body).digest('hex')), Buffer.from(sig));

async function until<T>(f: () => T | undefined, timeoutMs = 10_000): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = f();
    if (v) return v;
    if (Date.now() - t0 > timeoutMs) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('callbacks', () => {
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

  test('signed callback; a receiver failing twice gets retries with backoff; history; redelivery', async () => {
    const sec = await h.api('POST', '/v1/callback-secrets', { label: 'main' });
    assert.equal(sec.status, 201);
    const secret: string = sec.json.plain_secret;
    assert.match(secret, /^whsec_/);
    assert.equal(sec.json.is_current, true);
    const listed = await h.api('GET', '/v1/callback-secrets');
    assert.ok(!JSON.stringify(listed.json).includes(secret), 'the secret is shown once only');

    const rx = await receiver([500, 503, 200]);
    const c = await h.api('POST', T2I, { input: { prompt: 'hook', image_size: { width: 64, height: 64 } }, callback_url: rx.url, metadata: { order: 42 } });
    await pollUntil(h, c.json.id, terminal, 120_000);
    await until(() => rx.hits.length >= 3 || undefined);
    for (const hit of rx.hits) {
      assert.ok(verify(secret, hit.body, hit.headers['runflow-signature']), 'signature verifies over the raw body');
      assert.equal(hit.body, rx.hits[0].body, 'the frozen payload is resent byte for byte');
    }
    const payload = JSON.parse(rx.hits[2].body);
    assert.equal(payload.event, 'run.completed');
    assert.equal(payload.run_id, c.json.id);
    assert.equal(payload.status, 'succeeded');
    assert.deepEqual(payload.metadata, { order: 42 });
    assert.match(payload.completed_at, /\+00:00$/);
    assert.equal(payload.output.images[0].width, 64);
    // a tampered body does not verify
    assert.ok(!verify(secret, rx.hits[0].body.replace('42', '43'), rx.hits[0].headers['runflow-signature']));

    const history = await h.api('GET', `/v1/runs/${c.json.id}/callback`);
    assert.equal(history.status, 200);
    const d = history.json.deliveries[0];
    assert.equal(d.status, 'succeeded');
    assert.equal(d.attempt_count, 3);
    assert.deepEqual(d.attempts.map((a: any) => a.status_code), [500, 503, 200]);
    assert.equal(d.attempts[2].response_body, 'ok');

    const re = await h.api('POST', `/v1/runs/${c.json.id}/callback-redeliveries`);
    assert.equal(re.status, 201);
    await until(() => rx.hits.length >= 4 || undefined);
    assert.ok(verify(secret, rx.hits[3].body, rx.hits[3].headers['runflow-signature']));
    assert.equal(JSON.parse(rx.hits[3].body).run_id, c.json.id);
    const after2 = await h.api('GET', `/v1/runs/${c.json.id}/callback`);
    assert.equal(after2.json.deliveries.length, 2);
    await rx.close();
  });

  test('rotation: the new secret signs Runflow-Signature, the previous one Runflow-Signature-Previous', async () => {
    const key = h.newKey();
    const call = async (m: string, p: string, body?: unknown) => {
      const r = await fetch(h.url + p, { method: m, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: body ? JSON.stringify(body) : undefined });
      return (await r.json()) as any;
    };
    const old = await call('POST', '/v1/callback-secrets', { label: 'old' });
    const neu = await call('POST', '/v1/callback-secrets', { label: 'new' });
    const rx = await receiver([]);
    const run = await call('POST', T2I, { input: { prompt: 'rotate', image_size: { width: 64, height: 64 } }, callback_url: rx.url });
    await until(() => rx.hits[0], 60_000);
    const hit = rx.hits[0];
    assert.ok(verify(neu.plain_secret, hit.body, hit.headers['runflow-signature']));
    assert.ok(verify(old.plain_secret, hit.body, hit.headers['runflow-signature-previous']));
    assert.equal(JSON.parse(hit.body).run_id, run.id);
    // ending the rotation: revoke the old one
    await call('DELETE', `/v1/callback-secrets/${old.id}`);
    const list = await call('GET', '/v1/callback-secrets');
    assert.deepEqual(list.data.map((s: any) => [s.label, s.is_current, s.revoked_at !== null]), [['new', true, false], ['old', false, true]]);
    await rx.close();
  });

  test('a callback to a private address is refused at creation (SSRF)', async () => {
    const r = await h.api('POST', T2I, { input: { prompt: 'x' }, callback_url: 'http://10.0.0.5/hook' });
    assert.equal(r.status, 422);
    assert.deepEqual(r.json.errors[0].loc, ['body', 'callback_url']);
    assert.equal(r.json.errors[0].type, 'ssrf_blocked');
  });
});
