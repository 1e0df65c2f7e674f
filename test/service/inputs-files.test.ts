import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import dns from 'node:dns/promises';
import http from 'node:http';
import os from 'node:os';
import type { AddressInfo } from 'node:net';
import sharp from 'sharp';
import { addressAllowed, FetchError, guardedRequest } from '../../src/service/net.ts';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { type Harness, pollUntil, realPipeline, startService, terminal } from './helpers.ts';

const EDIT = '/v1/models/black-forest-labs/flux-2-klein-4b/edit/runs';

test('SSRF policy: private, loopback, link-local and mapped addresses are internal unless allowed', () => {
  const none = { allowHttp: false, allowPrivate: [] };
  for (const ip of ['127.0.0.1', '10.1.2.3', '172.16.0.1', '192.168.1.1', '169.254.169.254', '100.64.0.1', '0.0.0.0', '::1', 'fe80::1', 'fd00::1', '::ffff:127.0.0.1', '::ffff:10.0.0.1']) {
    assert.equal(addressAllowed(ip, none), false, ip);
  }
  for (const ip of ['8.8.8.8', '1.1.1.1', '2606:4700:4700::1111', '::ffff:8.8.8.8']) assert.equal(addressAllowed(ip, none), true, ip);
  assert.equal(addressAllowed('127.0.0.1', { allowHttp: true, allowPrivate: ['127.0.0.1'] }), true);
  assert.equal(addressAllowed('10.9.9.9', { allowHttp: true, allowPrivate: ['10.0.0.0/8'] }), true);
  assert.equal(addressAllowed('127.0.0.2', { allowHttp: true, allowPrivate: ['127.0.0.1'] }), false);
});

test('a host name that resolves to an internal address is refused at connect time', async (t) => {
  const name = os.hostname();
  const addrs = await dns.lookup(name, { all: true }).catch(() => []);
  if (!addrs.length || addrs.every((a) => addressAllowed(a.address, { allowHttp: true, allowPrivate: [] }))) return t.skip(`${name} does not resolve to an internal address here`);
  await assert.rejects(guardedRequest(`http://${name}:9/x`, { timeoutMs: 2000, maxBytes: 100, maxRedirects: 0, policy: { allowHttp: true, allowPrivate: [] } }), (e: unknown) => e instanceof FetchError && e.code === 'BLOCKED');
});

