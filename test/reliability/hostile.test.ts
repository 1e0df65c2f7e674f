// Hostile input: every request here must get a clear 4xx with the error envelope ({code, message, errors}), store
// nothing, and leave the server healthy. URL inputs are fetched when the run starts (the API answers at once), so
// their SSRF and size/time guards are proven on the run: failed at preprocess with a code, no output, no charge.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import zlib from 'node:zlib';
import fc from 'fast-check';
import sharp from 'sharp';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { type Harness, pollUntil, realPipeline, startService, terminal } from '../service/helpers.ts';

const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';
const EDIT = '/v1/models/black-forest-labs/flux-2-klein-4b/edit/runs';

/** A PNG whose header declares w×h but whose data is one tiny compressed zero-filled chunk: a decompression bomb. */
function bombPng(w: number, h: number): Buffer {
  const crcTable = Array.from({ length: 256 }, (_, n) => { let c = n; for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1; return c >>> 0; });
  const crc = (b: Buffer) => { let c = 0xffffffff; for (const x of b) c = crcTable[(c ^ x) & 0xff] ^ (c >>> 8); return (c ^ 0xffffffff) >>> 0; };
  const chunk = (type: string, data: Buffer) => {
    const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type), data]);
    const c = Buffer.alloc(4); c.writeUInt32BE(crc(td));
    return Buffer.concat([len, td, c]);
  };
  const ihdr = Buffer.alloc(13); ihdr.writeUInt32BE(w, 0); ihdr.writeUInt32BE(h, 4); ihdr[8] = 8; ihdr[9] = 0;
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', ihdr), chunk('IDAT', zlib.deflateSync(Buffer.alloc(64 * 1024))), chunk('IEND', Buffer.alloc(0))]);
}

const dataUri = (mime: string, b: Buffer) => `data:${mime};base64,${b.toString('base64')}`;

let engine: ImagePipeline;
let h: Harness;
let small: Harness; // the default network policy (https only, nothing internal) and a small body cap (no 100 MB sends)
let server: http.Server;
let base: string;
let png: Buffer;
let jpeg: Buffer;
const runCount = (x: Harness) => (x.svc.store.db.prepare('SELECT COUNT(*) AS n FROM runs').get() as { n: number }).n;
const bad = (r: { status: number; json: any }, status: number, code?: string, label = '') => {
  assert.equal(r.status, status, `${label}: ${JSON.stringify(r.json).slice(0, 300)}`);
  assert.equal(typeof r.json.code, 'string', label);
  assert.equal(typeof r.json.message, 'string', label);
  assert.ok(r.json.message.length > 0, label);
  assert.ok('errors' in r.json, label);
  if (code) assert.equal(r.json.code, code, label);
};

