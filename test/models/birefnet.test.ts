import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BIREFNET_CONFIGS, defaultInputSize, inferBiRefNetConfig, type BiRefNetConfig } from '../../src/models/birefnet/config.ts';
import { BiRefNetWeights, biRefNetStateDictShapes } from '../../src/models/birefnet/checkpoint.ts';
import { BiRefNet } from '../../src/models/birefnet/runtime.ts';
import { relativePositionIndex, shiftRegionIds } from '../../src/models/birefnet/swin.ts';
import { writeRandomBiRefNetCheckpoint } from '../../src/fixtures/birefnet.ts';
import { MattingPredictor } from '../../src/pipeline/matting-model.ts';
import { pilResize, resizeBilinearAlignCorners } from '../../src/pipeline/image-resize.ts';
import { cpuTarget } from '../../src/runtime/target.ts';
import { GoldenCase } from '../../src/conform/golden.ts';
import { compareRelative } from '../../src/conform/compare.ts';
import { Checkpoint, readFloat32, readInt64, writeSafetensors, f32ToF16, type TensorToWrite } from '../../src/weights/safetensors.ts';
import { GOLDEN_DIR as GOLDEN } from '../golden.ts';

const MODEL = path.join(GOLDEN, 'birefnet/model.safetensors');
const target = cpuTarget();

// weight stores and compiled graphs of this file's checkpoints (some in temporary folders) go to a fresh root
const cacheRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-birefnet-cache-'));
process.env.KLEIN_CACHE_DIR = cacheRoot;
after(() => fs.rmSync(cacheRoot, { recursive: true, force: true }));

function tmpdir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'klein-birefnet-'));
}

/** A synthetic photo: a bright disc on a darker gradient. */
function discImage(w: number, h: number): Uint8Array {
  const img = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const inside = (x - w / 2) ** 2 + (y - h / 2) ** 2 < (Math.min(w, h) / 3) ** 2;
      const i = (y * w + x) * 3;
      img[i] = inside ? 230 : 40 + x % 50;
      img[i + 1] = inside ? 180 : 60 + y % 40;
      img[i + 2] = inside ? 30 : 90;
    }
  }
  return img;
}

test('geometry is read from the weight shapes of the golden checkpoint', () => {
  const cfg = inferBiRefNetConfig(new BiRefNetWeights(Checkpoint.open(MODEL)));
  assert.deepEqual(cfg, BIREFNET_CONFIGS.tiny);
});

test('the state-dict layout matches the reference: the golden key set and the real Swin-L / Swin-T entry counts', () => {
  const golden = Checkpoint.open(MODEL);
  const mine = biRefNetStateDictShapes(BIREFNET_CONFIGS.tiny);
  assert.equal(mine.length, golden.names.length);
  for (const [key, shape, dtype] of mine) {
    const t = golden.info(key);
    assert.deepEqual(t.shape, shape, key);
    assert.equal(t.dtype, dtype, key);
  }
  // entry counts of the published checkpoints (transparency.md §4.3)
  assert.equal(biRefNetStateDictShapes(BIREFNET_CONFIGS.full).length, 754);
  assert.equal(biRefNetStateDictShapes(BIREFNET_CONFIGS.lite).length, 586);
  const params = (cfg: BiRefNetConfig) => biRefNetStateDictShapes(cfg).filter(([, , d]) => d === 'F32').reduce((n, [k, s]) => n + (/running_|num_batches/.test(k) ? 0 : s.reduce((a, b) => a * b, 1)), 0);
  assert.equal(params(BIREFNET_CONFIGS.tiny), 873_578);
  assert.ok(Math.abs(params(BIREFNET_CONFIGS.full) / 1e6 - 220.2) < 0.5, `full: ${params(BIREFNET_CONFIGS.full)}`);
  assert.ok(Math.abs(params(BIREFNET_CONFIGS.lite) / 1e6 - 44.3) < 0.5, `lite: ${params(BIREFNET_CONFIGS.lite)}`);
});

test('relative position index and shift regions match the reference buffers and bands', () => {
  const golden = Checkpoint.open(MODEL);
  const stored = readInt64(golden.info('bb.layers.2.blocks.1.attn.relative_position_index'));
  assert.deepEqual(relativePositionIndex(7), Array.from(stored, Number));
  // 14×7 padded map, window 7, shift 3: rows 0–6 band 0, 7–10 band 1, 11–13 band 2; columns all in bands 1/2
  const ids = shiftRegionIds(14, 7, 7, 3);
  assert.equal(ids.length, 2 * 49);
  assert.deepEqual([ids[0], ids[3], ids[4], ids[49], ids[49 + 4 * 7], ids[49 + 4 * 7 + 6]], [1, 1, 2, 4, 7, 8]);
});

