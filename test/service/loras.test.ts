// LoRAs through klein serve on 127.0.0.1 with the real pipeline on the tiny model: `loras: [{path, scale}]` from the
// LoRA folder or an https-style URL (a loopback server allowed by the test policy) runs and is billed with the LoRA
// surcharge; every LoRA that cannot be used (another architecture, mismatched rank or shape, truncated, a private
// address, over the size cap, outside the folder, missing) is a 4xx with its LORA_* code before anything is stored,
// the download cache keeps nothing it refused, and the server keeps serving. The OpenAI route takes the same field.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import sharp from 'sharp';
import { openFlux2Checkpoint } from '../../src/models/flux2/checkpoint.ts';
import { LoraError } from '../../src/models/flux2/lora/load.ts';
import { openModelFolder } from '../../src/weights/model-folder.ts';
import { writeTinyLora } from '../../src/fixtures/lora.ts';
import { writeSafetensors } from '../../src/weights/safetensors.ts';
import { deserializeError, serializeError } from '../../src/service/engine-protocol.ts';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { type Harness, pollUntil, realPipeline, startService, tempDir, terminal } from './helpers.ts';

const MAX_BYTES = 1024 * 1024;
const T2I = '/v1/models/flux-2-klein-4b/runs';
let engine: ImagePipeline & { modelDir: string };
let h: Harness;
let dir: string;
let loraDir: string;
let cache: string;
let server: http.Server;
let base: string;
const cacheBefore = process.env.KLEIN_CACHE_DIR;

