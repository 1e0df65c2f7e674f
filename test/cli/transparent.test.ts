// `klein generate --background transparent` end to end on a tiny model folder (tiny klein + the tiny BiRefNet that
// `klein dev make-tiny-model` writes into matting/), through the real CLI and real ONNX Runtime. The outputs are
// decoded back and compared with what the matting model gives on the opaque image of the same seed and prompt.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { transparentPrompt } from '../../src/pipeline/background.ts';
import { cutoutRGBA } from '../../src/pipeline/matting.ts';
import { inspectMattingFolder, MattingPredictor } from '../../src/pipeline/matting-model.ts';
import { cpuTarget } from '../../src/runtime/target.ts';
import { openMattingFolder } from '../../src/weights/matting-folder.ts';
import { runKlein, tmpDir } from './helpers.ts';

let work: string;
let model: string;
let home: string;
const PROMPT = 'a red fox on a transparent background';
const SIZE = ['--size', '64x64', '--seed', '11'];

async function raw(file: string) {
  const meta = await sharp(file).metadata();
  const { data, info } = await sharp(file).raw().toBuffer({ resolveWithObject: true });
  return { data: new Uint8Array(data), width: info.width, height: info.height, channels: info.channels, format: meta.format, hasAlpha: meta.hasAlpha };
}

before(async () => {
  work = tmpDir('transparent');
  model = path.join(work, 'tiny');
  // an empty $KLEIN_HOME: nothing pulled, so only the model folder's own matting/ can be found
  home = path.join(work, 'home');
  const r = await runKlein(['dev', 'make-tiny-model', model, '--seed', '5']);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(fs.existsSync(path.join(model, 'matting', 'model.safetensors')), 'tiny matting weights in matting/');
});

test('transparent PNG and WebP: 4 channels, alpha from the matting model on the opaque image, foreground colours at the edges', async () => {
  const png = path.join(work, 't.png');
  const t = await runKlein(['generate', PROMPT, '-m', model, ...SIZE, '--background', 'transparent', '-o', png, '--json'], { KLEIN_HOME: home });
  assert.equal(t.code, 0, t.stderr);
  const rep = JSON.parse(t.stdout) as { images: Array<{ content_type: string; has_alpha: boolean }>; background: string; timings: Record<string, number> };
  assert.deepEqual([rep.images[0].content_type, rep.images[0].has_alpha, rep.background], ['image/png', true, 'transparent']);
  assert.ok(rep.timings.matting > 0, 'the matting stage is timed');
  assert.match(t.stderr, /klein: decode\nklein: load matting model\nklein: matting\nklein: write\n/, 'the matting stage runs after the decode and shows progress');

  // the opaque image klein painted for that request: same seed, and the prompt with the backdrop hint
  const opaque = path.join(work, 'o.png');
  const o = await runKlein(['generate', transparentPrompt(PROMPT), '-m', model, ...SIZE, '-o', opaque, '-q', '--json'], { KLEIN_HOME: home });
  assert.equal(o.code, 0, o.stderr);
  assert.equal((JSON.parse(o.stdout) as { images: Array<{ has_alpha: boolean }> }).images[0].has_alpha, false);
  const rgb = await raw(opaque);
  assert.equal(rgb.channels, 3);

  const got = await raw(png);
  assert.deepEqual([got.width, got.height, got.channels, got.format, got.hasAlpha], [64, 64, 4, 'png', true]);
  const folder = inspectMattingFolder(openMattingFolder(path.join(model, 'matting')));
  const net = await MattingPredictor.load(folder.path, { target: cpuTarget(), inputSize: folder.inputSize });
  const alpha = await net.predict(rgb.data, 64, 64);
  await net.close();
  const want = cutoutRGBA(rgb.data, alpha, 64, 64);
  const alphaOf = (d: Uint8Array) => Uint8Array.from({ length: 64 * 64 }, (_, i) => d[i * 4 + 3]);
  const a = alphaOf(got.data);
  assert.ok(Math.max(...a) - Math.min(...a) > 10, `the alpha varies (${Math.min(...a)}–${Math.max(...a)})`);
  // alpha = round(255 · matte), RGB = the estimated foreground, RGB 0 under alpha 0 (cutoutRGBA's rule)
  assert.deepEqual(a, alphaOf(want));
  assert.deepEqual(got.data, want);
  for (let i = 0; i < 64 * 64; i++) if (a[i] === 0) assert.deepEqual([...got.data.subarray(i * 4, i * 4 + 3)], [0, 0, 0]);

  // WebP: the same alpha plane (coded losslessly), lossy colour close to the PNG's
  const webp = path.join(work, 't.webp');
  const wr = await runKlein(['generate', PROMPT, '-m', model, ...SIZE, '--background', 'transparent', '--quality', '90', '-o', webp, '-q'], { KLEIN_HOME: home });
  assert.equal(wr.code, 0, wr.stderr);
  const wg = await raw(webp);
  assert.deepEqual([wg.width, wg.height, wg.channels, wg.format, wg.hasAlpha], [64, 64, 4, 'webp', true]);
  assert.deepEqual(alphaOf(wg.data), a);
  let err = 0, n = 0;
  for (let i = 0; i < 64 * 64; i++) {
    if (a[i] < 128) continue;
    for (let c = 0; c < 3; c++) err += Math.abs(wg.data[i * 4 + c] - got.data[i * 4 + c]);
    n += 3;
  }
  assert.ok(n > 0 && err / n < 12, `WebP colour within lossy error of the PNG's (mean ${(err / n).toFixed(2)} levels)`);
});