before(async () => {
  engine = await realPipeline();
  png = await sharp({ create: { width: 64, height: 64, channels: 3, background: 'red' } }).png().toBuffer();
  jpeg = await sharp({ create: { width: 64, height: 64, channels: 3, background: 'blue' } }).jpeg().toBuffer();
  server = http.createServer((req, res) => {
    if (req.url === '/to-metadata') res.writeHead(302, { location: 'http://169.254.169.254/latest/meta-data/' }).end();
    else if (req.url === '/to-private') res.writeHead(301, { location: 'http://10.0.0.1/x.png' }).end();
    else if (req.url === '/endless') { res.writeHead(200, { 'content-type': 'image/png' }); const t = setInterval(() => res.write(Buffer.alloc(4096)), 5); res.on('close', () => clearInterval(t)); }
    else if (req.url === '/slow') { res.writeHead(200, { 'content-type': 'image/png' }); res.write(png.subarray(0, 10)); } // never ends
    else if (req.url === '/bomb.png') res.writeHead(200, { 'content-type': 'image/png' }).end(bombPng(20_000, 20_000));
    else res.writeHead(404).end();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  h = await startService({ pipeline: engine, config: { inputs: { maxBytes: 200_000, timeoutMs: 600 } } });
  small = await startService({ pipeline: engine, config: { maxBodyBytes: 64 * 1024, inputs: { allowHttp: false, allowPrivate: [] } } });
});
after(async () => {
  await h.svc.close();
  await small.svc.close();
  await engine.close();
  server.closeAllConnections();
  server.close();
});

describe('refused at the door: 4xx envelope, nothing stored, server healthy', () => {
  const cases: [string, string, unknown, number, string?][] = [];
  const t2i = (input: unknown) => ({ input });
  const ok = { prompt: 'a cat', image_size: 'square' };
  cases.push(['malformed JSON', T2I, '{"input": {"prompt": "x"', 400, 'BAD_REQUEST']);
  cases.push(['JSON that is not an object', T2I, '[1,2,3]', 422, 'VALIDATION_ERROR']);
  cases.push(['JSON null', T2I, 'null', 422, 'VALIDATION_ERROR']);
  cases.push(['empty body', T2I, '', 400, 'BAD_REQUEST']);
  cases.push(['unknown envelope field', T2I, { input: ok, evil: 1 }, 422, 'VALIDATION_ERROR']);
  cases.push(['prompt a number', T2I, t2i({ prompt: 42 }), 422, 'VALIDATION_ERROR']);
  cases.push(['input a string', T2I, { input: 'draw' }, 422, 'VALIDATION_ERROR']);
  cases.push(['missing prompt', T2I, t2i({ image_size: 'square' }), 422, 'VALIDATION_ERROR']);
  cases.push(['empty prompt', T2I, t2i({ prompt: '' }), 422, 'VALIDATION_ERROR']);
  cases.push(['1 MB prompt', T2I, t2i({ prompt: 'a'.repeat(1024 * 1024) }), 422, 'VALIDATION_ERROR']);
  cases.push(['unknown model', '/v1/models/evil/model/runs', t2i(ok), 404, 'MODEL_NOT_FOUND']);
  cases.push(['path traversal as model', '/v1/models/..%2F..%2Fetc%2Fpasswd/runs', t2i(ok), 404]);
  for (const [w, hgt, why] of [[100, 64, 'not a multiple of 16'], [48, 64, 'below 64'], [4096, 2048, 'above 4 MP'], [-64, 64, 'negative'],
    [1e12, 1e12, 'huge'], [64.5, 64, 'fractional'], [Number.MAX_SAFE_INTEGER, 16, 'max safe int']] as const) {
    cases.push([`size ${w}×${hgt} (${why})`, T2I, t2i({ prompt: 'x', image_size: { width: w, height: hgt } }), 422, 'VALIDATION_ERROR']);
  }
  cases.push(['size as an unknown preset', T2I, t2i({ prompt: 'x', image_size: 'gigantic' }), 422, 'VALIDATION_ERROR']);
  cases.push(['size as a string number', T2I, t2i({ prompt: 'x', image_size: { width: '512', height: '512' } }), 422, 'VALIDATION_ERROR']);
  cases.push(['num_images 0', T2I, t2i({ ...ok, num_images: 0 }), 422, 'VALIDATION_ERROR']);
  cases.push(['num_images 5', T2I, t2i({ ...ok, num_images: 5 }), 422, 'VALIDATION_ERROR']);
  cases.push(['steps 10^9', T2I, t2i({ ...ok, num_inference_steps: 1e9 }), 422, 'VALIDATION_ERROR']);
  cases.push(['seed negative', T2I, t2i({ ...ok, seed: -1 }), 422, 'VALIDATION_ERROR']);
  cases.push(['background not one of auto/opaque/transparent', T2I, t2i({ ...ok, background: 'glass' }), 422, 'VALIDATION_ERROR']);
  cases.push(['transparent background as jpeg', T2I, t2i({ ...ok, background: 'transparent', output_format: 'jpeg' }), 422, 'UNSUPPORTED_COMBINATION']);
  cases.push(['image_urls on text-to-image', T2I, t2i({ ...ok, image_urls: ['https://example.com/a.png'] }), 422, 'VALIDATION_ERROR']);
  cases.push(['metadata over 16 KiB', T2I, { input: ok, metadata: { x: 'y'.repeat(20_000) } }, 422, 'VALIDATION_ERROR']);
  cases.push(['callback to loopback', T2I, { input: ok, callback_url: 'https://127.0.0.1/hook' }, 422, 'VALIDATION_ERROR']);
  cases.push(['callback to metadata address', T2I, { input: ok, callback_url: 'https://169.254.169.254/hook' }, 422, 'VALIDATION_ERROR']);
  cases.push(['callback to private 10/8', T2I, { input: ok, callback_url: 'https://10.1.2.3/hook' }, 422, 'VALIDATION_ERROR']);
  cases.push(['callback to IPv6 loopback', T2I, { input: ok, callback_url: 'https://[::1]/hook' }, 422, 'VALIDATION_ERROR']);
  cases.push(['callback to localhost name', T2I, { input: ok, callback_url: 'https://localhost/hook' }, 422, 'VALIDATION_ERROR']);
  cases.push(['callback with file scheme', T2I, { input: ok, callback_url: 'file:///etc/passwd' }, 422, 'VALIDATION_ERROR']);
  cases.push(['callback not a URL', T2I, { input: ok, callback_url: 'not a url' }, 422, 'VALIDATION_ERROR']);
  const edit = (urls: string[]) => ({ input: { prompt: 'x', image_urls: urls, image_size: 'square' } });
  cases.push(['5 reference images', EDIT, edit(Array(5).fill('https://example.com/a.png')), 422, 'VALIDATION_ERROR']);
  cases.push(['no reference images', EDIT, edit([]), 422, 'VALIDATION_ERROR']);
  cases.push(['invalid base64 data URI', EDIT, edit(['data:image/png;base64,!!!not base64!!!']), 422, 'VALIDATION_ERROR']);
  cases.push(['data URI without a comma', EDIT, edit(['data:image/png;base64']), 422, 'VALIDATION_ERROR']);
  cases.push(['data URI of text', EDIT, edit(['data:text/plain;base64,aGVsbG8=']), 422, 'VALIDATION_ERROR']);
  cases.push(['data URI of an SVG', EDIT, edit([dataUri('image/svg+xml', Buffer.from('<svg xmlns="http://www.w3.org/2000/svg"/>'))]), 422, 'VALIDATION_ERROR']);
  cases.push(['non-image bytes labelled PNG', EDIT, edit([dataUri('image/png', Buffer.from('MZ\x90\x00 this is an executable, not a picture'))]), 422, 'VALIDATION_ERROR']);
  cases.push(['image URL to loopback', EDIT, edit(['https://127.0.0.1/a.png']), 422, 'VALIDATION_ERROR']);
  cases.push(['image URL to metadata address', EDIT, edit(['https://169.254.169.254/latest/meta-data/']), 422, 'VALIDATION_ERROR']);
  cases.push(['image URL to private 192.168/16', EDIT, edit(['https://192.168.0.1/a.png']), 422, 'VALIDATION_ERROR']);
  cases.push(['image URL to IPv4-mapped loopback', EDIT, edit(['https://[::ffff:127.0.0.1]/a.png']), 422, 'VALIDATION_ERROR']);
  cases.push(['image URL to link-local IPv6', EDIT, edit(['https://[fe80::1]/a.png']), 422, 'VALIDATION_ERROR']);
  cases.push(['image URL with credentials', EDIT, edit(['https://user:pw@example.com/a.png']), 422, 'VALIDATION_ERROR']);
  cases.push(['image URL with ftp scheme', EDIT, edit(['ftp://example.com/a.png']), 422, 'VALIDATION_ERROR']);

  for (const [label, p, body, status, code] of cases) {
    test(label, async () => {
      // URLs are judged under the default policy; the main service allows loopback for the tests' own servers
      const target = label.startsWith('image URL') || label.startsWith('callback') ? small : h;
      const before = runCount(target);
      const r = await target.api('POST', p, body);
      bad(r, status, code, label);
      assert.equal(runCount(target), before, `${label}: a run was stored`);
    });
  }

  test('truncated PNG and JPEG, and a decompression bomb (tiny file, 20000×20000 declared) are refused at creation', async () => {
    const bomb = bombPng(20_000, 20_000);
    assert.ok(bomb.length < 2000, `bomb is ${bomb.length} bytes`);
    for (const [label, b, mime] of [['truncated PNG', png.subarray(0, Math.floor(png.length / 2)), 'image/png'], ['truncated JPEG', jpeg.subarray(0, Math.floor(jpeg.length / 2)), 'image/jpeg'], ['bomb', bomb, 'image/png']] as const) {
      const before = runCount(h);
      const r = await h.api('POST', EDIT, { input: { prompt: 'x', image_urls: [dataUri(mime, b)], image_size: 'square' } });
      bad(r, 422, 'VALIDATION_ERROR', label);
      assert.match(r.json.errors[0].message, label === 'bomb' ? /pixels/ : /truncated|damaged|decodable/, label);
      assert.deepEqual(r.json.errors[0].loc, ['body', 'input', 'image_urls', 0]);
      assert.equal(runCount(h), before, label);
    }
  });

  test('a body over the size limit is refused with 413 while it streams in', async () => {
    const r = await small.api('POST', T2I, { input: { prompt: 'x', image_size: 'square' }, metadata: { pad: 'p'.repeat(100_000) } });
    bad(r, 413, 'PAYLOAD_TOO_LARGE');
    assert.equal(runCount(small), 0);
  });

  test('malformed, unknown and revoked API keys are 401', async () => {
    const body = { input: { prompt: 'x', image_size: 'square' } };
    for (const auth of [undefined, '', 'Bearer', 'Bearer ', 'Basic dXNlcjpwdw==', 'Bearer kl_live_forged000000000000000000000000', 'Bearer a b', `Bearer ${'k'.repeat(10_000)}`, 'Bearer \u0000']) {
      const r = await h.api('POST', T2I, body, { authorization: auth as string }).catch((e) => ({ status: 0, json: { code: String(e), message: '', errors: null } }));
      if (r.status === 0) continue; // fetch itself refuses a header with a NUL byte: nothing reached the server
      bad(r, 401, 'UNAUTHENTICATED', String(auth).slice(0, 30));
    }
    const key = h.newKey();
    assert.equal((await h.api('GET', '/v1/runs', undefined, { authorization: `Bearer ${key}` })).status, 200);
    h.svc.store.revokeKey(h.svc.store.keyByHash((await import('../../src/service/time.ts')).sha256Hex(key))!.id);
    bad(await h.api('POST', T2I, body, { authorization: `Bearer ${key}` }), 401, 'UNAUTHENTICATED', 'revoked');
    bad(await h.api('GET', '/v1/runs', undefined, { authorization: `Bearer ${key}` }), 401, 'UNAUTHENTICATED', 'revoked');
  });
});

describe('file URLs', () => {
  let runId: string;
  let url: URL;
  before(async () => {
    const c = await h.api('POST', T2I, { input: { prompt: 'file', image_size: { width: 64, height: 64 } } });
    const run = await pollUntil(h, c.json.id, terminal, 120_000);
    assert.equal(run.status_code, 'succeeded');
    runId = run.id;
    url = new URL(run.output.images[0].url);
  });
  const get = async (p: string) => {
    const res = await fetch(h.url + p);
    const text = await res.text();
    let json: any = text; try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, json, type: res.headers.get('content-type') };
  };

  test('the signed URL serves the image; forged, tampered and expired signatures do not', async () => {
    const okRes = await get(url.pathname + url.search);
    assert.equal(okRes.status, 200);
    assert.equal(okRes.type, 'image/png');
    const sig = url.searchParams.get('signature')!;
    const exp = url.searchParams.get('expires')!;
    const forged = sig.replace(/^./, (ch) => (ch === '0' ? '1' : '0'));
    for (const [label, q] of [['forged', `?expires=${exp}&signature=${forged}`], ['no signature', `?expires=${exp}`], ['short signature', `?expires=${exp}&signature=abcd`],
      ['non-hex signature', `?expires=${exp}&signature=${'z'.repeat(64)}`], ['later expiry, old signature', `?expires=${Number(exp) + 3600}&signature=${sig}`],
      ['expiry not a number', `?expires=1e99&signature=${sig}`]] as const) {
      const r = await get(url.pathname + q);
      assert.ok(r.status >= 400 && r.status < 500, `${label}: ${r.status}`);
      assert.equal(typeof r.json.code, 'string', label);
    }
    // a correctly signed URL whose time has passed: signed here with the server's own signer, expiry in the past
    const expired = new URL(h.svc.files.url(h.url, runId, '0.png', Date.now() - 2 * h.svc.files.urlTtlS * 1000));
    const r = await get(expired.pathname + expired.search);
    assert.equal(r.status, 410);
    assert.equal(r.json.code, 'URL_EXPIRED');
  });

  test('path traversal in run ids and file names never leaves the outputs folder', async () => {
    for (const p of [`/v1/files/..%2F..%2Fklein.db/x`, `/v1/files/${runId}/..%2F..%2Fklein.db`, `/v1/files/../klein.db`, `/v1/files/${runId}/%2e%2e%2fklein.db`,
      `/v1/files/..%2f/..%2f`, `/v1/files/${runId}/..`, `/v1/files/%00/0.png`]) {
      // even a valid signature over the traversal name (as if the secret leaked) must not reach outside
      const m = p.match(/^\/v1\/files\/([^/]+)\/([^/?]+)$/);
      const signed = m ? new URL(h.svc.files.url(h.url, decodeURIComponent(m[1]), decodeURIComponent(m[2]))).search : '';
      for (const q of ['', signed]) {
        const r = await get(p + q);
        assert.ok(r.status >= 400 && r.status < 500, `${p}${q}: ${r.status}`);
        assert.notEqual(r.type, 'application/octet-stream');
        assert.ok(!(typeof r.json === 'string' && r.json.includes('SQLite format')), p);
      }
    }
  });
});

describe('URL inputs: guarded when fetched (the run fails at preprocess with a code, nothing is charged)', () => {
  for (const [label, p, code, msg] of [
    ['redirect to the metadata address', '/to-metadata', 'INPUT_URL_BLOCKED', /169\.254\.169\.254/],
    ['redirect to a private address', '/to-private', 'INPUT_URL_BLOCKED', /10\.0\.0\.1/],
    ['endless response', '/endless', 'INPUT_FETCH_FAILED', /limit/],
    ['slow response that never ends', '/slow', 'INPUT_FETCH_FAILED', /timed out/],
    ['decompression bomb by URL', '/bomb.png', 'INPUT_VALIDATION_FAILED', /pixels/],
  ] as const) {
    test(label, async () => {
      const c = await h.api('POST', EDIT, { input: { prompt: 'x', image_urls: [base + p], image_size: 'square' } });
      assert.equal(c.status, 201);
      const run = await pollUntil(h, c.json.id, terminal, 30_000);
      assert.equal(run.status_code, 'failed');
      assert.equal(run.failure_code, code);
      assert.equal(run.failure_stage, 'preprocess');
      assert.match(run.failure_message, msg);
      assert.equal(run.output, null);
      assert.equal(run.cost, '0.000');
    });
  }
});

test('fuzz: arbitrary JSON bodies never crash the server (no 5xx), and every refusal has the envelope', async () => {
  const before = runCount(h);
  let created = 0;
  // a key of its own with room for every case: the fuzz is about parsing, not the creation rate limit
  const auth = { authorization: `Bearer ${h.newKey({ rateLimitPerMin: 100_000 })}` };
  // inputs biased towards the schema's own field names, so the fuzz reaches past the first type check
  const field = fc.constantFrom('prompt', 'image_size', 'num_images', 'num_inference_steps', 'guidance_scale', 'seed', 'output_format', 'background', 'sync_mode', 'image_urls', 'width', 'height', '__proto__', 'constructor');
  const value = fc.letrec((tie) => ({
    v: fc.oneof({ depthSize: 'small' }, fc.string(), fc.integer(), fc.double(), fc.boolean(), fc.constant(null), fc.constantFrom('square', 'png', 'jpeg', 'transparent', 'data:image/png;base64,AAAA', 'https://127.0.0.1/', '__proto__'),
      fc.array(tie('v'), { maxLength: 5 }), fc.dictionary(fc.oneof(field, fc.string()), tie('v'), { maxKeys: 5 })),
  })).v;
  const body = fc.oneof(
    fc.record({ input: fc.dictionary(field, value, { maxKeys: 6 }) }, { requiredKeys: [] }),
    fc.record({ input: value, callback_url: value, metadata: value, client_ref: value }, { requiredKeys: [] }),
    fc.string({ maxLength: 200 }),
  );
  await fc.assert(
    fc.asyncProperty(body, async (b) => {
      // sync-less, cheap runs only: a body that happens to be valid must not make the fuzz wait on generation
      const payload = typeof b === 'string' ? b : JSON.stringify(b);
      const r = await h.api('POST', T2I, payload, auth);
      assert.ok(r.status < 500, `5xx for ${payload.slice(0, 200)}: ${JSON.stringify(r.json)}`);
      if (r.status === 201) { created++; await h.api('POST', `/v1/runs/${r.json.id}/cancellation`, undefined, auth); return; }
      assert.ok(r.status >= 400, String(r.status));
      assert.equal(typeof r.json.code, 'string');
      assert.equal(typeof r.json.message, 'string');
    }),
    { numRuns: 300, seed: 20261126 },
  );
  assert.equal(runCount(h), before + created);
  const health = await fetch(h.url + '/v1/health');
  assert.equal(health.status, 200);
});

test('after all of it the server is healthy and still makes an image', async () => {
  const auth = { authorization: `Bearer ${h.newKey()}` }; // the main key spent its creation budget above
  const c = await h.api('POST', T2I, { input: { prompt: 'still alive', image_size: { width: 64, height: 64 } } }, auth);
  assert.equal(c.status, 201);
  let run = c.json;
  for (const t0 = Date.now(); !terminal(run) && Date.now() - t0 < 120_000; await new Promise((r) => setTimeout(r, 50))) {
    run = (await h.api('GET', `/v1/runs/${c.json.id}`, undefined, auth)).json;
  }
  assert.equal(run.status_code, 'succeeded');
  const img = await fetch(run.output.images[0].url);
  const meta = await sharp(Buffer.from(await img.arrayBuffer())).metadata();
  assert.deepEqual([meta.width, meta.height], [64, 64]);
});
