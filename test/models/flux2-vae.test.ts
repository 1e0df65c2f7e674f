import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Checkpoint } from '../../src/weights/safetensors.ts';
import { detectVaeLayout, inferVaeConfig, vaeTensorShapes } from '../../src/models/vae/checkpoint.ts';
import { FLUX2_VAE_CONFIG, type Flux2VaeConfig } from '../../src/models/vae/config.ts';
import { Flux2VAE } from '../../src/models/vae/runtime.ts';
import { decodeTiled, planTiles } from '../../src/models/vae/tiling.ts';
import { writeRandomVaeCheckpoint } from '../../src/fixtures/vae.ts';
import { cpuTarget } from '../../src/runtime/target.ts';
import { GoldenCase } from '../../src/conform/golden.ts';
import { compareRelative } from '../../src/conform/compare.ts';

import { GOLDEN_DIR as GOLDEN } from '../golden.ts';
// weight stores of this file's temporary checkpoints go to a cache folder of their own
const cacheRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-vae-cache-'));
process.env.KLEIN_CACHE_DIR = cacheRoot;
after(() => fs.rmSync(cacheRoot, { recursive: true, force: true }));

/** The `weights.bin` of each weight store of `component` (`flux2-vae-decoder-fp32`) and the inodes it links. */
function stores(component: string): Array<{ converted: number; links: number[] }> {
  const root = path.join(cacheRoot, 'weights');
  return fs
    .readdirSync(root)
    .filter((n) => n.startsWith(`${component}-`) && !n.includes('.tmp-'))
    .map((n) => {
      const src = path.join(root, n, 'src');
      const links = fs.existsSync(src) ? fs.readdirSync(src).map((f) => fs.statSync(path.join(src, f)).ino) : [];
      return { converted: fs.statSync(path.join(root, n, 'weights.bin')).size, links };
    });
}

test('the real VAE config has the tensors and parameters of spec §0/§3.4 (251 and 84 046 372 with bn.num_batches_tracked)', () => {
  const shapes = vaeTensorShapes(FLUX2_VAE_CONFIG);
  const n = shapes.reduce((a, [, s]) => a + s.reduce((x, y) => x * y, 1), 0);
  // the spec's counts include the 0-d int64 bn.num_batches_tracked, which the graphs never read
  assert.equal(shapes.length + 1, 251);
  assert.equal(n + 1, 84046372);
});

test('tile plans cover the latent with even, overlapping tiles', () => {
  assert.deepEqual(planTiles(64, 96, 8), { starts: [0], size: 64 });
  const p = planTiles(128, 96, 8);
  assert.deepEqual(p, { starts: [0, 60], size: 68 });
  const q = planTiles(300, 96, 8);
  assert.equal(q.starts.length, 4);
  assert.equal(q.starts[q.starts.length - 1] + q.size, 300);
  for (let i = 1; i < q.starts.length; i++) assert.ok(q.starts[i - 1] + q.size - q.starts[i] >= 8);
  assert.throws(() => planTiles(100, 8, 8), /overlap 8 must be smaller/);
});

test('tiled blending is exact for a decoder without spatial context', async () => {
  // a "decoder" that maps each latent cell to a 16×16 block of its first three channels: with no context, the
  // cross-faded tiles must reproduce the one-shot result to rounding
  const local = async (lat: Float32Array, dims: number[]) => {
    const [B, C, h, w] = dims;
    const out = new Float32Array(B * 3 * h * 16 * w * 16);
    for (let b = 0; b < B; b++)
      for (let c = 0; c < 3; c++)
        for (let y = 0; y < h * 16; y++)
          for (let x = 0; x < w * 16; x++) out[((b * 3 + c) * h * 16 + y) * w * 16 + x] = lat[((b * C + c) * h + (y >> 4)) * w + (x >> 4)];
    return out;
  };
  const dims = [2, 8, 13, 21];
  const lat = Float32Array.from({ length: 2 * 8 * 13 * 21 }, (_, i) => Math.sin(i * 0.37));
  const whole = await local(lat, dims);
  let tiles = 0;
  const tiled = await decodeTiled(local, lat, dims, { maxTile: 8, overlap: 3, scale: 16, outChannels: 3, onTile: () => tiles++ });
  assert.deepEqual(tiled.dims, [2, 3, 13 * 16, 21 * 16]);
  assert.ok(tiles >= 6, `${tiles} tiles`);
  let max = 0;
  for (let i = 0; i < whole.length; i++) max = Math.max(max, Math.abs(whole[i] - tiled.image[i]));
  assert.ok(max < 1e-6, `max diff ${max}`);
});

