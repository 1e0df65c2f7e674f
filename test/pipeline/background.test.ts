// The pieces of `background: "transparent"` that need no model: request validation, the prompt hint and RGBA
// encoding (PNG exact, WebP with a lossless alpha plane, JPEG refused).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import sharp from 'sharp';
import { TRANSPARENT_PROMPT_HINT, promptForBackground, transparentPrompt } from '../../src/pipeline/background.ts';
import { encodeImage } from '../../src/pipeline/images.ts';
import { PipelineInputError, resolveRequest } from '../../src/pipeline/request.ts';
import type { GenerateRequest } from '../../src/pipeline/types.ts';
import { VARIANTS } from '../../src/weights/model-folder.ts';

const base: GenerateRequest = { prompt: 'a fox', width: 64, height: 64, seed: 1, numImages: 1, outputFormat: 'png' };

test('background: auto and opaque resolve to opaque, transparent stays; jpeg + transparent and unknown values are refused', () => {
  const v = VARIANTS['klein-4b'];
  assert.equal(resolveRequest(base, v).background, 'opaque');
  assert.equal(resolveRequest({ ...base, background: 'auto' }, v).background, 'opaque');
  assert.equal(resolveRequest({ ...base, background: 'opaque', outputFormat: 'jpeg' }, v).background, 'opaque');
  assert.equal(resolveRequest({ ...base, background: 'transparent' }, v).background, 'transparent');
  assert.equal(resolveRequest({ ...base, background: 'transparent', outputFormat: 'webp' }, v).background, 'transparent');
  assert.throws(
    () => resolveRequest({ ...base, background: 'transparent', outputFormat: 'jpeg' }, v),
    (e: unknown) => e instanceof PipelineInputError && e.code === 'transparent_needs_alpha_format' && e.field === 'outputFormat' && /needs png or webp.*jpeg has no alpha/.test(e.message),
  );
  assert.throws(
    () => resolveRequest({ ...base, background: 'clear' as never }, v),
    (e: unknown) => e instanceof PipelineInputError && e.code === 'invalid_background' && e.field === 'background' && /auto, opaque, transparent/.test(e.message),
  );
});

test('the transparent prompt: backdrop wording that paints checkerboards is dropped, the hint is appended', () => {
  assert.equal(transparentPrompt('a red fox'), `a red fox, ${TRANSPARENT_PROMPT_HINT}`);
  assert.equal(transparentPrompt('a red fox on a transparent background.'), `a red fox, ${TRANSPARENT_PROMPT_HINT}`);
  assert.equal(transparentPrompt('a transparent PNG of a cat, checkerboard background'), `a cat, ${TRANSPARENT_PROMPT_HINT}`);
  // "transparent" describing the subject is kept: glass stays glass
  assert.equal(transparentPrompt('a transparent glass vase'), `a transparent glass vase, ${TRANSPARENT_PROMPT_HINT}`);
  assert.equal(transparentPrompt('  '), TRANSPARENT_PROMPT_HINT);
  assert.equal(promptForBackground('a fox', 'opaque'), 'a fox');
  assert.equal(promptForBackground('a fox', 'transparent'), transparentPrompt('a fox'));
  assert.doesNotMatch(TRANSPARENT_PROMPT_HINT, /transparent|checker|alpha/i);
});

test('RGBA encodes to PNG exactly and to WebP with the alpha plane intact; JPEG refuses RGBA', async () => {
  const w = 48, h = 32;
  const rgba = new Uint8Array(w * h * 4);
  for (let i = 0; i < w * h; i++) {
    const x = i % w;
    rgba.set([200, (x * 5) % 256, 40, (x * 37 + i) % 256], i * 4);
  }
  const img = { data: rgba, width: w, height: h, channels: 4 as const };
  const png = await encodeImage(img, 'png');
  const p = await sharp(png).raw().toBuffer({ resolveWithObject: true });
  assert.equal(p.info.channels, 4);
  assert.deepEqual(new Uint8Array(p.data), rgba);
  const webp = await encodeImage(img, 'webp', { quality: 80 });
  assert.equal((await sharp(webp).metadata()).hasAlpha, true);
  const q = await sharp(webp).raw().toBuffer({ resolveWithObject: true });
  assert.equal(q.info.channels, 4);
  for (let i = 0; i < w * h; i++) assert.equal(q.data[i * 4 + 3], rgba[i * 4 + 3], `alpha of pixel ${i}`);
  await assert.rejects(encodeImage(img, 'jpeg'), /JPEG has no alpha channel/);
  await assert.rejects(encodeImage({ ...img, data: rgba.subarray(1) }, 'png'), /RGBA image of 48×32 needs 6144 bytes/);
  // RGB input is untouched by the RGBA path: same bytes as before it existed (3 channels, no alpha)
  const rgb = { data: new Uint8Array(w * h * 3).fill(9), width: w, height: h };
  assert.equal((await sharp(await encodeImage(rgb, 'webp')).metadata()).hasAlpha, false);
});
