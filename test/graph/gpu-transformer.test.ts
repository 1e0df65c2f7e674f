// The FLUX.2 transformer on GPU devices: fp16 weight conversion, and — on WebGPU (Mesa 25 lavapipe on a CPU-only
// machine, see scripts/setup-webgpu.sh) — one session per step whose only host traffic is the latent in and the
// velocity out, and the fp16 error against the golden reference. The WebGPU tests are skipped with that reason
// when VK_ICD_FILENAMES is unset.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Flux2Transformer, type Flux2ForwardInput } from '../../src/models/flux2/runtime.ts';
import { F16_MAX, f32ToF16Clamped, transpose2d } from '../../src/weights/compute-dtype.ts';
import { FP16_FACTOR } from '../../src/conform/transformer.ts';
import { GoldenCase } from '../../src/conform/golden.ts';
import { cpuTarget, type ExecutionTarget } from '../../src/runtime/target.ts';
import { GOLDEN_DIR } from '../golden.ts';

const webgpu = (gpuDtype: 'fp16' | 'fp32'): ExecutionTarget => ({ device: 'webgpu', precision: 'exact', gpuDtype });
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

test('on the CPU the transformer stays fp32 with no device transfers', async () => {
  const m = await Flux2Transformer.load(GOLDEN, { target: cpuTarget() });
  try {
    const { inp, ref } = goldenInput('case1.safetensors');
    const out = await m.forward(inp);
    assert.equal(m.computeDtype, 'fp32');
    assert.deepEqual(m.lastTransfers, { uploads: 0, downloads: 0 });
    assert.ok(maxAbsDiff(out, ref) <= 1e-4 * Math.max(1, maxAbs(ref)));
  } finally {
    await m.close();
  }
});

test('WebGPU: one session per step — the latent and timestep go up, the velocity comes down, the context stays on the device', { skip: noVulkan }, async () => {
  const { inp, ref } = goldenInput('case2.safetensors'); // batch 1 with a reference image
  const dev = await Flux2Transformer.load(GOLDEN, { target: webgpu('fp32') });
  try {
    const whole = await dev.forward(inp);
    assert.ok(maxAbsDiff(whole, ref) <= 1e-4 * Math.max(1, maxAbs(ref)), 'fp32 on the device matches the reference');
    // a context prepared once (ctx, ctx_ids and x_ids uploaded once) serves every step of a generation
    const context = await dev.prepareContext(inp);
    try {
      assert.deepEqual(context.transfers, { uploads: 3, downloads: 0 });
      const onDevice = [...context.values.values()].filter((v) => v.location === 'gpu-buffer').length;
      assert.ok(onDevice >= 3, `${onDevice} context values on the device: the text stream and the RoPE tables at least`);
      const s1 = await dev.step(inp, context);
      assert.deepEqual(dev.lastTransfers, { uploads: 2, downloads: 1 }, 'a step: x and its timestep up, the velocity down');
      const shifted = { ...inp, x: inp.x.map((v) => v * 0.5), timesteps: inp.timesteps.map((t) => t * 0.5) };
      const s2 = await dev.step(shifted, context);
      const s3 = await dev.step(inp, context);
      assert.equal(maxAbsDiff(s1, whole), 0);
      assert.equal(maxAbsDiff(s3, whole), 0, 'the context is unchanged by the steps that used it');
      assert.ok(maxAbsDiff(s2, whole) > 1e-4, 'another latent and time give another velocity');
    } finally {
      context.dispose();
    }
    await assert.rejects(dev.step(inp, context), /disposed/);
  } finally {
    await dev.close();
  }
});

test('WebGPU: fp16 Linears stay within the stated tolerance of the golden output, and are really fp16', { skip: noVulkan }, async () => {
  const m = await Flux2Transformer.load(GOLDEN, { target: webgpu('fp16') });
  try {
    assert.equal(m.computeDtype, 'fp16');
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