test('intermediates of the non-square case match the reference (padding in both directions, odd patch merging)', async () => {
  const gc = new GoldenCase(path.join(GOLDEN, 'birefnet/case2.safetensors'));
  const model = await BiRefNet.load(MODEL, { target, inputSize: [96, 160], debug: true });
  try {
    const out = await model.run(gc.f32('input'), 96, 160);
    const names = Object.keys(out.debug).filter((n) => gc.has(n));
    assert.ok(names.length >= 20, names.join(', '));
    for (const n of names) {
      const c = compareRelative(out.debug[n], gc.f32(n), 1e-4);
      assert.ok(c.passed, `${n}: ${c.maxAbsErr} > ${c.tolerance}`);
    }
  } finally {
    await model.close();
  }
});

test('an fp32 checkpoint is used in place: the weight store hard-links it and converts nothing', async () => {
  const model = await BiRefNet.load(MODEL, { target, inputSize: 64 });
  await model.close();
  const root = path.join(cacheRoot, 'weights');
  const ino = fs.statSync(MODEL).ino;
  const linksModel = (dir: string) => fs.existsSync(path.join(dir, 'src')) && fs.readdirSync(path.join(dir, 'src')).some((f) => fs.statSync(path.join(dir, 'src', f)).ino === ino);
  const stores = fs.readdirSync(root).filter((n) => n.startsWith('birefnet-fp32-')).map((n) => path.join(root, n)).filter(linksModel);
  assert.equal(stores.length, 1, 'one weight store links the golden checkpoint');
  assert.equal(fs.statSync(path.join(stores[0], 'weights.bin')).size, 0, 'no weight was converted');
});

