// Fast mode (issue 13) of the FLUX.2 transformer on the golden tiny model: the int8 products' error against the
// golden outputs stays under a stated bound, the int8 weights are quantized once into the weight store and reused,
// and a damaged store is rebuilt.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Flux2Transformer } from '../../src/models/flux2/runtime.ts';
import { isBlockLinear, readsUnnormalisedInput } from '../../src/models/flux2/config.ts';
import { cpuTarget } from '../../src/runtime/target.ts';
import { targetFromFlags } from '../../src/cli/target-options.ts';
import { UsageError } from '../../src/cli/errors.ts';
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

// The bench's own cache root (its random real-width checkpoints are 0.6 GB and up: written once, not per run; npm
// test gives each run a cache of its own and names the user's in KLEIN_TEST_SHARED_CACHE_DIR).
const benchCacheRoot = process.env.KLEIN_TEST_SHARED_CACHE_DIR ?? process.env.KLEIN_CACHE_DIR;
// Every load here writes its weight store and compiled graphs (the golden folder is read-only) under a fresh root.
const cacheRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-fast-'));
process.env.KLEIN_CACHE_DIR = cacheRoot;
after(() => fs.rmSync(cacheRoot, { recursive: true, force: true }));

const fastTarget = cpuTarget('fast');

/** The transformer's weight-store folders of a policy (`int8`, `fp32`) built from `source` (a checkpoint file). */
function storesOf(policy: string, source: string): string[] {
  const root = path.join(cacheRoot, 'weights');
  if (!fs.existsSync(root)) return [];
  const real = fs.realpathSync(source);
  return fs
    .readdirSync(root)
    .filter((n) => n.startsWith(`flux2-transformer-${policy}-`) && !n.includes('.tmp-'))
    .map((n) => path.join(root, n))
    .filter((d) => (JSON.parse(fs.readFileSync(path.join(d, 'manifest.json'), 'utf8')) as { identity: string }).identity.includes(JSON.stringify(real).slice(1, -1)));
}

async function runCase(model: Flux2Transformer, file: string): Promise<{ out: Float32Array; ref: Float32Array }> {
  const gc = new GoldenCase(file);
  const [B, N] = gc.shape('x');
  const out = await model.forward({ x: gc.f32('x'), xIds: gc.i64('x_ids'), timesteps: gc.f32('timesteps'), ctx: gc.f32('ctx'), ctxIds: gc.i64('ctx_ids'), batch: B, nTokens: N, nCtx: gc.shape('ctx')[1] });
  return { out, ref: gc.f32('output') };
}

const cases = findCases(GOLDEN, /^case\d+\.safetensors$/);
const checkpointOf = { bfl: path.join(GOLDEN, 'model.safetensors'), diffusers: path.join(GOLDEN, 'diffusers', 'diffusion_pytorch_model.safetensors') };

test('the int8 selection: block Linears only; modulation, embedders, txt_in, img_in and the final layer stay fp32', () => {
  for (const n of ['double_blocks.0.img_attn.qkv.weight', 'double_blocks.4.txt_attn.proj.weight', 'double_blocks.1.img_mlp.0.weight', 'double_blocks.1.txt_mlp.2.weight', 'single_blocks.19.linear1.weight', 'single_blocks.0.linear2.weight']) {
    assert.equal(isBlockLinear(n), true, n);
  }
  for (const n of ['double_stream_modulation_img.lin.weight', 'single_stream_modulation.lin.weight', 'final_layer.adaLN_modulation.1.weight', 'final_layer.linear.weight', 'time_in.in_layer.weight', 'guidance_in.out_layer.weight', 'img_in.weight', 'txt_in.weight', 'double_blocks.0.img_attn.norm.query_norm.scale', 'single_blocks.0.norm.key_norm.scale']) {
    assert.equal(isBlockLinear(n), false, n);
  }
  // the second activation pass: block Linears whose input is an attention output or a SwiGLU product
  for (const n of ['double_blocks.4.txt_attn.proj.weight', 'double_blocks.0.img_attn.proj.weight', 'double_blocks.1.txt_mlp.2.weight', 'single_blocks.19.linear2.weight']) {
    assert.ok(isBlockLinear(n) && readsUnnormalisedInput(n), n);
  }
  for (const n of ['double_blocks.0.img_attn.qkv.weight', 'double_blocks.1.img_mlp.0.weight', 'single_blocks.19.linear1.weight', 'final_layer.linear.weight', 'txt_in.weight']) {
    assert.equal(readsUnnormalisedInput(n), false, n);
  }
});