test('tiled decoding of the tiny VAE stays close to the untiled decode', async () => {
  const vae = await Flux2VAE.load(path.join(GOLDEN, 'vae/model.safetensors'), { target: cpuTarget(), only: 'decoder' });
  try {
    const dims = [1, 128, 12, 16];
    const lat = Float32Array.from({ length: 128 * 12 * 16 }, (_, i) => Math.sin(i * 1.7) * 1.2);
    const whole = await vae.decode(lat, dims, { tiling: 'never' });
    const tiled = await vae.decode(lat, dims, { tiling: 'always', maxTile: 10, overlap: 4 });
    assert.deepEqual(tiled.dims, whole.dims);
    let max = 0;
    let sum = 0;
    let range = 0;
    for (let i = 0; i < whole.image.length; i++) {
      const d = Math.abs(whole.image[i] - tiled.image[i]);
      max = Math.max(max, d);
      sum += d;
      range = Math.max(range, Math.abs(whole.image[i]));
    }
    // GroupNorm statistics and attention differ per tile, so this is close, not equal
    assert.ok(sum / whole.image.length < 0.05 * range, `mean |Δ| ${sum / whole.image.length} vs range ${range}`);
    assert.ok(max > 0, 'tiling really ran');
    await assert.rejects(vae.decode(lat, [1, 64, 12, 16]), /expects \[B, 128, h, w\]/);
    await assert.rejects(vae.encode(new Float32Array(3 * 40 * 40), [1, 3, 40, 40]), /multiples of 16/);
  } finally {
    await vae.close();
  }
});

test('random checkpoints load in both layouts and bf16, with the config read back from the shapes', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-vae-random-'));
  try {
    const cfg: Flux2VaeConfig = { inChannels: 3, outChannels: 3, ch: 32, chMult: [1, 2], numResBlocks: 1, zChannels: 8 };
    for (const layout of ['bfl', 'diffusers'] as const) {
      const f = path.join(dir, layout, 'vae.safetensors');
      writeRandomVaeCheckpoint(f, cfg, { layout, seed: 3, dtype: layout === 'diffusers' ? 'BF16' : 'F32' });
      const ck = Checkpoint.open(f);
      assert.equal(detectVaeLayout(ck), layout);
      assert.deepEqual(inferVaeConfig(ck, layout), cfg);
      const vae = await Flux2VAE.load(f, { target: cpuTarget() });
      const img = Float32Array.from({ length: 3 * 32 * 48 }, (_, i) => Math.cos(i * 0.01));
      // this config downsamples by 2 (one level step) but the patch is still 2×2: latent at /4
      const enc = await vae.encode(img, [1, 3, 32, 48]);
      assert.deepEqual(enc.dims, [1, 32, 8, 12]);
      const dec = await vae.decode(enc.latent, enc.dims);
      assert.deepEqual(dec.dims, [1, 3, 32, 48]);
      assert.ok(dec.image.every(Number.isFinite));
      await vae.close();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('an fp32 checkpoint is used in place, a bf16 one is widened to fp32 once', async () => {
  const golden = path.join(GOLDEN, 'vae/model.safetensors');
  const ino = fs.statSync(golden).ino;
  const vae = await Flux2VAE.load(golden, { target: cpuTarget(), only: 'decoder' });
  await vae.close();
  const linked = stores('flux2-vae-decoder-fp32').filter((s) => s.links.includes(ino));
  assert.equal(linked.length, 1, 'one weight store links the golden checkpoint');
  assert.equal(linked[0].converted, 0, 'no weight converted');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-vae-bf16-'));
  try {
    const cfg: Flux2VaeConfig = { inChannels: 3, outChannels: 3, ch: 32, chMult: [1, 2], numResBlocks: 1, zChannels: 8 };
    const f = path.join(dir, 'ae.safetensors');
    writeRandomVaeCheckpoint(f, cfg, { seed: 5, dtype: 'BF16' });
    const before = stores('flux2-vae-encoder-fp32').length;
    const bf16 = await Flux2VAE.load(dir, { target: cpuTarget(), only: 'encoder' });
    await bf16.close();
    const built = stores('flux2-vae-encoder-fp32');
    assert.equal(built.length, before + 1);
    const encoderParams = vaeTensorShapes(cfg).filter(([n]) => n.startsWith('encoder.') || n.startsWith('bn.')).reduce((a, [, s]) => a + s.reduce((x, y) => x * y, 1), 0);
    assert.ok(built.some((s) => s.converted >= 4 * encoderParams && s.links.length === 0), JSON.stringify(built));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('fast mode leaves the VAE exact: fp32 products and the golden decode within 1e-4', async () => {
  const vae = await Flux2VAE.load(path.join(GOLDEN, 'vae/model.safetensors'), { target: cpuTarget('fast'), only: 'decoder' });
  try {
    assert.equal(vae.computeDtype, 'fp32');
    const c = new GoldenCase(path.join(GOLDEN, 'vae/decode_case.safetensors'));
    const cmp = compareRelative((await vae.decode(c.f32('z'), c.shape('z'))).image, c.f32('image'), 1e-4);
    assert.ok(cmp.passed, `max err ${cmp.maxAbsErr} > ${cmp.tolerance}`);
  } finally {
    await vae.close();
  }
});
