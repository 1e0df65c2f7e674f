// `background: "transparent"` in the pipeline library, on a tiny model folder with its tiny matting model: the
// matting stage's place, progress, timing and memory discipline, the prompt it encodes (cached under the final
// prompt) and the fail-fast paths.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { KleinPipeline, MattingModelError, PipelineInputError, transparentPrompt } from '../../src/pipeline/pipeline.ts';
import type { GenerateRequest, ProgressEvent } from '../../src/pipeline/types.ts';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';
import { cpuTarget } from '../../src/runtime/target.ts';

let dir: string;
let pipe: KleinPipeline;
const saved = { home: process.env.KLEIN_HOME, matting: process.env.KLEIN_MATTING_MODEL };
const req: GenerateRequest = { prompt: 'a fox, checkerboard background', width: 64, height: 64, seed: 4, numImages: 2, outputFormat: 'webp', background: 'transparent' };

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-transparent-'));
  // nothing pulled and no override: only the model folder's own matting/ can be found
  process.env.KLEIN_HOME = path.join(dir, 'home');
  delete process.env.KLEIN_MATTING_MODEL;
  writeTinyModel(path.join(dir, 'model'), { seed: 8 });
});

after(async () => {
  await pipe?.close();
  for (const [k, v] of [['KLEIN_HOME', saved.home], ['KLEIN_MATTING_MODEL', saved.matting]] as const) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
});

test('transparent: matting after the decode for every image, timed, released after its stage; the hinted prompt is what is cached', async () => {
  pipe = await KleinPipeline.open({ target: cpuTarget(), model: path.join(dir, 'model') });
  const events: ProgressEvent[] = [];
  const seen: string[][] = [];
  const r = await pipe.generate(req, { onProgress: (e) => { events.push(e); seen.push(pipe.loadedComponents()); } });
  const stages = events.map((e) => e.stage + (e.step !== undefined ? e.step : '') + (e.stage === 'load' ? `:${e.message}` : ''));
  assert.deepEqual(stages.slice(stages.indexOf('load:VAE decoder')), ['load:VAE decoder', 'decode1', 'decode2', 'load:matting model', 'matting1', 'matting2', 'output']);
  assert.ok(seen.every((s) => s.length <= 1), `more than one component resident: ${JSON.stringify(seen)}`);
  assert.ok(seen.some((s) => s.includes('matting')));
  assert.deepEqual(pipe.loadedComponents(), [], 'the matting model is released after its stage on the CPU');
  assert.ok(r.timings.matting > 0);
  assert.equal(r.images.length, 2);
  for (const im of r.images) {
    assert.deepEqual([im.contentType, im.hasAlpha, im.width, im.height], ['image/webp', true, 64, 64]);
    const meta = await sharp(im.data).metadata();
    assert.deepEqual([meta.format, meta.hasAlpha, meta.channels], ['webp', true, 4]);
  }
  // the text encoder saw the prompt without the checkerboard and with the backdrop hint: an opaque request for
  // exactly that prompt is a cache hit (no text-encoder load) and paints the same RGB under the matte
  assert.equal(transparentPrompt(req.prompt), transparentPrompt('a fox'));
  const again: ProgressEvent[] = [];
  const o = await pipe.generate({ ...req, prompt: transparentPrompt(req.prompt), background: 'opaque', outputFormat: 'png', numImages: 1 }, { onProgress: (e) => again.push(e) });
  assert.ok(!again.some((e) => e.stage === 'load' && e.message === 'text encoder'), 'the hinted prompt was cached');
  assert.equal(o.images[0].hasAlpha, undefined);
  assert.equal((await sharp(o.images[0].data).metadata()).channels, 3);
});

test('keepLoaded keeps the matting model resident between requests', async () => {
  const p = await KleinPipeline.open({ target: cpuTarget(), model: path.join(dir, 'model'), keepLoaded: true });
  try {
    await p.generate({ ...req, numImages: 1, outputFormat: 'png' });
    assert.ok(p.loadedComponents().includes('matting'));
    const events: ProgressEvent[] = [];
    await p.generate({ ...req, numImages: 1, outputFormat: 'png', seed: 5 }, { onProgress: (e) => events.push(e) });
    assert.ok(!events.some((e) => e.stage === 'load'), 'nothing loads the second time');
  } finally {
    await p.close();
  }
  assert.deepEqual(p.loadedComponents(), []);
});

test('jpeg + transparent and missing matting weights fail before anything loads', async () => {
  const p = await KleinPipeline.open({ target: cpuTarget(), model: path.join(dir, 'model'), mattingModel: path.join(dir, 'nowhere') });
  try {
    const events: ProgressEvent[] = [];
    await assert.rejects(p.generate({ ...req, outputFormat: 'jpeg' }, { onProgress: (e) => events.push(e) }), (e: unknown) => e instanceof PipelineInputError && e.code === 'transparent_needs_alpha_format');
    await assert.rejects(p.generate(req, { onProgress: (e) => events.push(e) }), (e: unknown) => e instanceof MattingModelError && e.code === 'matting_model_invalid' && /no matting model at .*nowhere.*klein pull --matting/.test(e.message));
    assert.deepEqual(events, [], 'no stage started');
    assert.deepEqual(p.loadedComponents(), []);
    // opaque requests do not need the matting model at all
    const r = await p.generate({ ...req, background: 'auto', numImages: 1 });
    assert.equal(r.images[0].hasAlpha, undefined);
  } finally {
    await p.close();
  }
});

test('an RGBA reference is flattened onto white before editing: the same cut-out as the pre-flattened RGB reference', async () => {
  // a half-transparent disc: what the edit sees must not depend on the colour left under transparent pixels
  const w = 64, h = 64;
  const rgba = Buffer.alloc(w * h * 4);
  for (let i = 0; i < w * h; i++) {
    const x = i % w, y = Math.floor(i / w);
    const inside = (x - 32) ** 2 + (y - 32) ** 2 < 400;
    rgba.set([inside ? 200 : 13, inside ? 40 : 250, 90, inside ? 255 : (x * 4) % 256], i * 4);
  }
  const withAlpha = await sharp(rgba, { raw: { width: w, height: h, channels: 4 } }).png().toBuffer();
  const flat = await sharp(withAlpha).flatten({ background: { r: 255, g: 255, b: 255 } }).removeAlpha().png().toBuffer();
  assert.equal((await sharp(flat).metadata()).channels, 3);
  const edit = { ...req, numImages: 1, outputFormat: 'png' as const, prompt: 'make it night' };
  const a = await pipe.generate({ ...edit, referenceImages: [new Uint8Array(withAlpha)] });
  const b = await pipe.generate({ ...edit, referenceImages: [new Uint8Array(flat)] });
  assert.equal(a.images[0].hasAlpha, true);
  assert.ok(Buffer.from(a.images[0].data).equals(Buffer.from(b.images[0].data)));
});
