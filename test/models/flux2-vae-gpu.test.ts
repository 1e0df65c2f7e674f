// The FLUX.2 VAE on GPU devices (GpuPolicy in fp16 or fp32): fp16 convolutions against the golden reference, fp32 on
// the device, tiled decoding in fp16, the fp16 weight clamping count, and where ORT places the nodes. The WebGPU
// tests run on Mesa 25 lavapipe on a CPU-only machine (scripts/setup-webgpu.sh) and are skipped with that reason
// when VK_ICD_FILENAMES is unset.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ortPlacements } from '../graph/ort-placement.ts';
import { Flux2VAE } from '../../src/models/vae/runtime.ts';
import { GoldenCase } from '../../src/conform/golden.ts';
import { VAE_FP16_FACTOR } from '../../src/conform/vae.ts';
import { UserError } from '../../src/errors.ts';
import { cpuTarget, type ExecutionTarget, type GpuDtype } from '../../src/runtime/target.ts';
import { Checkpoint, readFloat32, writeSafetensors, type TensorToWrite } from '../../src/weights/safetensors.ts';
import { GOLDEN_DIR } from '../golden.ts';

const GOLDEN = path.join(GOLDEN_DIR, 'vae');
// weight stores of this file's edited checkpoints go to a cache folder of their own
const cacheRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-vae-gpu-cache-'));
process.env.KLEIN_CACHE_DIR = cacheRoot;
after(() => fs.rmSync(cacheRoot, { recursive: true, force: true }));
const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (CI does)';
/** fp32 on the device measured ~2e-6 (max err / max(1, max|ref|)); fp16 1e-2: this floor tells them apart. */
const FP32_FLOOR = 1e-4;

/** max |a − ref| / max(1, max |ref|): the measure of conform's relative tolerance. */
function relErr(a: Float32Array, ref: Float32Array): number {
  assert.equal(a.length, ref.length);
  let m = 0;
  let r = 0;
  for (let i = 0; i < a.length; i++) {
    m = Math.max(m, Math.abs(a[i] - ref[i]));
    r = Math.max(r, Math.abs(ref[i]));
  }
  return m / Math.max(1, r);
}

const GOLDEN_VAE = path.join(GOLDEN, 'model.safetensors');

/** WebGPU with its products in `gpuDtype` (what resolveTarget gives for `--device webgpu --gpu-dtype …`). */
function webgpu(gpuDtype: GpuDtype): { target: ExecutionTarget } {
  return { target: { device: 'webgpu', precision: 'exact', gpuDtype } };
}

/** The golden VAE with some tensors changed by `edit` (in place), written to `dir`/ae.safetensors. */
function writeEditedGolden(dir: string, edit: (name: string, data: Float32Array) => void): string {
  const src = Checkpoint.open(path.join(GOLDEN, 'model.safetensors'));
  const tensors: Record<string, TensorToWrite> = {};
  for (const name of src.names) {
    const info = src.info(name);
    if (info.dtype !== 'F32') continue; // bn.num_batches_tracked: never read
    const data = readFloat32(info);
    edit(name, data);
    tensors[name] = { dtype: 'F32', shape: info.shape, data };
  }
  const file = path.join(dir, 'ae.safetensors');
  writeSafetensors(file, tensors);
  return file;
}

async function goldenErrors(file: string, opts: Parameters<typeof Flux2VAE.load>[1]): Promise<{ vae: Flux2VAE; image: number; moments: number; latent: number }> {
  const vae = await Flux2VAE.load(file, opts);
  try {
    const d = new GoldenCase(path.join(GOLDEN, 'decode_case.safetensors'));
    const e = new GoldenCase(path.join(GOLDEN, 'encode_case.safetensors'));
    const img = await vae.decode(d.f32('z'), d.shape('z'), { tiling: 'never' });
    const enc = await vae.encode(e.f32('x'), e.shape('x'), { withMoments: true });
    return { vae, image: relErr(img.image, d.f32('image')), moments: relErr(enc.moments!, e.f32('moments')), latent: relErr(enc.latent, e.f32('latent')) };
  } finally {
    await vae.close();
  }
}

test('on the CPU the VAE computes in fp32 and refuses fp16', async () => {
  const r = await goldenErrors(GOLDEN_VAE, { target: cpuTarget() });
  assert.equal(r.vae.device, 'cpu');
  assert.equal(r.vae.computeDtype, 'fp32');
  assert.equal(r.vae.fp16Overflows, 0);
  for (const err of [r.image, r.moments, r.latent]) assert.ok(err < FP32_FLOOR, `${err}`);
  await assert.rejects(Flux2VAE.load(GOLDEN_VAE, { target: cpuTarget(), gpuDtype: 'fp16' }), (e: unknown) => e instanceof UserError && /fp16 compute needs a GPU device/.test(e.message));
});

test('WebGPU fp16: golden encode and decode within VAE_FP16_FACTOR, and really fp16', { skip: noVulkan }, async () => {
  const r = await goldenErrors(GOLDEN_VAE, webgpu('fp16'));
  assert.equal(r.vae.device, 'webgpu');
  assert.equal(r.vae.computeDtype, 'fp16');
  assert.equal(r.vae.fp16Overflows, 0);
  // measured on lavapipe: image 1.19e-2, moments 1.27e-2, latent 9.5e-3 (VAE_FP16_FACTOR 4e-2 is ~3× that);
  // fp32 on the same device gives ~2e-6, so an error below FP32_FLOOR means the fp16 graph did not run
  for (const [name, err] of Object.entries({ image: r.image, moments: r.moments, latent: r.latent })) {
    assert.ok(err < VAE_FP16_FACTOR, `${name}: ${err}`);
    assert.ok(err > FP32_FLOOR, `${name}: ${err} is fp32-level: the fp16 path did not run`);
  }
});