test('--background opaque writes the same bytes as no --background', async () => {
  const a = path.join(work, 'plain.png');
  const b = path.join(work, 'opaque.png');
  for (const [file, extra] of [[a, []], [b, ['--background', 'opaque']]] as const) {
    const r = await runKlein(['generate', PROMPT, '-m', model, ...SIZE, '-o', file, '-q', ...extra], { KLEIN_HOME: home });
    assert.equal(r.code, 0, r.stderr);
  }
  assert.ok(fs.readFileSync(a).equals(fs.readFileSync(b)));
  assert.equal((await raw(b)).channels, 3);
});

test('jpeg + transparent is a usage error (exit 2) before anything loads, and no file is written', async () => {
  for (const args of [['-o', path.join(work, 'x.jpg')], ['-o', path.join(work, 'y'), '--format', 'jpeg']]) {
    const r = await runKlein(['generate', PROMPT, '-m', model, ...SIZE, '--background', 'transparent', ...args], { KLEIN_HOME: home });
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /--background transparent needs a PNG or WebP output \(JPEG has no alpha channel\)/);
    assert.doesNotMatch(r.stderr, /load|denoise/);
  }
  assert.ok(!fs.existsSync(path.join(work, 'x.jpg')) && !fs.existsSync(path.join(work, 'y')));
  const bad = await runKlein(['generate', PROMPT, '-m', model, '--background', 'clear', '-o', path.join(work, 'z.png')]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--background.*clear.*auto, opaque, transparent/);
});

test('no matting weights: exit 2 naming `klein pull --matting`, before any generation', async () => {
  // a tiny klein without its matting/ folder, and nothing in the cache
  const bare = path.join(work, 'bare');
  const made = await runKlein(['dev', 'make-tiny-model', bare, '--seed', '5', '--no-matting']);
  assert.equal(made.code, 0, made.stderr);
  assert.doesNotMatch(made.stdout, /matting/);
  assert.ok(!fs.existsSync(path.join(bare, 'matting')));
  const out = path.join(work, 'missing.png');
  const r = await runKlein(['generate', PROMPT, '-m', bare, ...SIZE, '--background', 'transparent', '-o', out], { KLEIN_HOME: home, KLEIN_MATTING_MODEL: undefined });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /needs the matting model \(ZhengPeng7\/BiRefNet-matting.*Run `klein pull --matting`/);
  assert.doesNotMatch(r.stderr, /denoise|encode text/, 'fails before generating');
  assert.ok(!fs.existsSync(out));
  // $KLEIN_MATTING_MODEL makes the same folder work
  const ok = await runKlein(['generate', PROMPT, '-m', bare, ...SIZE, '--background', 'transparent', '-o', out, '-q'], { KLEIN_HOME: home, KLEIN_MATTING_MODEL: path.join(model, 'matting') });
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal((await raw(out)).channels, 4);
});
