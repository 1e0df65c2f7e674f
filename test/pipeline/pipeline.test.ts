// The pipeline library on a random tiny model in the official HF layout: real tokenizer, real graphs, real codecs.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { KleinPipeline, PipelineInputError } from '../../src/pipeline/pipeline.ts';
import { ImageInputError } from '../../src/pipeline/images.ts';
import type { GenerateRequest, ProgressEvent } from '../../src/pipeline/types.ts';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';
import { cpuTarget } from '../../src/runtime/target.ts';

let dir: string;
let pipe: KleinPipeline;

const base: GenerateRequest = { prompt: 'a tiny red fox in the snow', width: 96, height: 64, seed: 3, numImages: 1, outputFormat: 'png' };

async function pixels(png: Uint8Array): Promise<{ data: Buffer; width: number; height: number; channels: number }> {
  const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
  return { data, width: info.width, height: info.height, channels: info.channels };
}

function maxDiff(a: Buffer, b: Buffer): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-pipe-'));
  writeTinyModel(path.join(dir, 'model'), { seed: 1 });
  pipe = await KleinPipeline.open({ target: cpuTarget(), model: path.join(dir, 'model') });
});

after(async () => {
  await pipe?.close();
});

test('generate: a decodable PNG of the asked size, stage progress in order, one component resident at a time', async () => {
  const events: ProgressEvent[] = [];
  const seen: string[][] = [];
  const r = await pipe.generate(base, { onProgress: (e) => { events.push(e); seen.push(pipe.loadedComponents()); } });
  assert.equal(r.images.length, 1);
  assert.equal(r.seed, 3);
  const im = await pixels(r.images[0].data);
  assert.deepEqual([im.width, im.height, im.channels], [96, 64, 3]);
  assert.equal(r.images[0].contentType, 'image/png');
  // random weights still give a varied image, not a constant one
  assert.ok(new Set(im.data).size > 50);
  const stages = events.map((e) => e.stage + (e.step !== undefined ? e.step : '') + (e.stage === 'load' ? `:${e.message}` : ''));
  assert.deepEqual(stages, ['text', 'load:text encoder', 'text', 'load:transformer', 'denoise0', 'denoise1', 'denoise2', 'denoise3', 'denoise4', 'load:VAE decoder', 'decode1', 'output']);
  assert.ok(seen.every((s) => s.length <= 1), `more than one component resident: ${JSON.stringify(seen)}`);
  assert.deepEqual(pipe.loadedComponents(), []);
  for (const k of ['load', 'text', 'denoise', 'decode', 'output', 'total']) assert.ok(r.timings[k] >= 0, k);
  assert.equal(r.promptTruncated, undefined);
});

test('the same seed, size and prompt give the same image; image i of a batch is the image of seed + i', async () => {
  const a = await pipe.generate(base);
  const b = await pipe.generate(base);
  assert.ok(Buffer.from(a.images[0].data).equals(Buffer.from(b.images[0].data)));
  const batch = await pipe.generate({ ...base, seed: 10, numImages: 3 });
  assert.equal(batch.images.length, 3);
  const single = await pipe.generate({ ...base, seed: 12 });
  const [p2, s] = await Promise.all([pixels(batch.images[2].data), pixels(single.images[0].data)]);
  // batched matrix products may differ in the last float bits, never by more than one level after rounding
  assert.ok(maxDiff(p2.data, s.data) <= 1);
  const [p0, p1] = await Promise.all([pixels(batch.images[0].data), pixels(batch.images[1].data)]);
  assert.ok(maxDiff(p0.data, p1.data) > 10, 'different seeds give different images');
});

test('a cached prompt skips the text encoder; JPEG and WebP outputs decode to the asked size', async () => {
  const events: ProgressEvent[] = [];
  const r = await pipe.generate({ ...base, outputFormat: 'jpeg', quality: 80 }, { onProgress: (e) => events.push(e) });
  assert.ok(!events.some((e) => e.stage === 'load' && e.message === 'text encoder'));
  assert.equal(r.images[0].contentType, 'image/jpeg');
  assert.deepEqual(Object.values(await pixels(r.images[0].data)).slice(1), [96, 64, 3]);
  const w = await pipe.generate({ ...base, outputFormat: 'webp' });
  assert.equal((await sharp(w.images[0].data).metadata()).format, 'webp');
});