test('DataParallel / torch.compile key prefixes are stripped', async () => {
  const dir = tmpdir();
  try {
    const golden = Checkpoint.open(MODEL);
    const tensors: Record<string, TensorToWrite> = {};
    for (const name of golden.names) {
      const t = golden.info(name);
      tensors[`module._orig_mod.${name}`] = { dtype: t.dtype, shape: t.shape, data: t.dtype === 'I64' ? readInt64(t) : readFloat32(t) };
    }
    writeSafetensors(path.join(dir, 'model.safetensors'), tensors);
    const gc = new GoldenCase(path.join(GOLDEN, 'birefnet/case1.safetensors'));
    const model = await BiRefNet.load(dir, { target, inputSize: 128 });
    try {
      const { logits } = await model.run(gc.f32('input'), 128, 128);
      const c = compareRelative(logits, gc.f32('logits'), 1e-4);
      assert.ok(c.passed, `${c.maxAbsErr} > ${c.tolerance}`);
    } finally {
      await model.close();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('an fp16 checkpoint is widened to fp32 once in the weight store and stays close to the fp32 reference', async () => {
  const dir = tmpdir();
  try {
    const golden = Checkpoint.open(MODEL);
    const tensors: Record<string, TensorToWrite> = {};
    for (const name of golden.names) {
      const t = golden.info(name);
      tensors[name] = t.dtype === 'I64' ? { dtype: 'I64', shape: t.shape, data: readInt64(t) } : { dtype: 'F16', shape: t.shape, data: f32ToF16(readFloat32(t)) };
    }
    writeSafetensors(path.join(dir, 'model.safetensors'), tensors);
    const gc = new GoldenCase(path.join(GOLDEN, 'birefnet/case1.safetensors'));
    const model = await BiRefNet.load(dir, { target, inputSize: 128 });
    try {
      const { alpha } = await model.run(gc.f32('input'), 128, 128);
      // fp16 weight rounding alone (measured 0.024 with these random weights); a wrong cast would be far off
      const c = compareRelative(alpha, gc.f32('alpha'), 0.1);
      assert.ok(c.passed && c.maxAbsErr > 0, `max err ${c.maxAbsErr}`);
    } finally {
      await model.close();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('random tiny matting weights: real layout, deterministic, a soft non-constant matte through predict()', async () => {
  const dir = tmpdir();
  try {
    const a = path.join(dir, 'a', 'model.safetensors');
    const b = path.join(dir, 'b', 'model.safetensors');
    writeRandomBiRefNetCheckpoint(a, BIREFNET_CONFIGS.tiny, { seed: 7 });
    writeRandomBiRefNetCheckpoint(b, BIREFNET_CONFIGS.tiny, { seed: 8 });
    const again = path.join(dir, 'again.safetensors');
    writeRandomBiRefNetCheckpoint(again, BIREFNET_CONFIGS.tiny, { seed: 7 });
    assert.ok(fs.readFileSync(a).equals(fs.readFileSync(again)), 'same seed, same bytes');
    const ck = Checkpoint.open(a);
    assert.deepEqual(inferBiRefNetConfig(new BiRefNetWeights(ck)), BIREFNET_CONFIGS.tiny);
    assert.deepEqual(new Set(ck.names), new Set(Checkpoint.open(MODEL).names));

    const w = 90, h = 70;
    const img = discImage(w, h);
    const model = await MattingPredictor.load(a, { target, inputSize: 64 });
    const other = await MattingPredictor.load(b, { target, inputSize: 64 });
    try {
      const alpha = await model.predict(img, w, h);
      assert.equal(alpha.length, w * h);
      let min = 1, max = 0;
      for (const v of alpha) { min = Math.min(min, v); max = Math.max(max, v); }
      assert.ok(min >= 0 && max <= 1, `range ${min}..${max}`);
      assert.ok(max - min > 0.05, `matte is nearly constant: ${min}..${max}`);
      assert.deepEqual(await model.predict(img, w, h), alpha);
      const alphaOther = await other.predict(img, w, h);
      assert.notDeepEqual(alphaOther, alpha);
      // float NCHW input in [0, 1] is quantised to the same 8-bit image
      const nchw = new Float32Array(3 * w * h);
      for (let i = 0; i < w * h; i++) for (let c = 0; c < 3; c++) nchw[c * w * h + i] = img[i * 3 + c] / 255;
      assert.deepEqual(await model.predict(nchw, w, h), alpha);
      // RGBA input: the alpha channel is ignored
      const rgba = new Uint8Array(w * h * 4);
      for (let i = 0; i < w * h; i++) { rgba.set(img.subarray(i * 3, i * 3 + 3), i * 4); rgba[i * 4 + 3] = 17; }
      assert.deepEqual(await model.predict(rgba, w, h), alpha);
    } finally {
      await model.close();
      await other.close();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the default input size follows the checkpoint name', () => {
  assert.equal(defaultInputSize('/models/BiRefNet-matting/model.safetensors'), 1024);
  assert.equal(defaultInputSize('/models/BiRefNet_HR-matting/model.safetensors'), 2048);
  assert.equal(defaultInputSize('/models/birefnet/BiRefNet_HR.safetensors'), 2048);
  assert.equal(defaultInputSize('/models/BiRefNet_dynamic'), 'dynamic');
  assert.equal(defaultInputSize('/models/THREE/model.safetensors'), 1024);
});

test('dynamic input size follows the image, rounded to a multiple of 32', async () => {
  const model = await MattingPredictor.load(MODEL, { target, inputSize: 'dynamic' });
  try {
    assert.deepEqual(model.net.modelSize(200, 150), [160, 192]);
    const alpha = await model.predict(discImage(70, 40), 70, 40);
    assert.equal(alpha.length, 70 * 40);
  } finally {
    await model.close();
  }
});

test('bad input gets clear errors', async () => {
  await assert.rejects(BiRefNet.load(path.join(GOLDEN, 'vae/model.safetensors'), { target, inputSize: 64 }), /not a BiRefNet checkpoint.*bb\.patch_embed\.proj\.weight/);
  await assert.rejects(BiRefNet.load(path.join(os.tmpdir(), 'no-such-birefnet.safetensors'), { target }), /cannot open BiRefNet weights/);
  await assert.rejects(BiRefNet.load(MODEL, { target, inputSize: 100 }), /multiple of 32/);
  const model = await MattingPredictor.load(MODEL, { target, inputSize: 64 });
  try {
    await assert.rejects(model.predict(new Uint8Array(10), 4, 4), /expected 4×4×3/);
    await assert.rejects(model.predict(new Uint8Array(48), 0, 4), /bad image size/);
    await assert.rejects(model.predict(new Float32Array(10), 4, 4), /NCHW/);
    await assert.rejects(model.run(new Float32Array(10), 64, 64), /expected 1×3×64×64/);
  } finally {
    await model.close();
  }
});

test('resizers: Pillow resize keeps a same-size image, upsamples a constant to the constant; align-corners keeps corners', () => {
  const img = discImage(9, 5);
  assert.deepEqual(pilResize(img, 9, 5, 3, 9, 5), img);
  const flat = new Uint8Array(4 * 3 * 3).fill(77);
  for (const f of ['bilinear', 'bicubic'] as const) assert.ok(pilResize(flat, 4, 3, 3, 13, 11, f).every((v) => v === 77));
  const src = Float32Array.from([0, 1, 2, 3, 4, 5], (v) => v / 5);
  const up = resizeBilinearAlignCorners(src, 3, 2, 5, 4);
  assert.equal(up[0], 0);
  assert.ok(Math.abs(up[4] - 0.4) < 1e-7 && Math.abs(up[19] - 1) < 1e-7);
  assert.ok(Math.abs(up[2] - 0.2) < 1e-7, `middle of the top row: ${up[2]}`);
});
