// Fast mode (issue 13) of the FLUX.2 transformer on the golden tiny model: the int8 products' error against the
// golden outputs stays under a stated bound, the int8 cache is built once and reused, and a damaged cache is rebuilt.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Flux2Transformer, int8Layer } from '../../src/models/flux2-transformer.ts';
import { GoldenCase, findCases } from '../../src/conform/golden.ts';
import { runKlein } from '../cli/helpers.ts';
import { relativeError } from '../../src/conform/compare.ts';
import { GOLDEN_DIR } from '../golden.ts';

const GOLDEN = path.join(GOLDEN_DIR, 'transformer');

// Measured on the four golden cases (docs/benchmarks.md, "Fast mode"): relative rms 0.68–0.89 %, max |error|
// 0.77–0.96 % of max |ref|, identical for the BFL and diffusers layouts. Bounds: about 2.5× the worst case.
const RMS_BOUND = 0.022;
const MAX_BOUND = 0.025;
// An error this small would mean the int8 path did not run at all (exact mode is ~5e-6).
const RMS_FLOOR = 0.001;

// The bench's own cache root (its random real-width checkpoints are 0.6 GB and up: written once, not per run).
const benchCacheRoot = process.env.KLEIN_CACHE_DIR;
// Every load here writes its int8 cache and compiled graphs (the golden folder is read-only) under a fresh root.
process.env.KLEIN_CACHE_DIR = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-fast-'));


async function runCase(model: Flux2Transformer, file: string): Promise<{ out: Float32Array; ref: Float32Array }> {
  const gc = new GoldenCase(file);
  const [B, N] = gc.shape('x');
  const out = await model.forward({ x: gc.f32('x'), xIds: gc.i64('x_ids'), timesteps: gc.f32('timesteps'), ctx: gc.f32('ctx'), ctxIds: gc.i64('ctx_ids'), batch: B, nTokens: N, nCtx: gc.shape('ctx')[1] });
  return { out, ref: gc.f32('output') };
}

const cases = findCases(GOLDEN, /^case\d+\.safetensors$/);

test('the int8 policy: block Linears only; modulation, embedders, txt_in, img_in and the final layer stay fp32', () => {
  for (const n of ['double_blocks.0.img_attn.qkv.weight', 'double_blocks.4.txt_attn.proj.weight', 'double_blocks.1.img_mlp.0.weight', 'double_blocks.1.txt_mlp.2.weight', 'single_blocks.19.linear1.weight', 'single_blocks.0.linear2.weight']) {
    assert.equal(int8Layer(n), true, n);
  }
  for (const n of ['double_stream_modulation_img.lin.weight', 'single_stream_modulation.lin.weight', 'final_layer.adaLN_modulation.1.weight', 'final_layer.linear.weight', 'time_in.in_layer.weight', 'guidance_in.out_layer.weight', 'img_in.weight', 'txt_in.weight', 'double_blocks.0.img_attn.norm.query_norm.scale', 'single_blocks.0.norm.key_norm.scale']) {
    assert.equal(int8Layer(n), false, n);
  }
});

for (const layout of ['bfl', 'diffusers'] as const) {
  test(`fast mode on the golden tiny transformer (${layout}): error vs the golden outputs within the stated bound; the int8 cache is reused`, async () => {
    assert.ok(cases.length >= 4, 'golden transformer cases');
    const folder = layout === 'bfl' ? GOLDEN : path.join(GOLDEN, 'diffusers');
    const fast = await Flux2Transformer.load(folder, { precision: 'fast' });
    const outs: Float32Array[] = [];
    try {
      assert.equal(fast.precision, 'fast');
      assert.equal(fast.int8Cache?.built, true);
      for (const file of cases) {
        const { out, ref } = await runCase(fast, file);
        const e = relativeError(out, ref);
        assert.ok(e.rms < RMS_BOUND && e.max < MAX_BOUND, `${path.basename(file)}: rms ${e.rms}, max ${e.max}`);
        assert.ok(e.rms > RMS_FLOOR, `${path.basename(file)}: rms ${e.rms} is exact-mode small: int8 products did not run`);
        outs.push(out);
      }
    } finally {
      await fast.close();
    }
    // the second load reads the cache (no quantizing) and computes the same numbers
    const again = await Flux2Transformer.load(folder, { precision: 'fast' });
    try {
      assert.equal(again.int8Cache?.built, false);
      assert.equal(again.int8Cache?.folder, fast.int8Cache?.folder);
      assert.deepEqual((await runCase(again, cases[0])).out, outs[0]);
    } finally {
      await again.close();
    }
  });
}