for (const layout of ['bfl', 'diffusers'] as const) {
  test(`fast mode on the golden tiny transformer (${layout}): error vs the golden outputs within the stated bound; the int8 weights are quantized once`, async () => {
    assert.ok(cases.length >= 4, 'golden transformer cases');
    const folder = layout === 'bfl' ? GOLDEN : path.join(GOLDEN, 'diffusers');
    const fast = await Flux2Transformer.load(folder, { target: fastTarget });
    const outs: Float32Array[] = [];
    let folders: string[];
    try {
      assert.equal(fast.target.precision, 'fast');
      assert.equal(fast.computeDtype, 'int8');
      assert.equal(fast.weightsBuilt, true, 'the first fast load quantizes into the weight store');
      folders = storesOf('int8', checkpointOf[layout]);
      assert.equal(folders.length, 1);
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
    // the second load reads the store (no quantizing) and computes the same numbers
    let converted = 0;
    const again = await Flux2Transformer.load(folder, { target: fastTarget, onWeights: () => converted++ });
    try {
      assert.equal(again.weightsBuilt, false);
      assert.equal(again.graphCached, true);
      assert.equal(converted, 0);
      assert.deepEqual(storesOf('int8', checkpointOf[layout]), folders);
      assert.deepEqual((await runCase(again, cases[0])).out, outs[0]);
    } finally {
      await again.close();
    }
  });
}

test('exact mode is unchanged by the fast mode: its own fp32 store, golden outputs within 1e-4', async () => {
  const int8Before = storesOf('int8', checkpointOf.bfl);
  const exact = await Flux2Transformer.load(GOLDEN, { target: cpuTarget() });
  try {
    assert.equal(exact.target.precision, 'exact');
    assert.equal(exact.computeDtype, 'fp32');
    assert.equal(storesOf('fp32', checkpointOf.bfl).length, 1);
    assert.deepEqual(storesOf('int8', checkpointOf.bfl), int8Before, 'exact mode neither reads nor writes the int8 store');
    const { out, ref } = await runCase(exact, cases[0]);
    assert.ok(relativeError(out, ref).max < 1e-4);
  } finally {
    await exact.close();
  }
});

interface StoreEntry {
  offset: number;
  length: number;
}

test('a damaged int8 weight store is detected while loading and rebuilt; a bad precision is refused', async () => {
  const first = await Flux2Transformer.load(GOLDEN, { target: fastTarget });
  const expected = (await runCase(first, cases[1])).out;
  await first.close();
  const [folder] = storesOf('int8', checkpointOf.bfl);
  const manifest = JSON.parse(fs.readFileSync(path.join(folder, 'manifest.json'), 'utf8')) as { entries: Record<string, StoreEntry> };
  // flip one byte of the largest int8 weight: same size and manifest, only the checksum can tell. The store checks
  // the crc32 of each weight's first and last 64 KiB only (a cached real-size model must open in seconds, not read
  // every byte of GBs: the middle of a large weight is not read at load); what it guards against — truncation,
  // zeroed or foreign blocks — shows there, and an interrupted build never leaves a folder (atomic rename). So the
  // damage goes inside the first 64 KiB (here the weights are small: all of each is checked).
  const [key, entry] = Object.entries(manifest.entries)
    .filter(([k]) => k.endsWith('.q'))
    .sort((a, b) => b[1].length - a[1].length)[0];
  const at = entry.offset + Math.floor(Math.min(entry.length, 64 * 1024) / 2);
  const file = path.join(folder, 'weights.bin');
  const fd = fs.openSync(file, 'r+');
  const b = Buffer.alloc(1);
  fs.readSync(fd, b, 0, 1, at);
  b[0] ^= 0x11;
  fs.writeSync(fd, b, 0, 1, at);
  fs.closeSync(fd);
  let quantized = 0;
  const repaired = await Flux2Transformer.load(GOLDEN, { target: fastTarget, onWeights: () => quantized++ });
  try {
    assert.equal(repaired.weightsBuilt, true, `the damage in ${key} was not detected`);
    assert.ok(quantized > 0, 'the weights were quantized again');
    assert.deepEqual(storesOf('int8', checkpointOf.bfl), [folder], 'rebuilt in the same place');
    assert.deepEqual((await runCase(repaired, cases[1])).out, expected);
  } finally {
    await repaired.close();
  }
  // the precision is checked once, at the edge, naming where the bad value came from
  await assert.rejects(targetFromFlags({ precision: 'bogus' }), (e: Error) => e instanceof UsageError && /^--precision: unknown precision "bogus"; use one of: exact, fast$/.test(e.message));
  process.env.KLEIN_PRECISION = 'bogus';
  try {
    await assert.rejects(targetFromFlags({}), (e: Error) => e instanceof UsageError && /^KLEIN_PRECISION: unknown precision "bogus"; use one of: exact, fast$/.test(e.message));
  } finally {
    delete process.env.KLEIN_PRECISION;
  }
});

test('klein bench transformer: a bad --precision, and --compare-exact without fast, are usage errors (exit 2)', async () => {
  const bad = await runKlein(['bench', 'transformer', '--precision', 'bogus']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--precision: unknown precision "bogus"; use one of: exact, fast/);
  const cmp = await runKlein(['bench', 'transformer', '--compare-exact'], { KLEIN_PRECISION: undefined });
  assert.equal(cmp.code, 2);
  assert.match(cmp.stderr, /--compare-exact goes with --precision fast/);
  // --rebuild replaced --requantize (it converts the weights of any precision again)
  const old = await runKlein(['bench', 'transformer', '--requantize']);
  assert.equal(old.code, 2);
  assert.match(old.stderr, /unknown option '--requantize'/);
});

const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (CI does)';

test('klein bench transformer --compare-fp32: refused (exit 2) on the CPU, in fp32 and with --precision fast', async () => {
  const cpu = await runKlein(['bench', 'transformer', '--compare-fp32'], { KLEIN_DEVICE: 'cpu', KLEIN_PRECISION: undefined });
  assert.equal(cpu.code, 2, cpu.stderr);
  assert.match(cpu.stderr, /--compare-fp32 compares a GPU's fp16 products with fp32 on the same device; this run computes in fp32 on cpu \(use --device webgpu or cuda/);
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
  assert.match(r.stdout, /products in fp16 on webgpu/);
  const m = /^fp16 vs fp32, same inputs: relative rms error ([0-9.]+) %, max \|error\| ([0-9.]+) % of max \|fp32\|$/m.exec(r.stdout);
  assert.ok(m, `no comparison line in:\n${r.stdout}`);
  const rms = Number(m[1]) / 100;
  const max = Number(m[2]) / 100;
  assert.ok(rms > 1e-4 && rms < 0.05, `rms ${rms}`);
  assert.ok(max > 0 && max < 0.1, `max ${max}`);
});
