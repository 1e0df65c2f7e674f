// Where LoRA files come from: `FILE_OR_HUB_REF[:SCALE]` specs, files under the LoRA folder (no way out of it),
// https URLs through the SSRF guard (127.0.0.1 allowed only by this test's explicit policy, as the service tests do)
// and Hub references against a fake Hub on 127.0.0.1. Every refused download must leave the cache empty.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import type { Flux2Config } from '../../src/models/flux2/config.ts';
import type { NetPolicy } from '../../src/service/net.ts';
import { LoraError, loadLora } from '../../src/models/flux2/lora/load.ts';
import { parseLoraSpec, resolveLora, type LoraSourceOptions } from '../../src/service/lora-fetch.ts';
import { writeTinyLora } from '../../src/fixtures/lora.ts';
import { tmpDir } from '../cli/helpers.ts';

const CFG: Flux2Config = { inChannels: 128, contextInDim: 96, hiddenSize: 64, numHeads: 2, depth: 1, depthSingleBlocks: 1, axesDim: [8, 8, 8, 8], theta: 2000, mlpRatio: 3, useGuidanceEmbed: false };
const TEST_ONLY_LOOPBACK: NetPolicy = { allowHttp: true, allowPrivate: ['127.0.0.1'] };
let dir: string;
let loraDir: string;
let good: Buffer;
let wrongArch: Buffer;
let server: http.Server;
let base: string;
const hits: string[] = [];
/** path → [status, body, extra headers] */
const routes = new Map<string, { status?: number; body: Buffer; headers?: Record<string, string>; chunked?: boolean }>();
/** Fake Hub repos: repo → path → bytes. */
const hubRepos = new Map<string, Map<string, Buffer>>();