test('exact mode is unchanged by the fast mode: no int8 cache, golden outputs within 1e-4', async () => {
  const exact = await Flux2Transformer.load(GOLDEN);
  try {
    assert.equal(exact.precision, 'exact');
    assert.equal(exact.int8Cache, undefined);
    const { out, ref } = await runCase(exact, cases[0]);
    assert.ok(relativeError(out, ref).max < 1e-4);
  } finally {
    await exact.close();
  }
});

test('a damaged int8 cache is detected while loading and rebuilt; a bad precision is refused', async () => {
  const first = await Flux2Transformer.load(GOLDEN, { precision: 'fast' });
  const expected = (await runCase(first, cases[1])).out;
  const folder = first.int8Cache!.folder;
  await first.close();
  // flip one int8 value in the middle of the weights file: same size and header, only the checksum can tell
  const file = path.join(folder, 'weights.safetensors');
  const fd = fs.openSync(file, 'r+');
  const at = Math.floor(fs.statSync(file).size / 2);
  const b = Buffer.alloc(1);
  fs.readSync(fd, b, 0, 1, at);
  b[0] ^= 0x11;
  fs.writeSync(fd, b, 0, 1, at);
  fs.closeSync(fd);
  let quantized = 0;
  const repaired = await Flux2Transformer.load(GOLDEN, { precision: 'fast', onQuantizeProgress: () => quantized++ });
  try {
    assert.equal(repaired.int8Cache?.built, true);
    assert.ok(quantized > 0, 'the weights were quantized again');
    assert.deepEqual((await runCase(repaired, cases[1])).out, expected);
  } finally {
    await repaired.close();
  }
  await assert.rejects(Flux2Transformer.load(GOLDEN, { precision: 'bogus' as 'fast' }), /precision must be exact or fast, got "bogus"/);
});

test('klein bench transformer: a bad --precision, and --compare-exact without fast, are usage errors (exit 2)', async () => {
  const bad = await runKlein(['bench', 'transformer', '--precision', 'bogus']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--precision must be exact or fast, got "bogus"/);
  const cmp = await runKlein(['bench', 'transformer', '--compare-exact']);
  assert.equal(cmp.code, 2);
  assert.match(cmp.stderr, /--compare-exact and --requantize go with --precision fast/);
});

const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (CI does)';

test('klein bench transformer --compare-fp32: refused (exit 2) on the CPU, in fp32 and with --precision fast', async () => {
  const cpu = await runKlein(['bench', 'transformer', '--compare-fp32'], { KLEIN_DEVICE: 'cpu' });
  assert.equal(cpu.code, 2, cpu.stderr);
  assert.match(cpu.stderr, /--compare-fp32 compares a GPU's fp16 products with fp32 on the same device; this run computes in fp32 on cpu \(use KLEIN_DEVICE=webgpu or cuda/);
  const fast = await runKlein(['bench', 'transformer', '--compare-fp32', '--precision', 'fast'], { KLEIN_DEVICE: 'cpu' });
  assert.equal(fast.code, 2, fast.stderr);
  assert.match(fast.stderr, /--precision fast runs on the CPU \(use --compare-exact\)/);
});

test('klein bench transformer --compare-fp32: refused (exit 2) on WebGPU in fp32', { skip: noVulkan }, async () => {
  const r = await runKlein(['bench', 'transformer', '--compare-fp32'], { KLEIN_DEVICE: 'webgpu', KLEIN_GPU_DTYPE: 'fp32' });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /this run computes in fp32 on webgpu/);
});

// One single block at klein 4B's width (the dot products as long as the real model's), 4 image + 8 text tokens:
// ~1.8 min on lavapipe. Measured there: 0.965 % rms, 1.64 % max (ORT's WebGPU MatMul accumulates fp16 products
// in fp16). Above 1e-4 says fp16 really ran (fp32 on the device is ~1e-6 off the CPU); under 5 % (5× measured)
// says it is still the same numbers, not garbage.
test('klein bench transformer --compare-fp32 on WebGPU: one real-width block, fp16 vs fp32 on the device', { skip: noVulkan }, async () => {
  const r = await runKlein(['bench', 'transformer', '--compare-fp32', '--double-blocks', '0', '--single-blocks', '1', '--size', '32x32', '--txt-tokens', '8', '--steps', '1'], { KLEIN_DEVICE: 'webgpu', KLEIN_GPU_DTYPE: undefined, KLEIN_CACHE_DIR: benchCacheRoot });
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /device: webgpu, Linears in fp16/);
  const m = /^fp16 vs fp32, same inputs: relative rms error ([0-9.]+) %, max \|error\| ([0-9.]+) % of max \|fp32\|$/m.exec(r.stdout);
  assert.ok(m, `no comparison line in:\n${r.stdout}`);
  const rms = Number(m[1]) / 100;
  const max = Number(m[2]) / 100;
  assert.ok(rms > 1e-4 && rms < 0.05, `rms ${rms}`);
  assert.ok(max > 0 && max < 0.1, `max ${max}`);
});
