// The FLUX.2 transformer on GPU devices: fp16 weight conversion, the dtype rules, and — on WebGPU (Mesa 25
// lavapipe on a CPU-only machine, see scripts/setup-webgpu.sh) — device-resident stage I/O and the fp16 error
// against the golden reference. The WebGPU tests are skipped with that reason when VK_ICD_FILENAMES is unset.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Flux2Transformer, type Flux2ForwardInput } from '../../src/models/flux2-transformer.ts';
import { F16_MAX, f32ToF16Clamped, parseComputeDtype, resolveComputeDtype, transpose2d } from '../../src/graph/compute-dtype.ts';
import { FP16_FACTOR } from '../../src/conform/transformer.ts';
import { GoldenCase } from '../../src/conform/golden.ts';
import { UsageError } from '../../src/cli/errors.ts';
import { GOLDEN_DIR } from '../golden.ts';

const GOLDEN = path.join(GOLDEN_DIR, 'transformer');
const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (CI does)';

function goldenInput(file: string): { inp: Flux2ForwardInput; ref: Float32Array } {
  const gc = new GoldenCase(path.join(GOLDEN, file));
  const [B, N] = gc.shape('x');
  const inp = { x: gc.f32('x'), xIds: gc.i64('x_ids'), timesteps: gc.f32('timesteps'), ctx: gc.f32('ctx'), ctxIds: gc.i64('ctx_ids'), batch: B, nTokens: N, nCtx: gc.shape('ctx')[1] };
  return { inp, ref: gc.f32('output') };
}

function maxAbs(a: Float32Array): number {
  let m = 0;
  for (const v of a) m = Math.max(m, Math.abs(v));
  return m;
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

test('f32ToF16Clamped rounds to nearest even and clamps beyond ±65504, counting the clamped values', () => {
  const one = 1;
  const ulp = 2 ** -10; // fp16 spacing at 1
  const src = Float32Array.of(one, one + ulp / 2, one + (3 * ulp) / 2, -2.5, 65504, 65519, 70000, -1e38, 6e-8, 0);
  const { data, overflows } = f32ToF16Clamped(src);
  // 1 + ulp/2 is a tie → even (1.0); 1 + 1.5 ulp is a tie → even (1 + 2 ulp); 65519 rounds down to 65504
  assert.deepEqual(Array.from(data), [0x3c00, 0x3c00, 0x3c02, 0xc100, 0x7bff, 0x7bff, 0x7bff, 0xfbff, 0x0001, 0]);
  assert.equal(overflows, 3); // 65519 is above 65504 too: clamped, and counted
  assert.equal(src[6], 70000, 'the input is left as it was');
  assert.equal(f32ToF16Clamped(Float32Array.of(F16_MAX, -F16_MAX)).overflows, 0);
});

test('transpose2d turns [rows, cols] into [cols, rows] across tile edges', () => {
  const [r, c] = [70, 3];
  const src = Float32Array.from({ length: r * c }, (_, i) => i);
  const t = transpose2d(src, r, c);
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) assert.equal(t[j * r + i], src[i * c + j]);
  assert.throws(() => transpose2d(src, 7, 7), /transpose2d: 210 values for 7×7/);
});

test('compute dtype: fp16 by default on GPUs, fp32 on the CPU, KLEIN_GPU_DTYPE overrides, fp16 on the CPU is refused', () => {
  const saved = process.env.KLEIN_GPU_DTYPE;
  try {
    delete process.env.KLEIN_GPU_DTYPE;
    assert.equal(resolveComputeDtype('webgpu'), 'fp16');
    assert.equal(resolveComputeDtype('cuda'), 'fp16');
    assert.equal(resolveComputeDtype('cpu'), 'fp32');
    assert.equal(resolveComputeDtype('webgpu', 'fp32'), 'fp32');
    process.env.KLEIN_GPU_DTYPE = 'fp32';
    assert.equal(resolveComputeDtype('webgpu'), 'fp32');
    assert.equal(resolveComputeDtype('webgpu', 'fp16'), 'fp16', 'an explicit option wins over the environment');
    process.env.KLEIN_GPU_DTYPE = 'fp16';
    assert.equal(resolveComputeDtype('cpu'), 'fp32', 'the GPU variable does not move the CPU off fp32');
    process.env.KLEIN_GPU_DTYPE = 'bf16';
    assert.throws(() => resolveComputeDtype('webgpu'), (e: unknown) => e instanceof UsageError && /unknown GPU dtype "bf16"; use one of: fp32, fp16/.test(e.message));
  } finally {
    if (saved === undefined) delete process.env.KLEIN_GPU_DTYPE;
    else process.env.KLEIN_GPU_DTYPE = saved;
  }
  assert.equal(parseComputeDtype(' FP16 '), 'fp16');
  assert.throws(() => resolveComputeDtype('cpu', 'fp16'), (e: unknown) => e instanceof UsageError && /fp16 compute needs a GPU device/.test(e.message));
});

