// `klein generate` and `klein edit` as a user runs them, on a tiny model written by `klein dev make-tiny-model`.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { runKlein, tmpDir } from './helpers.ts';
import { LIMITS } from '../../src/pipeline/limits.ts';

let work: string;
let model: string;

async function decoded(file: string): Promise<{ width: number; height: number; channels: number; format?: string; data: Buffer }> {
  const meta = await sharp(file).metadata();
  const { data, info } = await sharp(file).raw().toBuffer({ resolveWithObject: true });
  return { width: info.width, height: info.height, channels: info.channels, format: meta.format, data };
}

before(async () => {
  work = tmpDir('cli');
  model = path.join(work, 'tiny');
  const r = await runKlein(['dev', 'make-tiny-model', model, '--seed', '2']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /wrote a random tiny klein-4b model \(diffusers layout, [\d.]+ MiB\)/);
  for (const f of ['model_index.json', 'transformer/config.json', 'vae/config.json', 'text_encoder/config.json', 'text_encoder/model.safetensors.index.json', 'tokenizer/tokenizer.json', 'scheduler/scheduler_config.json']) {
    assert.ok(fs.existsSync(path.join(model, f)), f);
  }
  // the real Qwen3 vocabulary at a tiny width
  const cfg = JSON.parse(fs.readFileSync(path.join(model, 'text_encoder', 'config.json'), 'utf8'));
  assert.equal(cfg.vocab_size, 151936);
});

test('klein generate writes a PNG of the asked size; the same seed gives the same file', async () => {
  const a = path.join(work, 'a.png');
  const r = await runKlein(['generate', 'a red fox', '-m', model, '-W', '128', '-H', '64', '--seed', '7', '-o', a]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /a\.png \(128×64, seed 7\)/);
  // progress goes to stderr, one line per stage and step when it is not a terminal
  assert.match(r.stderr, /klein: denoise 4\/4/);
  const img = await decoded(a);
  assert.deepEqual([img.width, img.height, img.channels, img.format], [128, 64, 3, 'png']);
  const b = path.join(work, 'b.png');
  const again = await runKlein(['generate', 'a red fox', '-m', model, '--size', '128x64', '--seed', '7', '-o', b, '-q']);
  assert.equal(again.code, 0, again.stderr);
  assert.equal(again.stderr, '');
  assert.ok(fs.readFileSync(a).equals(fs.readFileSync(b)), 'same seed, same bytes');
  const c = path.join(work, 'c.png');
  await runKlein(['generate', 'a red fox', '-m', model, '--size', '128x64', '--seed', '8', '-o', c, '-q']);
  assert.ok(!fs.readFileSync(a).equals(fs.readFileSync(c)), 'another seed, another image');
});

test('klein generate: JPEG by file name, WebP by --format, --num-images files, --json report', async () => {
  const out = path.join(work, 'many.jpg');
  const r = await runKlein(['generate', 'two foxes', '-m', model, '--size', '64x96', '--seed', '100', '-n', '2', '--quality', '70', '-o', out, '--json', '-q']);
  assert.equal(r.code, 0, r.stderr);
  const rep = JSON.parse(r.stdout) as { images: Array<{ path: string; width: number; height: number; content_type: string; seed: number }>; seed: number; variant: string; steps: number; timings: Record<string, number> };
  assert.deepEqual(rep.images.map((i) => [path.basename(i.path), i.width, i.height, i.content_type, i.seed]), [
    ['many-1.jpg', 64, 96, 'image/jpeg', 100],
    ['many-2.jpg', 64, 96, 'image/jpeg', 101],
  ]);
  assert.equal(rep.variant, 'klein-4b');
  assert.equal(rep.steps, 4);
  assert.ok(rep.timings.total > 0);
  for (const i of rep.images) assert.deepEqual(Object.values(await decoded(i.path)).slice(0, 4), [64, 96, 3, 'jpeg']);
  const w = await runKlein(['generate', 'a fox', '-m', model, '--size', 'square', '--width', '64', '--height', '64', '--format', 'webp', '-o', path.join(work, 'w.webp'), '-q']);
  assert.equal(w.code, 0, w.stderr);
  assert.deepEqual(Object.values(await decoded(path.join(work, 'w.webp'))).slice(0, 4), [64, 64, 3, 'webp']);
});

