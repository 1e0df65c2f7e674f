import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import sharp from 'sharp';
import { GoldenCase } from '../../src/conform/golden.ts';
import {
  capPixelsSize, centreCropBox, decodeImage, encodeImage, ImageInputError, prepareReferenceImage, probeImage, referencePixelLimit, rgbToTensor,
  sniffFormat, tensorToRgb, toUint8Round, toUint8Truncate, type ImageErrorCode, type RgbImage,
} from '../../src/pipeline/images.ts';
import { Flux2VAE } from '../../src/models/vae/runtime.ts';
import { cpuTarget } from '../../src/runtime/target.ts';

import { GOLDEN_DIR as GOLDEN } from '../golden.ts';

/** A deterministic test picture: red rises left→right, green top→bottom, blue is a checkerboard. */
function pattern(width: number, height: number): RgbImage {
  const data = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++)
    for (let x = 0; x < width; x++) {
      const i = 3 * (y * width + x);
      data[i] = Math.round((255 * x) / Math.max(1, width - 1));
      data[i + 1] = Math.round((255 * y) / Math.max(1, height - 1));
      data[i + 2] = ((x >> 3) + (y >> 3)) % 2 ? 200 : 30;
    }
  return { data, width, height };
}

async function expectCode(p: Promise<unknown>, code: ImageErrorCode, msg: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof ImageInputError, `expected ImageInputError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, msg);
    return true;
  });
}

test('uint8 rules reproduce the golden pipeline images exactly (BFL truncation and diffusers round-half-even)', () => {
  for (const name of ['t2i', 'edit', 't2i_base_cfg']) {
    const c = new GoldenCase(path.join(GOLDEN, `pipeline/${name}.safetensors`));
    const decoded = c.f32('decoded');
    const dims = c.shape('decoded');
    const bfl = tensorToRgb(decoded, dims, 0, 'truncate');
    const round = tensorToRgb(decoded, dims, 0, 'round');
    assert.deepEqual(bfl.data, c.u8('image_uint8_bfl'), `${name} truncate`);
    assert.deepEqual(round.data, c.u8('image_uint8_diffusers_round'), `${name} round`);
    let differ = 0;
    for (let i = 0; i < bfl.data.length; i++) differ += bfl.data[i] !== round.data[i] ? 1 : 0;
    assert.ok(differ > 0.3 * bfl.data.length, `${name}: the rules should differ in many pixels (${differ})`);
  }
  // the half-to-even tie and the clamps
  // 255·(x/2 + 0.5) = 64.5 exactly in float32: a tie, rounded to the even 64 (Math.round would give 65)
  assert.equal(toUint8Round(-0.4941176176071167), 64);
  assert.equal(toUint8Round(0), 128); // 127.5 → 128
  assert.equal(toUint8Truncate(0), 127);
  assert.equal(toUint8Round(-2), 0);
  assert.equal(toUint8Round(3), 255);
  assert.equal(toUint8Truncate(1), 255);
  assert.equal(toUint8Truncate(-1.5), 0);
  assert.equal(toUint8Truncate(Number.NaN), 0);
});

test('uint8 → [-1, 1] is the reference arithmetic (golden encode input and edit reference tensor)', () => {
  const enc = new GoldenCase(path.join(GOLDEN, 'vae/encode_case.safetensors'));
  const [h, w] = enc.shape('image_uint8_hwc');
  assert.deepEqual(rgbToTensor({ data: enc.u8('image_uint8_hwc'), width: w, height: h }).data, enc.f32('x'));
  const edit = new GoldenCase(path.join(GOLDEN, 'pipeline/edit.safetensors'));
  const [eh, ew] = edit.shape('ref_image_uint8_hwc');
  const t = rgbToTensor({ data: edit.u8('ref_image_uint8_hwc'), width: ew, height: eh });
  assert.deepEqual(t.dims, edit.shape('ref_image_tensor'));
  assert.deepEqual(t.data, edit.f32('ref_image_tensor'));
});

test('a PNG of the golden reference image preprocesses to the golden reference tensor', async () => {
  const edit = new GoldenCase(path.join(GOLDEN, 'pipeline/edit.safetensors'));
  const [h, w] = edit.shape('ref_image_uint8_hwc');
  const png = await encodeImage({ data: edit.u8('ref_image_uint8_hwc'), width: w, height: h }, 'png');
  const ref = await prepareReferenceImage(png, { numReferences: 1 });
  assert.deepEqual(ref.dims, edit.shape('ref_image_tensor'));
  assert.deepEqual(ref.tensor, edit.f32('ref_image_tensor'));
});

test('PNG, JPEG and WebP round-trip: sizes, RGB channel order, value ranges, quality', async () => {
  const img = pattern(96, 64);
  const t = rgbToTensor(img);
  assert.deepEqual(t.dims, [1, 3, 64, 96]);
  // channel 0 is red: it rises left → right; channel 1 (green) top → bottom
  const plane = 64 * 96;
  assert.equal(t.data[0], -1);
  assert.equal(t.data[95], 1);
  assert.equal(t.data[plane + 63 * 96], 1);
  assert.ok(t.data.every((v) => v >= -1 && v <= 1));
  assert.deepEqual(tensorToRgb(t.data, t.dims).data, img.data);
  // BFL truncation is not an exact inverse of u/255: 127.5·(2u/255 − 1 + 1) lands just below u for some u
  const trunc = tensorToRgb(t.data, t.dims, 0, 'truncate').data;
  assert.ok(trunc.every((v, i) => v === img.data[i] || v === img.data[i] - 1));
  assert.ok(trunc.some((v, i) => v !== img.data[i]));

  const png = await encodeImage(img, 'png');
  assert.equal(sniffFormat(png), 'png');
  assert.deepEqual((await decodeImage(png)).data, img.data);
  for (const format of ['jpeg', 'webp'] as const) {
    const hi = await encodeImage(img, format, { quality: 95 });
    const lo = await encodeImage(img, format, { quality: 20 });
    assert.equal(sniffFormat(hi), format);
    assert.ok(lo.length < hi.length, `${format}: quality 20 (${lo.length} B) should be smaller than 95 (${hi.length} B)`);
    const back = await decodeImage(hi);
    assert.equal(back.width, 96);
    assert.equal(back.height, 64);
    let err = 0;
    for (let i = 0; i < img.data.length; i++) err += Math.abs(back.data[i] - img.data[i]);
    // lossy WebP always subsamples chroma, which costs the sharp-edged blue checkerboard a few levels
    assert.ok(err / img.data.length < (format === 'jpeg' ? 3 : 8), `${format} q95 mean abs error ${err / img.data.length}`);
  }
  await assert.rejects(encodeImage(img, 'jpeg', { quality: 0 }), /quality must be an integer from 1 to 100/);
  await assert.rejects(encodeImage(img, 'webp', { quality: 101 }), /quality/);
});

test('images go through the VAE helpers: encode → latent [1,128,H/16,W/16] → decode → [1,3,H,W] → PNG', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-vae-img-'));
  try {
    fs.copyFileSync(path.join(GOLDEN, 'vae/model.safetensors'), path.join(dir, 'ae.safetensors'));
    const vae = await Flux2VAE.load(dir, { target: cpuTarget() });
    const png = await encodeImage(pattern(96, 64), 'png');
    const ref = await prepareReferenceImage(png);
    const enc = await vae.encode(ref.tensor, ref.dims);
    assert.deepEqual(enc.dims, [1, 128, 4, 6]);
    assert.ok(enc.latent.every(Number.isFinite));
    const dec = await vae.decode(enc.latent, enc.dims);
    assert.deepEqual(dec.dims, [1, 3, 64, 96]);
    const out = tensorToRgb(dec.image, dec.dims);
    const bytes = await encodeImage(out, 'png');
    const probe = await probeImage(bytes);
    assert.deepEqual([probe.width, probe.height, probe.format], [96, 64, 'png']);
    await vae.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('reference preprocessing: centre-crop to multiples of 16 and the pixel caps', async () => {
  // 100 wide × 72 high → 96 × 64, offset (2, 4)
  const img = pattern(100, 72);
  const ref = await prepareReferenceImage(await encodeImage(img, 'png'));
  assert.deepEqual(ref.dims, [1, 3, 64, 96]);
  const expected = new Uint8Array(96 * 64 * 3);
  for (let y = 0; y < 64; y++) expected.set(img.data.subarray(3 * ((y + 4) * 100 + 2), 3 * ((y + 4) * 100 + 2 + 96)), 3 * y * 96);
  assert.deepEqual(tensorToRgb(ref.tensor, ref.dims).data, expected);
  assert.deepEqual(centreCropBox(100, 72), { left: 2, top: 4, width: 96, height: 64 });

  assert.equal(referencePixelLimit(1), 2024 * 2024);
  assert.equal(referencePixelLimit(3), 1024 * 1024);
  assert.deepEqual(capPixelsSize(800, 600, 1024 * 1024), { width: 800, height: 600 });
  assert.deepEqual(capPixelsSize(1100, 1000, 1024 * 1024), { width: 1073, height: 976 });
  // several references: 1100×1000 is scaled to 1073×976 (LANCZOS), then cropped to 1072×976
  const big = await encodeImage(pattern(1100, 1000), 'png');
  const several = await prepareReferenceImage(big, { numReferences: 2 });
  assert.deepEqual([several.width, several.height], [1072, 976]);
  const single = await prepareReferenceImage(big, { numReferences: 1 });
  assert.deepEqual([single.width, single.height], [1088, 992]);
});

test('EXIF orientation is applied and alpha is composited onto white', async () => {
  // stored 80 wide × 64 high, black with a red band on the left; orientation 6 = rotate 90° clockwise for display
  const stored = new Uint8Array(80 * 64 * 3);
  for (let y = 0; y < 64; y++) for (let x = 0; x < 16; x++) stored.set([255, 0, 0], 3 * (y * 80 + x));
  const jpeg = await sharp(stored, { raw: { width: 80, height: 64, channels: 3 } }).jpeg({ quality: 100, chromaSubsampling: '4:4:4' }).withMetadata({ orientation: 6 }).toBuffer();
  const probe = await probeImage(jpeg);
  assert.deepEqual([probe.width, probe.height], [64, 80]);
  const shown = await decodeImage(jpeg);
  assert.deepEqual([shown.width, shown.height], [64, 80]);
  // the stored left band is now at the top, the bottom is black
  for (let x = 0; x < 64; x += 9) {
    const [r, g, b] = shown.data.subarray(3 * x, 3 * x + 3);
    assert.ok(r > 230 && g < 30 && b < 30, `top row pixel ${x} = ${r},${g},${b}`);
    const [r2] = shown.data.subarray(3 * (79 * 64 + x), 3 * (79 * 64 + x) + 3);
    assert.ok(r2 < 30, `bottom row pixel ${x} red = ${r2}`);
  }

  const rgba = new Uint8Array(4 * 4 * 4);
  for (let i = 0; i < 16; i++) rgba.set(i < 8 ? [0, 0, 0, 0] : [10, 20, 30, 255], 4 * i);
  const png = await sharp(rgba, { raw: { width: 4, height: 4, channels: 4 } }).png().toBuffer();
  const flat = await decodeImage(png);
  assert.deepEqual(Array.from(flat.data.subarray(0, 3)), [255, 255, 255]);
  assert.deepEqual(Array.from(flat.data.subarray(3 * 15, 3 * 16)), [10, 20, 30]);
  const onBlack = await decodeImage(png, { background: { r: 0, g: 0, b: 0 } });
  assert.deepEqual(Array.from(onBlack.data.subarray(0, 3)), [0, 0, 0]);
  // grey images come out as RGB too
  const grey = await sharp(new Uint8Array(64).fill(77), { raw: { width: 8, height: 8, channels: 1 } }).png().toBuffer();
  assert.deepEqual(Array.from((await decodeImage(grey)).data.subarray(0, 3)), [77, 77, 77]);
});

/** A PNG whose header claims `w`×`h` pixels, followed by a tiny (invalid) body: a decompression bomb's header. */
function bombPng(w: number, h: number): Uint8Array {
  const chunk = (type: string, body: Buffer) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(body.length);
    const tb = Buffer.concat([Buffer.from(type, 'latin1'), body]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(zlib.crc32(tb));
    return Buffer.concat([len, tb, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const idat = zlib.deflateSync(Buffer.alloc(1024));
  return new Uint8Array(Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', ihdr), chunk('IDAT', idat), chunk('IEND', Buffer.alloc(0))]));
}

test('bad inputs get clear, typed errors', async () => {
  await expectCode(decodeImage(new TextEncoder().encode('hello, I am not an image at all')), 'not_an_image', /not a PNG, JPEG or WebP/);
  await expectCode(decodeImage(new Uint8Array(0)), 'not_an_image', /empty/);
  const gif = await sharp(pattern(8, 8).data, { raw: { width: 8, height: 8, channels: 3 } }).gif().toBuffer();
  await expectCode(decodeImage(gif), 'unsupported_format', /GIF images are not supported/);
  await expectCode(decodeImage(new TextEncoder().encode('<svg xmlns="http://www.w3.org/2000/svg"/>')), 'unsupported_format', /SVG/);

  const png = await encodeImage(pattern(256, 256), 'png');
  await expectCode(decodeImage(png.subarray(0, Math.floor(png.length / 2))), 'truncated_image', /truncated/);
  const jpeg = await encodeImage(pattern(256, 256), 'jpeg', { quality: 90 });
  await expectCode(decodeImage(jpeg.subarray(0, Math.floor(jpeg.length / 2))), 'truncated_image', /truncated/);
  const webp = await encodeImage(pattern(256, 256), 'webp', { quality: 90 });
  await expect(webp.subarray(0, Math.floor(webp.length / 2)));
  await expectCode(decodeImage(png.subarray(0, 20)), 'truncated_image', /truncated/);

  // 40 000 × 40 000 = 1.6 G pixels claimed by a 1 KB file: refused from the header, before any decoding
  const bomb = bombPng(40000, 40000);
  assert.ok(bomb.length < 2000);
  const t0 = performance.now();
  await expectCode(decodeImage(bomb), 'image_too_large', /1600000000 pixels, more than the limit of 50000000/);
  assert.ok(performance.now() - t0 < 1000);
  await expectCode(prepareReferenceImage(png, { maxPixels: 1000 }), 'image_too_large', /limit of 1000/);

  const small = await encodeImage(pattern(50, 100), 'png');
  await expectCode(prepareReferenceImage(small), 'image_too_small', /50×100; both sides must be at least 64/);
  const wide = await encodeImage(pattern(600, 64), 'png');
  await expectCode(prepareReferenceImage(wide), 'bad_aspect_ratio', /600×64; the aspect ratio must be at most 8:1/);

  async function expect(bytes: Uint8Array) {
    await assert.rejects(decodeImage(bytes), (e: unknown) => e instanceof ImageInputError && (e.code === 'truncated_image' || e.code === 'invalid_image'));
  }
});