describe('edit inputs and output files', () => {
  let h: Harness;
  let strict: Harness;
  let server: http.Server;
  let base: string;
  let png: Buffer;
  let engine: ImagePipeline;
  before(async () => {
    engine = await realPipeline();
    png = await sharp({ create: { width: 96, height: 80, channels: 3, background: 'green' } }).png().toBuffer();
    server = http.createServer((req, res) => {
      if (req.url === '/ref.png') res.writeHead(200, { 'content-type': 'image/png' }).end(png);
      else if (req.url === '/big') res.writeHead(200).end(Buffer.alloc(200_000));
      else if (req.url === '/slow') setTimeout(() => res.writeHead(200).end(png), 3000);
      else if (req.url === '/redirect') res.writeHead(302, { location: '/ref.png' }).end();
      else if (req.url === '/text') res.writeHead(200).end('hello');
      else res.writeHead(404).end();
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    h = await startService({ pipeline: engine, config: { inputs: { maxBytes: 100_000, timeoutMs: 500 } } });
    // default policy: https only, nothing internal
    strict = await startService({ pipeline: engine, config: { inputs: { allowHttp: false, allowPrivate: [] } } });
  });
  after(async () => {
    await h.svc.close();
    await strict.svc.close();
    await engine.close();
    server.close();
  });

  test('an edit fetches its reference from an allowed URL (redirects followed) and defaults to its size (rounded to 16)', async () => {
    const c = await h.api('POST', EDIT, { input: { prompt: 'edit', image_urls: [`${base}/redirect`] } });
    assert.equal(c.status, 201);
    const run = await pollUntil(h, c.json.id, terminal, 120_000);
    assert.equal(run.status_code, 'succeeded', JSON.stringify(run));
    assert.deepEqual([run.output.images[0].width, run.output.images[0].height], [96, 80]);
  });

  test('fetch failures fail the run at preprocess with clear codes: size cap, time cap, not an image, HTTP error', async () => {
    for (const [p, code, msg] of [['/big', 'INPUT_FETCH_FAILED', /limit/], ['/slow', 'INPUT_FETCH_FAILED', /timed out/], ['/text', 'INPUT_VALIDATION_FAILED', /not a decodable image/], ['/missing', 'INPUT_FETCH_FAILED', /HTTP 404/]] as const) {
      const c = await h.api('POST', EDIT, { input: { prompt: 'x', image_urls: [base + p], image_size: 'square' } });
      const run = await pollUntil(h, c.json.id, terminal);
      assert.equal(run.status_code, 'failed', p);
      assert.equal(run.failure_code, code, p);
      assert.equal(run.failure_stage, 'preprocess', p);
      assert.match(run.failure_message, msg, p);
      assert.equal(run.cost, '0.000');
    }
  });

  test('the default policy refuses http, loopback and private URLs at creation (422), and bad data URIs', async () => {
    const cases = [[`${base}/ref.png`, 'invalid_url'], ['https://127.0.0.1/x.png', 'ssrf_blocked'], ['https://169.254.169.254/latest', 'ssrf_blocked'], ['https://localhost/x.png', 'ssrf_blocked'], ['https://[::1]/x.png', 'ssrf_blocked'], ['data:text/plain;base64,aGk=', 'invalid_image']];
    for (const [u, type] of cases) {
      const r = await strict.api('POST', EDIT, { input: { prompt: 'x', image_urls: [u] } });
      assert.equal(r.status, 422, u);
      assert.deepEqual(r.json.errors[0].loc, ['body', 'input', 'image_urls', 0], u);
      assert.equal(r.json.errors[0].type, type, u);
    }
    const five = await strict.api('POST', EDIT, { input: { prompt: 'x', image_urls: Array(5).fill('https://example.com/a.png') } });
    assert.equal(five.status, 422);
  });

  test('file URLs are signed and expire; retention deletes files and the run says so', async () => {
    const c = await h.api('POST', '/v1/models/flux-2-klein-4b/runs', { input: { prompt: 'keep', image_size: { width: 64, height: 64 } } });
    const run = await pollUntil(h, c.json.id, terminal, 120_000);
    const url = new URL(run.output.images[0].url);
    assert.equal((await fetch(url)).status, 200);
    const tampered = new URL(url);
    tampered.searchParams.set('signature', '0'.repeat(64));
    const t = await fetch(tampered);
    assert.equal(t.status, 403);
    assert.equal(((await t.json()) as any).code, 'INVALID_SIGNATURE');
    const longer = new URL(url);
    longer.searchParams.set('expires', String(Number(url.searchParams.get('expires')) + 1));
    assert.equal((await fetch(longer)).status, 403, 'the expiry is covered by the signature');
    const file = url.pathname.split('/').pop()!;
    const expired = new URL(h.svc.files.url(h.url, run.id, file, Date.now() - 2 * h.svc.files.urlTtlS * 1000));
    const e = await fetch(expired);
    assert.equal(e.status, 410);
    assert.equal(((await e.json()) as any).code, 'URL_EXPIRED');

    const cleaned = h.svc.files.cleanup(h.svc.store, Date.now() + (h.svc.files.retentionS + 1) * 1000);
    assert.ok(cleaned.includes(run.id));
    assert.equal((await fetch(url)).status, 404);
    const after = await h.api('GET', `/v1/runs/${run.id}`);
    assert.equal(after.json.output.expired, true);
    assert.equal(after.json.output.images[0].url, null);
  });
});