test('editing with references: 1 and 4 images of different sizes', async () => {
  const ref = async (w: number, h: number, c: number) => new Uint8Array(await sharp({ create: { width: w, height: h, channels: 3, background: { r: c, g: 255 - c, b: 90 } } }).png().toBuffer());
  const events: ProgressEvent[] = [];
  const one = await pipe.generate({ ...base, prompt: 'make it blue', referenceImages: [await ref(128, 96, 10)] }, { onProgress: (e) => events.push(e) });
  assert.ok(events.some((e) => e.stage === 'reference'));
  assert.deepEqual(Object.values(await pixels(one.images[0].data)).slice(1), [96, 64, 3]);
  const four = await pipe.generate({ ...base, prompt: 'combine them', referenceImages: await Promise.all([ref(64, 64, 0), ref(100, 72, 80), ref(80, 160, 160), ref(64, 96, 240)]) });
  assert.deepEqual(Object.values(await pixels(four.images[0].data)).slice(1), [96, 64, 3]);
  const t2i = await pipe.generate({ ...base, prompt: 'combine them' });
  assert.ok(!Buffer.from(t2i.images[0].data).equals(Buffer.from(four.images[0].data)), 'references change the image');
});

test('cancellation between steps rejects with the abort reason and leaves the pipeline usable', async () => {
  const ac = new AbortController();
  await assert.rejects(
    pipe.generate(base, { signal: ac.signal, onProgress: (e) => { if (e.stage === 'denoise' && e.step === 2) ac.abort(new Error('user cancelled')); } }),
    /user cancelled/,
  );
  assert.deepEqual(pipe.loadedComponents(), []);
  const r = await pipe.generate(base);
  assert.equal(r.images.length, 1);
});

test('bad requests are typed errors with codes, raised before any model loads', async () => {
  const code = async (req: Partial<GenerateRequest>, want: string) => {
    await assert.rejects(pipe.generate({ ...base, ...req }), (e: unknown) => e instanceof PipelineInputError && e.code === want);
  };
  await code({ width: 100 }, 'invalid_size');
  await code({ height: 48 }, 'invalid_size');
  await code({ width: 4096, height: 2048 }, 'invalid_size');
  await code({ numImages: 5 }, 'invalid_num_images');
  await code({ numImages: 0 }, 'invalid_num_images');
  await code({ steps: 0 }, 'invalid_steps');
  await code({ steps: 2.5 }, 'invalid_steps');
  await code({ seed: -1 }, 'invalid_seed');
  await code({ guidance: Number.NaN }, 'invalid_guidance');
  await code({ outputFormat: 'gif' as never }, 'invalid_format');
  await code({ outputFormat: 'jpeg', quality: 101 }, 'invalid_quality');
  await code({ referenceImages: Array.from({ length: 5 }, () => new Uint8Array(8)) }, 'too_many_references');
  await assert.rejects(pipe.generate({ ...base, referenceImages: [new TextEncoder().encode('not an image at all')] }), (e: unknown) => e instanceof ImageInputError && e.code === 'not_an_image');
  const tiny = new Uint8Array(await sharp({ create: { width: 32, height: 32, channels: 3, background: 'red' } }).png().toBuffer());
  await assert.rejects(pipe.generate({ ...base, referenceImages: [tiny] }), (e: unknown) => e instanceof ImageInputError && e.code === 'image_too_small');
  assert.deepEqual(pipe.loadedComponents(), []);
});

test('a prompt over 512 tokens is flagged as truncated; keepLoaded keeps every component resident', async () => {
  const kept = await KleinPipeline.open({ target: cpuTarget(), model: path.join(dir, 'model'), keepLoaded: true });
  try {
    const r = await kept.generate({ ...base, prompt: 'fox '.repeat(600), referenceImages: [new Uint8Array(await sharp({ create: { width: 64, height: 64, channels: 3, background: 'blue' } }).png().toBuffer())] });
    assert.equal(r.promptTruncated, true);
    assert.deepEqual(kept.loadedComponents().sort(), ['text-encoder', 'transformer', 'vae-decoder', 'vae-encoder']);
  } finally {
    await kept.close();
  }
  assert.deepEqual(kept.loadedComponents(), []);
});

test('a klein base model runs CFG against the empty prompt with its own step default', async () => {
  writeTinyModel(path.join(dir, 'base'), { seed: 1, base: true });
  const p = await KleinPipeline.open({ target: cpuTarget(), model: path.join(dir, 'base') });
  try {
    assert.equal(p.variant.id, 'klein-base-4b');
    assert.equal(p.variant.defaultSteps, 50);
    assert.equal(p.variant.defaultGuidance, 4);
    const events: ProgressEvent[] = [];
    const cfg = await p.generate({ ...base, steps: 3 }, { onProgress: (e) => events.push(e) });
    assert.equal(events.filter((e) => e.stage === 'denoise').at(-1)?.total, 3);
    const noCfg = await p.generate({ ...base, steps: 3, guidance: 1 });
    assert.ok(!Buffer.from(cfg.images[0].data).equals(Buffer.from(noCfg.images[0].data)), 'guidance 4 differs from guidance 1');
    // the empty prompt was encoded once, with the prompt, and is cached
    assert.ok((p.prompts.cacheStats?.entries ?? 0) >= 2);
  } finally {
    await p.close();
  }
});