test('WebGPU fp32 stays at the CPU\'s accuracy', { skip: noVulkan }, async () => {
  const r = await goldenErrors(GOLDEN_VAE, webgpu('fp32'));
  assert.equal(r.vae.computeDtype, 'fp32');
  // measured ~2e-6 on lavapipe
  for (const err of [r.image, r.moments, r.latent]) assert.ok(err < 2e-5, `${err}`);
  // the pipeline's case: an fp16 target with the VAE's fp32 override
  const o = await goldenErrors(GOLDEN_VAE, { ...webgpu('fp16'), gpuDtype: 'fp32' });
  assert.equal(o.vae.computeDtype, 'fp32');
  for (const err of [o.image, o.moments, o.latent]) assert.ok(err < 2e-5, `${err}`);
});

test('WebGPU fp16: tiled decoding runs and matches the CPU\'s tiled decode within the fp16 tolerance', { skip: noVulkan }, async () => {
  const dims = [1, 128, 12, 16];
  const lat = Float32Array.from({ length: 128 * 12 * 16 }, (_, i) => Math.sin(i * 1.7) * 1.2);
  const tiling = { tiling: 'always' as const, maxTile: 10, overlap: 4 };
  const cpu = await Flux2VAE.load(GOLDEN_VAE, { target: cpuTarget(), only: 'decoder' });
  const gpu = await Flux2VAE.load(GOLDEN_VAE, { ...webgpu('fp16'), only: 'decoder' });
  try {
    const ref = await cpu.decode(lat, dims, tiling);
    let tiles = 0;
    const out = await gpu.decode(lat, dims, { ...tiling, onTile: () => tiles++ });
    assert.equal(tiles, 4, '2×2 tiles of 10 tokens');
    assert.deepEqual(out.dims, [1, 3, 192, 256]);
    // measured 1.73e-2 on lavapipe (a larger latent than the golden case's, hence above its 1.2e-2)
    const err = relErr(out.image, ref.image);
    assert.ok(err < VAE_FP16_FACTOR && err > FP32_FLOOR, `fp16 tiled vs CPU tiled: ${err}`);
  } finally {
    await cpu.close();
    await gpu.close();
  }
});

test('WebGPU fp16: weights beyond ±65504 are clamped and counted', { skip: noVulkan }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-vae-gpu-clamp-'));
  try {
    // the golden VAE with two decoder conv weights pushed out of fp16's range
    const file = writeEditedGolden(dir, (name, data) => {
      if (name === 'decoder.conv_in.weight') [data[0], data[5]] = [1e5, -7e4];
    });
    const vae = await Flux2VAE.load(file, { ...webgpu('fp16'), only: 'decoder' });
    try {
      assert.equal(vae.fp16Overflows, 2);
    } finally {
      await vae.close();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('WebGPU fp16: an activation beyond ±65504 is an error naming fp32, not a NaN image', { skip: noVulkan }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-vae-gpu-overflow-'));
  try {
    // post_quant_conv ×1e4: conv_in's input (not normalised) then reaches ~1e5, finite in fp32, Inf at its fp16 cast
    const file = writeEditedGolden(dir, (name, data) => {
      if (name.startsWith('decoder.post_quant_conv.')) data.forEach((v, i) => (data[i] = v * 1e4));
    });
    const d = new GoldenCase(path.join(GOLDEN, 'decode_case.safetensors'));
    const fp32 = await Flux2VAE.load(file, { ...webgpu('fp32'), only: 'decoder' });
    const fp16 = await Flux2VAE.load(file, { ...webgpu('fp16'), only: 'decoder' });
    try {
      assert.ok((await fp32.decode(d.f32('z'), d.shape('z'))).image.every(Number.isFinite), 'fp32 copes');
      await assert.rejects(fp16.decode(d.f32('z'), d.shape('z')), /fp16 decoder overflowed .*run it in fp32 \(--gpu-dtype fp32 or KLEIN_GPU_DTYPE=fp32\)/);
    } finally {
      await fp32.close();
      await fp16.close();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('WebGPU fp16: every Conv and MatMul is placed on the WebGPU provider', { skip: noVulkan }, async () => {
  // a child process loads both graphs at ORT's verbose log level (see ort-placement.ts)
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-vae-gpu-'));
  try {
    const logFile = path.join(dir, 'ort.log');
    const script = `import { Flux2VAE } from ${JSON.stringify(path.resolve(import.meta.dirname, '../../src/models/vae/runtime.ts'))};
      const vae = await Flux2VAE.load(${JSON.stringify(GOLDEN_VAE)}, ${JSON.stringify(webgpu('fp16'))});
      await vae.close();`;
    const placed = await ortPlacements(script, logFile);
    assert.equal(placed.length, 2, 'two sessions: encoder and decoder');
    for (const p of placed) {
      const cpu = p.CPUExecutionProvider ?? {};
      assert.equal(cpu.Conv, undefined, `Conv on the CPU: ${JSON.stringify(cpu)}`);
      assert.equal(cpu.MatMul, undefined, `MatMul on the CPU: ${JSON.stringify(cpu)}`);
      assert.equal(cpu.Cast, undefined, `Cast on the CPU: ${JSON.stringify(cpu)}`);
      assert.ok((p.WebGpuExecutionProvider?.Conv ?? 0) >= 27, JSON.stringify(p.WebGpuExecutionProvider));
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