test('klein edit with 1 reference (output takes its size) and with 4 references', async () => {
  const refs: string[] = [];
  for (const [i, [w, h]] of [[96, 80], [64, 64], [100, 72], [80, 160]].entries()) {
    const f = path.join(work, `ref${i}.${i % 2 ? 'jpg' : 'png'}`);
    const img = sharp({ create: { width: w, height: h, channels: 3, background: { r: 40 * i, g: 200, b: 255 - 40 * i } } });
    await (i % 2 ? img.jpeg() : img.png()).toFile(f);
    refs.push(f);
  }
  const one = path.join(work, 'edit1.png');
  const r1 = await runKlein(['edit', '-i', refs[0], 'make it night', '-m', model, '--seed', '1', '-o', one, '-q']);
  assert.equal(r1.code, 0, r1.stderr);
  assert.deepEqual(Object.values(await decoded(one)).slice(0, 3), [96, 80, 3]);
  const four = path.join(work, 'edit4.webp');
  const r4 = await runKlein(['edit', '-i', refs[0], '-i', refs[1], '-i', refs[2], '-i', refs[3], 'put them together', '-m', model, '--size', '64x64', '--seed', '1', '-o', four, '--json', '-q']);
  assert.equal(r4.code, 0, r4.stderr);
  assert.deepEqual((JSON.parse(r4.stdout) as { references: string[] }).references, refs);
  assert.deepEqual(Object.values(await decoded(four)).slice(0, 4), [64, 64, 3, 'webp']);
  const again = path.join(work, 'edit4b.webp');
  await runKlein(['edit', '-i', refs[0], '-i', refs[1], '-i', refs[2], '-i', refs[3], 'put them together', '-m', model, '--size', '64x64', '--seed', '1', '-o', again, '-q']);
  assert.ok(fs.readFileSync(four).equals(fs.readFileSync(again)), 'edits are deterministic too');
});