before(async () => {
  dir = tmpDir('lora-fetch');
  loraDir = path.join(dir, 'loras');
  fs.mkdirSync(path.join(loraDir, 'styles'), { recursive: true });
  writeTinyLora(path.join(loraDir, 'styles', 'ink.safetensors'), 'kohya', CFG, { seed: 1 });
  good = fs.readFileSync(path.join(loraDir, 'styles', 'ink.safetensors'));
  wrongArch = fs.readFileSync(writeTinyLora(path.join(dir, 'wide.safetensors'), 'peft', { ...CFG, hiddenSize: 96, numHeads: 3 }).file);
  fs.writeFileSync(path.join(dir, 'outside.safetensors'), good);
  fs.symlinkSync(path.join(dir, 'outside.safetensors'), path.join(loraDir, 'escape.safetensors'));
  fs.writeFileSync(path.join(loraDir, 'notes.ckpt'), 'pickle');
  routes.set('/ink.safetensors', { body: good });
  routes.set('/redirect', { status: 302, body: Buffer.alloc(0), headers: { location: '/ink.safetensors' } });
  routes.set('/truncated.safetensors', { body: good.subarray(0, good.length - 64) });
  routes.set('/wide.safetensors', { body: wrongArch });
  routes.set('/huge.safetensors', { body: Buffer.alloc(3 * 1024 * 1024, 1) });
  routes.set('/huge-chunked.safetensors', { body: Buffer.alloc(3 * 1024 * 1024, 1), chunked: true });
  routes.set('/missing.safetensors', { status: 404, body: Buffer.from('no') });
  hubRepos.set('acme/ink-lora', new Map([['ink.safetensors', good], ['README.md', Buffer.from('# ink')]]));
  hubRepos.set('acme/many', new Map([['a.safetensors', good], ['b.safetensors', good], ['sub/c.safetensors', good]]));
  hubRepos.set('acme/broken', new Map([['x.safetensors', good.subarray(0, 100)]]));
  hubRepos.set('acme/big', new Map([['big.safetensors', Buffer.alloc(3 * 1024 * 1024, 2)]]));
  server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    hits.push(url.pathname);
    const tree = /^\/api\/models\/([^/]+\/[^/]+)\/tree\/main$/.exec(url.pathname);
    if (tree) {
      const repo = hubRepos.get(tree[1]);
      if (!repo) return void res.writeHead(404, { 'content-type': 'application/json', 'x-error-code': 'RepoNotFound' }).end('{"error":"Repository not found"}');
      const list = [...repo].map(([p, b]) => ({ type: 'file', path: p, size: b.length, oid: crypto.randomBytes(20).toString('hex'), lfs: { oid: crypto.createHash('sha256').update(b).digest('hex'), size: b.length, pointerSize: 134 } }));
      return void res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(list));
    }
    const resolve = /^\/([^/]+\/[^/]+)\/resolve\/main\/(.+)$/.exec(url.pathname);
    if (resolve) {
      const body = hubRepos.get(resolve[1])?.get(decodeURIComponent(resolve[2]));
      if (!body) return void res.writeHead(404).end();
      return void res.writeHead(200, { 'content-length': body.length }).end(body);
    }
    const r = routes.get(url.pathname);
    if (!r) return void res.writeHead(404).end();
    res.writeHead(r.status ?? 200, { ...(r.chunked ? {} : { 'content-length': String(r.body.length) }), ...r.headers });
    res.end(r.body);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

after(() => server?.close());

function opts(cache: string, extra: Partial<LoraSourceOptions> = {}): LoraSourceOptions {
  return {
    loraDir,
    cacheDir: cache,
    urls: { policy: TEST_ONLY_LOOPBACK, timeoutMs: 5000 },
    hub: { hubUrl: base },
    maxBytes: 1024 * 1024,
    validate: (f, label) => void loadLora(f, CFG, { label }),
    ...extra,
  };
}

/** Files under a cache folder (the folder itself may exist). */
function stored(cache: string): string[] {
  if (!fs.existsSync(cache)) return [];
  return fs.readdirSync(cache, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => e.name);
}

async function rejects(p: Promise<unknown>, code: LoraError['code'], why: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof LoraError, `expected LoraError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, why);
    return true;
  });
}

test('parseLoraSpec: FILE_OR_HUB_REF[:SCALE]; a URL port is not a scale; bad scales are refused', () => {
  assert.deepEqual(parseLoraSpec('styles/ink.safetensors'), { ref: 'styles/ink.safetensors', scale: 1 });
  assert.deepEqual(parseLoraSpec('styles/ink.safetensors:0.75'), { ref: 'styles/ink.safetensors', scale: 0.75 });
  assert.deepEqual(parseLoraSpec('acme/ink-lora:-.5'), { ref: 'acme/ink-lora', scale: -0.5 });
  assert.deepEqual(parseLoraSpec('https://h.example:8443/x.safetensors:1.2'), { ref: 'https://h.example:8443/x.safetensors', scale: 1.2 });
  assert.deepEqual(parseLoraSpec('https://h.example:8443'), { ref: 'https://h.example:8443', scale: 1 });
  assert.throws(() => parseLoraSpec('x.safetensors:11'), (e: unknown) => e instanceof LoraError && e.code === 'lora_bad_spec' && /between -10 and 10/.test(e.message));
  assert.throws(() => parseLoraSpec(':0.5'), (e: unknown) => e instanceof LoraError && e.code === 'lora_bad_spec');
  assert.throws(() => parseLoraSpec(''), (e: unknown) => e instanceof LoraError && e.code === 'lora_bad_spec');
});

test('files under the LoRA folder resolve (with sha256); traversal, absolute paths and symlinks out of it are refused', async () => {
  const cache = path.join(dir, 'cache-local');
  const r = await resolveLora('styles/ink.safetensors', opts(cache));
  assert.equal(r.kind, 'file');
  assert.equal(r.file, fs.realpathSync(path.join(loraDir, 'styles', 'ink.safetensors')));
  assert.equal(r.sha256, crypto.createHash('sha256').update(good).digest('hex'));
  await rejects(resolveLora('../outside.safetensors', opts(cache)), 'lora_bad_spec', /relative to the LoRA folder, without "\.\."/);
  await rejects(resolveLora('styles/../../outside.safetensors', opts(cache)), 'lora_bad_spec', /without "\.\."/);
  await rejects(resolveLora(path.join(dir, 'outside.safetensors'), opts(cache)), 'lora_bad_spec', /must be relative/);
  await rejects(resolveLora('escape.safetensors', opts(cache)), 'lora_bad_spec', /leads outside the LoRA folder/);
  await rejects(resolveLora('notes.ckpt', opts(cache)), 'lora_unsupported', /not a \.safetensors file/);
  await rejects(resolveLora('styles/nope.safetensors', opts(cache)), 'lora_not_found', /not a file under the LoRA folder/);
  // the CLI may name any file on the machine
  const cli = await resolveLora(path.join(dir, 'outside.safetensors'), { anyLocalPath: true, validate: (f) => void loadLora(f, CFG) });
  assert.equal(cli.file, path.join(dir, 'outside.safetensors'));
  await rejects(resolveLora(path.join(dir, 'wide.safetensors'), { anyLocalPath: true, validate: (f, l) => void loadLora(f, CFG, { label: l }) }), 'lora_incompatible', /maps 96 → 288/);
  assert.deepEqual(stored(cache), []);
});

test('an https URL is fetched once, stored as <sha256>.safetensors, then served from the cache; redirects are followed', async () => {
  const cache = path.join(dir, 'cache-url');
  const sha = crypto.createHash('sha256').update(good).digest('hex');
  const first = await resolveLora(`${base}/ink.safetensors`, opts(cache));
  assert.deepEqual([first.kind, first.cached, first.sha256, first.file], ['url', false, sha, path.join(cache, `${sha}.safetensors`)]);
  assert.deepEqual(fs.readFileSync(first.file), good);
  const n = hits.filter((h) => h === '/ink.safetensors').length;
  const again = await resolveLora(`${base}/ink.safetensors`, opts(cache));
  assert.deepEqual([again.cached, again.file], [true, first.file]);
  assert.equal(hits.filter((h) => h === '/ink.safetensors').length, n, 'no second download');
  const redirected = await resolveLora(`${base}/redirect`, opts(cache));
  assert.deepEqual([redirected.sha256, redirected.cached], [sha, true], 'same content: the stored blob is reused');
  assert.deepEqual(stored(cache).filter((f) => f.endsWith('.safetensors')), [`${sha}.safetensors`]);
  assert.equal(loadLora(first.file, CFG).targets.length, 12);
});

test('private addresses, huge, truncated, wrong-architecture and missing URLs are refused and nothing is stored', async () => {
  const cache = path.join(dir, 'cache-hostile');
  const strict = opts(cache, { urls: { policy: { allowHttp: true, allowPrivate: [] }, timeoutMs: 5000 } });
  await rejects(resolveLora(`${base}/ink.safetensors`, strict), 'lora_blocked', /private, loopback or link-local/);
  await rejects(resolveLora('http://localhost:9/x.safetensors', strict), 'lora_blocked', /loopback/);
  await rejects(resolveLora('http://[::1]:9/x.safetensors', strict), 'lora_blocked', /private, loopback/);
  await rejects(resolveLora(`${base}/ink.safetensors`, opts(cache, { urls: { policy: { allowHttp: false, allowPrivate: ['127.0.0.1'] } } })), 'lora_bad_spec', /only https:\/\/ URLs/);
  await rejects(resolveLora(`${base}/ink.safetensors`, opts(cache, { urls: false })), 'lora_bad_spec', /URLs are not accepted here/);
  await rejects(resolveLora(`${base}/huge.safetensors`, opts(cache)), 'lora_too_large', /larger than the 1048576-byte limit/);
  await rejects(resolveLora(`${base}/huge-chunked.safetensors`, opts(cache)), 'lora_too_large', /exceeds the 1048576-byte limit/);
  await rejects(resolveLora(`${base}/truncated.safetensors`, opts(cache)), 'lora_invalid', /not a valid safetensors file: .*truncated/);
  await rejects(resolveLora(`${base}/wide.safetensors`, opts(cache)), 'lora_incompatible', /maps 96 → 288 features/);
  await rejects(resolveLora(`${base}/missing.safetensors`, opts(cache)), 'lora_fetch_failed', /answered HTTP 404/);
  assert.deepEqual(stored(cache), []);
});

test('Hub references: the one .safetensors of a repo or a named file, cached by sha256; refusals store nothing', async () => {
  const cache = path.join(dir, 'cache-hub');
  const sha = crypto.createHash('sha256').update(good).digest('hex');
  const r = await resolveLora('acme/ink-lora', opts(cache));
  assert.deepEqual([r.kind, r.cached, r.sha256, r.file], ['hub', false, sha, path.join(cache, `${sha}.safetensors`)]);
  const downloads = hits.filter((h) => h.endsWith('/resolve/main/ink.safetensors')).length;
  const again = await resolveLora('acme/ink-lora/ink.safetensors', opts(cache));
  assert.equal(again.cached, true);
  assert.equal(hits.filter((h) => h.endsWith('/resolve/main/ink.safetensors')).length, downloads, 'listed, not downloaded again');
  assert.equal((await resolveLora('acme/many/sub/c.safetensors', opts(cache))).sha256, sha);
  const before = stored(cache).sort();
  await rejects(resolveLora('acme/many', opts(cache)), 'lora_bad_spec', /holds 2 \.safetensors files \(a\.safetensors, b\.safetensors\); name one as acme\/many\/FILE\.safetensors/);
  await rejects(resolveLora('acme/ink-lora/other.safetensors', opts(cache)), 'lora_not_found', /has no other\.safetensors/);
  await rejects(resolveLora('acme/nothing', opts(cache)), 'lora_not_found', /no such Hub repository/);
  await rejects(resolveLora('acme/broken', opts(cache)), 'lora_invalid', /not a valid safetensors file/);
  await rejects(resolveLora('acme/big', opts(cache)), 'lora_too_large', /big\.safetensors is 3145728 bytes, larger than the 1048576-byte limit/);
  assert.equal(hits.some((h) => h.endsWith('/resolve/main/big.safetensors')), false, 'a too-large file is not downloaded');
  await rejects(resolveLora('acme/ink-lora', opts(cache, { hub: false })), 'lora_bad_spec', /Hub LoRA references are not accepted here/);
  assert.deepEqual(stored(cache).sort(), before);
});