test('on the CPU the transformer stays fp32 with no device transfers', async () => {
  const m = await Flux2Transformer.load(GOLDEN, { device: 'cpu' });
  try {
    const { inp, ref } = goldenInput('case1.safetensors');
    const out = await m.forward(inp);
    assert.equal(m.computeDtype, 'fp32');
    assert.equal(m.deviceIO, false);
    assert.deepEqual(m.lastTransfers, { uploads: 0, downloads: 0 });
    assert.ok(maxAbsDiff(out, ref) <= 1e-4 * Math.max(1, maxAbs(ref)));
  } finally {
    await m.close();
  }
  await assert.rejects(Flux2Transformer.load(GOLDEN, { device: 'cpu', gpuDtype: 'fp16' }), /fp16 compute needs a GPU device/);
});

test('WebGPU: stage outputs stay on the device (1 download per forward) and give the host round trip\'s numbers', { skip: noVulkan }, async () => {
  const { inp, ref } = goldenInput('case2.safetensors'); // batch 1 with a reference image
  const host = await Flux2Transformer.load(GOLDEN, { device: 'webgpu', gpuDtype: 'fp32', deviceIO: false });
  const dev = await Flux2Transformer.load(GOLDEN, { device: 'webgpu', gpuDtype: 'fp32' });
  try {
    assert.equal(host.deviceIO, false);
    assert.equal(dev.deviceIO, true);
    const a = await host.forward(inp);
    const b = await dev.forward(inp);
    // the host round trip downloads every stage output (time_in, 4 modulations, img_in, 3 per block, …)
    assert.ok(host.lastTransfers.downloads > 20, `host I/O downloads ${host.lastTransfers.downloads}`);
    // device-resident: only `output` comes back; a step uploads its own inputs (x, timesteps) and the text length
    // n_txt (a shape input of the final Slice), each fed once
    assert.deepEqual(dev.lastTransfers, { uploads: 3, downloads: 1 });
    assert.equal(maxAbsDiff(a, b), 0, 'the same kernels run either way: the results must be identical');
    assert.ok(maxAbsDiff(b, ref) <= 1e-4 * Math.max(1, maxAbs(ref)), 'and match the reference');
    // a second step on the same model: the device tensors of the first were released, not reused stale
    const again = await dev.forward(inp);
    assert.equal(maxAbsDiff(again, b), 0);
    assert.deepEqual(dev.lastTransfers, { uploads: 3, downloads: 1 });
    // a context prepared once serves several steps (as the sampler uses it): it uploads ctx, ctx_ids and x_ids
    // once and keeps txt and the RoPE tables on the device; the first step's txt_next must not free them
    const context = await dev.prepareContext(inp);
    try {
      assert.deepEqual(context.transfers, { uploads: 3, downloads: 0 });
      assert.ok([...context.values.entries()].filter(([k]) => k !== 'n_txt').every(([, v]) => v.location === 'gpu-buffer'));
      const s1 = await dev.step(inp, context);
      const shifted = { ...inp, x: inp.x.map((v) => v * 0.5), timesteps: inp.timesteps.map((t) => t * 0.5) };
      const s2 = await dev.step(shifted, context);
      const s3 = await dev.step(inp, context);
      assert.equal(maxAbsDiff(s1, b), 0);
      assert.equal(maxAbsDiff(s3, b), 0, 'the context is unchanged by the steps that used it');
      assert.equal(maxAbsDiff(s2, await host.forward(shifted)), 0);
    } finally {
      context.dispose();
    }
    await assert.rejects(dev.step(inp, context), /disposed/);
  } finally {
    await host.close();
    await dev.close();
  }
});

test('WebGPU: fp16 Linears stay within the stated tolerance of the golden output, and are really fp16', { skip: noVulkan }, async () => {
  const m = await Flux2Transformer.load(GOLDEN, { device: 'webgpu' });
  try {
    assert.equal(m.computeDtype, process.env.KLEIN_GPU_DTYPE === 'fp32' ? 'fp32' : 'fp16');
    if (m.computeDtype !== 'fp16') return;
    assert.equal(m.fp16Overflows, 0);
    for (const file of ['case1.safetensors', 'case3.safetensors']) {
      const { inp, ref } = goldenInput(file);
      const out = await m.forward(inp);
      const rel = maxAbsDiff(out, ref) / Math.max(1, maxAbs(ref));
      // measured 2.7e-3–3.1e-3 on lavapipe; fp32 gives ~5e-6, so below 1e-4 would mean fp16 is not in use
      assert.ok(rel < FP16_FACTOR, `${file}: max err / max|ref| = ${rel}`);
      assert.ok(rel > 1e-4, `${file}: ${rel} is fp32-level: the fp16 path did not run`);
    }
  } finally {
    await m.close();
  }
});