test('every bad argument is exit 2 with a message naming the problem', async () => {
  const o = path.join(work, 'x.png');
  const cases: Array<[string[], RegExp]> = [
    [['generate', 'p', '-m', model, '--width', '100', '-o', o], /--width 100 is not a multiple of 16; use 96 or 112/],
    [['generate', 'p', '-m', model, '--size', '32x32', '-o', o], /--width 32 is below the minimum of 64/],
    [['generate', 'p', '-m', model, '--size', '4096x2048', '-o', o], /above the limit of 4\.19 MP/],
    [['generate', 'p', '-m', model, '--size', 'huge', '-o', o], /unknown --size "huge": use square_hd, square, portrait_4_3/],
    [['generate', 'p', '-m', model, '--height', 'tall', '-o', o], /--height must be a whole number, got "tall"/],
    [['generate', 'p', '-m', model, '-n', '5', '-o', o], /--num-images must be 1 to 4, got 5/],
    [['generate', 'p', '-m', model, '--steps', '0', '-o', o], new RegExp(`steps must be a whole number from 1 to ${LIMITS.maxSteps}, got 0`)],
    [['generate', 'p', '-m', model, '--steps', String(LIMITS.maxSteps + 1), '-o', o], new RegExp(`steps must be a whole number from 1 to ${LIMITS.maxSteps}, got ${LIMITS.maxSteps + 1}`)],
    [['generate', 'p', '-m', model, '--steps', '2.5', '-o', o], /--steps must be a whole number, got "2\.5"/],
    [['generate', 'p', '-m', model, '--seed=-1', '-o', o], /--seed must be a whole number, got "-1"/],
    [['generate', 'p', '-m', model, '--guidance', 'strong', '-o', o], /--guidance must be a number, got "strong"/],
    [['generate', 'p', '-m', model, '--guidance', '99', '-o', o], /guidance must be a number from 0 to 20, got 99/],
    [['generate', 'p', '-m', model, '--quality', '0', '-o', path.join(work, 'x.jpg')], /quality must be a whole number from 1 to 100, got 0/],
    [['generate', 'p', '-m', model, '--format', 'gif', '-o', o], /argument 'gif' is invalid.*png, jpeg, jpg, webp/s],
    [['generate', 'p', '-m', model, '-o', path.join(work, 'x.gif')], /cannot tell the format of ".*x\.gif"/],
    [['generate', 'p', '-m', model, '--format', 'webp', '-o', o], /--format webp contradicts the output name/],
    [['generate', 'p', '-m', model, '-o', path.join(work, 'no', 'such', 'dir', 'x.png')], /output folder .* does not exist/],
    [['generate', 'p', '-m', path.join(work, 'missing-model'), '-o', o], /no model at .*missing-model.*klein pull/],
    [['generate', 'p', '-m', model, '--device', 'tpu', '-o', o], /tpu/],
    [['generate', '-m', model, '-o', o], /missing required argument 'prompt'/],
    [['edit', 'p', '-m', model, '-o', o], /edit needs at least one reference image: -i FILE/],
    [['edit', 'p', '-m', model, '-i', path.join(work, 'nope.png'), '-o', o], /reference image not found: .*nope\.png/],
    [['edit', 'p', '-m', model, ...Array.from({ length: 5 }, () => ['-i', o]).flat(), '-o', o], /at most 4 reference images, got 5/],
  ];
  // the wrong-kind-of-file and too-small references need files
  const notImage = path.join(work, 'notes.png');
  fs.writeFileSync(notImage, 'just some text');
  const small = path.join(work, 'small.png');
  await sharp({ create: { width: 32, height: 48, channels: 3, background: 'red' } }).png().toFile(small);
  cases.push([['edit', 'p', '-m', model, '-i', notImage, '-o', o], /notes\.png: .*not (a|an) (PNG|image)/i]);
  cases.push([['edit', 'p', '-m', model, '-i', small, '--size', '64x64', '-o', o], /reference image is 32×48; both sides must be at least 64 pixels/]);
  // four at a time: each run is mostly process start-up
  for (let i = 0; i < cases.length; i += 4) {
    const batch = cases.slice(i, i + 4);
    const results = await Promise.all(batch.map(([args]) => runKlein(args)));
    batch.forEach(([args, re], j) => {
      const r = results[j];
      assert.equal(r.code, 2, `${args.join(' ')} → ${r.code}: ${r.stderr}`);
      assert.match(r.stderr, re, args.join(' '));
      assert.doesNotMatch(r.stderr, /internal error|\n\s+at /, `no stack trace for ${args.join(' ')}`);
    });
  }
  assert.equal(fs.existsSync(o), false);
});

test('klein dev make-tiny-model: --base gives a 50-step CFG model; a non-empty folder is refused', async () => {
  const b = path.join(work, 'tiny-base');
  const r = await runKlein(['dev', 'make-tiny-model', b, '--base', '--layout', 'bfl', '--hidden', '32']);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(fs.existsSync(path.join(b, 'flux-2-klein-base-4b.safetensors')));
  assert.ok(fs.existsSync(path.join(b, 'ae.safetensors')));
  const m = await runKlein(['models', b, '--json']);
  assert.equal(m.code, 0, m.stderr);
  const info = (JSON.parse(m.stdout) as { models: Array<{ variant: string; layout: string; steps: number; guidance: number }> }).models[0];
  assert.deepEqual([info.variant, info.layout, info.steps, info.guidance], ['klein-base-4b', 'bfl', 50, 4]);
  const g = await runKlein(['generate', 'a fox', '-m', b, '--size', '64x64', '--steps', '2', '--seed', '3', '-o', path.join(work, 'base.png'), '--json', '-q']);
  assert.equal(g.code, 0, g.stderr);
  assert.equal((JSON.parse(g.stdout) as { variant: string }).variant, 'klein-base-4b');
  const again = await runKlein(['dev', 'make-tiny-model', b]);
  assert.equal(again.code, 2);
  assert.match(again.stderr, /is not empty \(use --force/);
  const bad = await runKlein(['dev', 'make-tiny-model', path.join(work, 'bad'), '--hidden', '48']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /hidden must be a positive multiple of 32/);
});