before(async () => {
  dir = tempDir('klein-svc-lora-');
  loraDir = path.join(dir, 'loras');
  cache = path.join(dir, 'cache');
  process.env.KLEIN_CACHE_DIR = cache;
  fs.mkdirSync(path.join(loraDir, 'styles'), { recursive: true });
  engine = await realPipeline();
  const cfg = openFlux2Checkpoint(openModelFolder(engine.modelDir).transformer.checkpoint).config;
  writeTinyLora(path.join(loraDir, 'styles', 'ink.safetensors'), 'kohya', cfg, { seed: 4 });
  writeTinyLora(path.join(loraDir, 'wide.safetensors'), 'ai-toolkit', { ...cfg, hiddenSize: cfg.hiddenSize * 2, numHeads: cfg.numHeads * 2 });
  const ink = fs.readFileSync(path.join(loraDir, 'styles', 'ink.safetensors'));
  fs.writeFileSync(path.join(loraDir, 'truncated.safetensors'), ink.subarray(0, ink.length - 64));
  const H = cfg.hiddenSize;
  const f32 = (n: number, v = 0.01) => new Float32Array(n).fill(v);
  writeSafetensors(path.join(loraDir, 'flux1.safetensors'), { 'lora_unet_double_blocks_0_img_mod_lin.lora_down.weight': { dtype: 'F32', shape: [2, H], data: f32(2 * H) }, 'lora_unet_double_blocks_0_img_mod_lin.lora_up.weight': { dtype: 'F32', shape: [6 * H, 2], data: f32(12 * H) } });
  writeSafetensors(path.join(loraDir, 'ranks.safetensors'), { 'diffusion_model.img_in.lora_A.weight': { dtype: 'F32', shape: [4, cfg.inChannels], data: f32(4 * cfg.inChannels) }, 'diffusion_model.img_in.lora_B.weight': { dtype: 'F32', shape: [H, 3], data: f32(3 * H) } });
  writeSafetensors(path.join(loraDir, 'nan.safetensors'), { 'diffusion_model.img_in.lora_A.weight': { dtype: 'F32', shape: [2, cfg.inChannels], data: f32(2 * cfg.inChannels, Number.NaN) }, 'diffusion_model.img_in.lora_B.weight': { dtype: 'F32', shape: [H, 2], data: f32(2 * H) } });
  server = http.createServer((req, res) => {
    if (req.url === '/ink.safetensors') return void res.writeHead(200, { 'content-length': ink.length }).end(ink);
    if (req.url === '/huge.safetensors') {
      res.writeHead(200, { 'content-length': 4 * MAX_BYTES });
      return void res.end(Buffer.alloc(4 * MAX_BYTES));
    }
    res.writeHead(404).end();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  h = await startService({ pipeline: engine, modelDir: engine.modelDir, config: { loras: { dir: loraDir, maxBytes: MAX_BYTES, urls: true, hub: false, timeoutMs: 5000 } } });
});

after(async () => {
  await h?.svc.close();
  await engine?.close();
  server?.close();
  if (cacheBefore === undefined) delete process.env.KLEIN_CACHE_DIR;
  else process.env.KLEIN_CACHE_DIR = cacheBefore;
  fs.rmSync(dir, { recursive: true, force: true });
});

const runCount = () => (h.svc.store.db.prepare('SELECT count(*) AS n FROM runs').get() as { n: number }).n;
const cached = () => (fs.existsSync(path.join(cache, 'loras')) ? fs.readdirSync(path.join(cache, 'loras')).filter((f) => f.endsWith('.safetensors')) : []);
const input = (loras: unknown) => ({ input: { prompt: 'a fox', image_size: { width: 64, height: 64 }, num_inference_steps: 2, seed: 9, loras } });

test('a LoRA from the folder and the same file by URL give the same image, billed with the surcharge; the input hides server paths', async () => {
  const plain = await h.api('POST', T2I, input(undefined));
  assert.equal(plain.json.cost, '0.014');
  const byPath = await h.api('POST', T2I, input([{ path: 'styles/ink.safetensors', scale: 0.8 }]));
  assert.equal(byPath.status, 201, JSON.stringify(byPath.json));
  // 64×64 is one megapixel: $0.014 + the LoRA surcharge of $0.0045
  assert.equal(byPath.json.cost, '0.0185');
  assert.equal(byPath.json.cost_breakdown.loras, 1);
  assert.equal(byPath.json.cost_breakdown.images[0].lora_usd, '0.0045');
  assert.deepEqual(byPath.json.input.loras, [{ path: 'styles/ink.safetensors', scale: 0.8 }]);
  assert.equal(byPath.json.input.lora_files, undefined);
  const byUrl = await h.api('POST', T2I, input([{ path: `${base}/ink.safetensors`, scale: 0.8 }]));
  assert.equal(byUrl.status, 201, JSON.stringify(byUrl.json));
  const sha = crypto.createHash('sha256').update(fs.readFileSync(path.join(loraDir, 'styles', 'ink.safetensors'))).digest('hex');
  assert.deepEqual(cached(), [`${sha}.safetensors`]);
  const [p, a, b] = await Promise.all([plain, byPath, byUrl].map((r) => pollUntil(h, r.json.id, terminal, 120_000)));
  for (const r of [p, a, b]) assert.equal(r.status_code, 'succeeded', JSON.stringify(r));
  assert.equal(a.cost, '0.0185');
  assert.ok(a.output.timings.lora >= 0);
  const bytes = async (r: { output: { images: Array<{ url: string }> } }) => Buffer.from(await (await fetch(r.output.images[0].url)).arrayBuffer());
  const [pb, ab, bb] = await Promise.all([bytes(p), bytes(a), bytes(b)]);
  assert.ok(ab.equals(bb), 'the URL and the folder file are the same LoRA');
  assert.ok(!ab.equals(pb), 'the LoRA changed the image');
  const usage = await h.api('GET', '/v1/usage');
  assert.deepEqual(usage.json.data.map((r: { runs: number; output_mp: number; lora_mp: number }) => [r.runs, r.output_mp, r.lora_mp]), [[3, 3, 2]]);
});

test('LoRAs that cannot be used: a 4xx with their LORA_* code, no run stored, nothing cached, the server still serves', async () => {
  const runs = runCount();
  const before = cached();
  const cases: Array<[unknown, number, string, RegExp]> = [
    [[{ path: 'flux1.safetensors' }], 422, 'LORA_INCOMPATIBLE', /FLUX\.1 LoRA/],
    [[{ path: 'wide.safetensors' }], 422, 'LORA_INCOMPATIBLE', /maps \d+ → \d+ features/],
    [[{ path: 'ranks.safetensors' }], 422, 'LORA_INVALID', /mismatched ranks/],
    [[{ path: 'truncated.safetensors' }], 422, 'LORA_INVALID', /not a valid safetensors file/],
    [[{ path: 'https://10.1.2.3/style.safetensors' }], 400, 'LORA_BLOCKED', /private, loopback or link-local/],
    [[{ path: `${base}/huge.safetensors` }], 413, 'LORA_TOO_LARGE', /larger than the 1048576-byte limit/],
    [[{ path: `${base}/gone.safetensors` }], 400, 'LORA_FETCH_FAILED', /HTTP 404/],
    [[{ path: '../outside.safetensors' }], 400, 'LORA_BAD_SPEC', /relative to the LoRA folder/],
    [[{ path: 'styles/missing.safetensors' }], 404, 'LORA_NOT_FOUND', /not a file under the LoRA folder/],
    [[{ path: 'acme/style-lora' }], 400, 'LORA_BAD_SPEC', /Hub LoRA references are not accepted here/],
    [[{ path: 'styles/ink.safetensors', scale: 11 }], 422, 'VALIDATION_ERROR', /./],
    [Array.from({ length: 5 }, () => ({ path: 'styles/ink.safetensors' })), 422, 'VALIDATION_ERROR', /./],
  ];
  for (const [loras, status, code, why] of cases) {
    const r = await h.api('POST', T2I, input(loras));
    assert.equal(r.status, status, `${JSON.stringify(loras)}: ${JSON.stringify(r.json)}`);
    assert.equal(r.json.code, code);
    assert.match(r.json.message + JSON.stringify(r.json.errors), why);
    if (code.startsWith('LORA_')) assert.deepEqual(r.json.errors[0].loc, ['body', 'input', 'loras', 0, 'path']);
  }
  assert.equal(runCount(), runs, 'nothing stored');
  assert.deepEqual(cached(), before, 'nothing cached');
  assert.equal((await h.api('GET', '/v1/health')).status, 200);
  const ok = await h.api('POST', T2I, input([{ path: 'styles/ink.safetensors', scale: 1 }]));
  assert.equal((await pollUntil(h, ok.json.id, terminal, 120_000)).status_code, 'succeeded');
});

test('values the header cannot show (NaN) fail the run in the engine as LORA_INVALID, unbilled', async () => {
  const r = await h.api('POST', T2I, input([{ path: 'nan.safetensors' }]));
  assert.equal(r.status, 201, JSON.stringify(r.json));
  const done = await pollUntil(h, r.json.id, terminal, 120_000);
  assert.deepEqual([done.status_code, done.failure_code, done.failure_stage, done.cost], ['failed', 'LORA_INVALID', 'preprocess', '0.000']);
  assert.match(done.failure_message, /NaN or infinite/);
});

test('the OpenAI images route takes loras (JSON list, or a JSON string in multipart) and answers refusals in its shape', async () => {
  const ok = await h.api('POST', '/v1/images/generations', { prompt: 'a fox', size: '64x64', loras: [{ path: 'styles/ink.safetensors', scale: 0.5 }] });
  assert.equal(ok.status, 200, JSON.stringify(ok.json));
  assert.equal(ok.json.usage.cost_usd, '0.0185');
  const bad = await h.api('POST', '/v1/images/generations', { prompt: 'a fox', size: '64x64', loras: [{ path: 'wide.safetensors' }] });
  assert.equal(bad.status, 400);
  assert.equal(bad.json.error.code, 'lora_incompatible');
  assert.equal(bad.json.error.param, 'loras');
  const form = new FormData();
  form.append('prompt', 'make it ink');
  form.append('size', '64x64');
  form.append('loras', JSON.stringify([{ path: 'styles/ink.safetensors' }]));
  const png = await sharp({ create: { width: 64, height: 64, channels: 3, background: 'white' } }).png().toBuffer();
  form.append('image', new Blob([png], { type: 'image/png' }), 'one.png');
  const edit = await fetch(`${h.url}/v1/images/edits`, { method: 'POST', headers: { authorization: `Bearer ${h.key}` }, body: form });
  assert.equal(edit.status, 200, await edit.clone().text());
  form.set('loras', '[not json');
  const junk = await fetch(`${h.url}/v1/images/edits`, { method: 'POST', headers: { authorization: `Bearer ${h.key}` }, body: form });
  assert.equal(junk.status, 400);
  assert.equal(((await junk.json()) as { error: { param: string } }).error.param, 'loras');
});

test('a LoraError crosses the engine process boundary as itself (code, status)', () => {
  const e = deserializeError(serializeError(new LoraError('lora_too_large', 'too big')));
  assert.ok(e instanceof LoraError);
  assert.deepEqual([e.code, e.status, e.message], ['lora_too_large', 413, 'too big']);
});
