// Device selection, and real graphs on ONNX Runtime's WebGPU provider. On a CPU-only machine the WebGPU
// tests need Mesa 25's lavapipe (scripts/setup-webgpu.sh, which CI runs); without VK_ICD_FILENAMES they are
// skipped with that reason rather than failing on a machine that was never set up.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Graph } from '../../src/graph/onnx-graph.ts';
import { Fp32Policy, GpuPolicy, type WeightPolicy } from '../../src/graph/nn/weight-policy.ts';
import { diffAgainstCpu } from '../../src/runtime/device-diff.ts';
import { f32, sessionOptions } from '../../src/runtime/session.ts';
import { DeviceUnavailableError, ortNativeDir, parseDevice, probeDevice, resolveDevice, type Device } from '../../src/runtime/device.ts';
import { resolveTarget } from '../../src/runtime/target.ts';
import type { Layers } from '../../src/graph/nn/layers.ts';
import { Checkpoint, writeSafetensors, f32ToBf16 } from '../../src/weights/safetensors.ts';
import { compile, layersOf, sessionFor } from './helpers.ts';

// weight stores and compiled graphs of this file's temporary checkpoints go to a cache folder of their own
const cacheRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-webgpu-cache-'));
process.env.KLEIN_CACHE_DIR = cacheRoot;
const tmpDirs: string[] = [];
after(() => {
  for (const d of [cacheRoot, ...tmpDirs]) fs.rmSync(d, { recursive: true, force: true });
});
const tmp = (prefix: string) => {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tmpDirs.push(d);
  return d;
};

const root = path.resolve(import.meta.dirname, '..', '..');
const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (CI does)';
const cudaInstalled = fs.existsSync(path.join(ortNativeDir(), 'libonnxruntime_providers_cuda.so'));

function klein(args: string[], env: Record<string, string | undefined> = {}) {
  return spawnSync(process.execPath, [path.join(root, 'bin', 'klein.js'), ...args], { cwd: root, encoding: 'utf8', env: { ...process.env, ...env }, timeout: 120_000 });
}

/** Deterministic values in [-1, 1) (a tiny LCG; the test needs variety, not statistics). */
function rand(n: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
}

test('parseDevice accepts cpu, webgpu, cuda, auto and rejects anything else by name', () => {
  for (const d of ['cpu', 'webgpu', 'cuda', 'auto']) assert.equal(parseDevice(d), d);
  assert.equal(parseDevice(' WebGPU '), 'webgpu');
  assert.throws(() => parseDevice('gpu'), /unknown device "gpu"; use one of: cpu, webgpu, cuda, auto/);
});

test('sessionOptions maps each device to its ORT provider; pre-packing only for int8; device-resident outputs only on WebGPU', () => {
  assert.deepEqual(sessionOptions({ device: 'cpu', prepack: false }).executionProviders, ['cpu']);
  assert.deepEqual(sessionOptions({ device: 'webgpu', prepack: false }).executionProviders, [{ name: 'webgpu' }]);
  assert.deepEqual(sessionOptions({ device: 'webgpu', prepack: false }, ['n1']).executionProviders, [{ name: 'webgpu', forceCpuNodeNames: ['n1'] }]);
  assert.deepEqual(sessionOptions({ device: 'cuda', prepack: false }).executionProviders, [{ name: 'cuda', deviceId: 0 }]);
  // fp32 weights stay mapped page cache (no pre-packed anonymous copies); int8 products pre-pack
  assert.deepEqual(sessionOptions({ device: 'cpu', prepack: false }).extra, { session: { disable_prepacking: '1' } });
  assert.deepEqual(sessionOptions({ device: 'cpu', prepack: true }).extra, { session: { disable_prepacking: '0' } });
  assert.equal(sessionOptions({ device: 'cpu', prepack: false, threads: 3 }).intraOpNumThreads, 3);
  assert.deepEqual(sessionOptions({ device: 'webgpu', prepack: false, deviceOutputs: ['ctx'] }).preferredOutputLocation, { ctx: 'gpu-buffer' });
  assert.equal(sessionOptions({ device: 'cpu', prepack: false, deviceOutputs: ['ctx'] }).preferredOutputLocation, undefined);
});

test('the execution target: auto is resolved before any session, fast stays on the CPU, fp16 needs a GPU', async () => {
  assert.deepEqual(await resolveTarget(), { device: 'cpu', precision: 'exact', gpuDtype: 'fp32', threads: undefined });
  assert.equal((await resolveTarget({ device: 'auto', precision: 'fast' })).device, 'cpu', 'fast with auto picks the CPU without probing a GPU');
  await assert.rejects(resolveTarget({ device: 'webgpu', precision: 'fast' }), /precision fast \(int8 products\) runs on the CPU only; use precision exact on webgpu/);
  await assert.rejects(resolveTarget({ device: 'cpu', gpuDtype: 'fp16' }), /fp16 compute needs a GPU device/);
  await assert.rejects(resolveTarget({ threads: 0 }), /threads must be a positive integer, got 0/);
  const auto = await resolveTarget({ device: 'auto' });
  assert.notEqual(auto.device as string, 'auto');
  assert.equal(auto.gpuDtype, auto.device === 'cpu' ? 'fp32' : 'fp16');
});

test('a missing CUDA provider is a clear error that says how to install it', { skip: cudaInstalled && 'the CUDA provider is installed here' }, async () => {
  const p = await probeDevice('cuda');
  assert.equal(p.available, false);
  await assert.rejects(resolveDevice('cuda'), (e: unknown) => {
    assert.ok(e instanceof DeviceUnavailableError);
    assert.match(e.message, /ONNXRUNTIME_NODE_INSTALL=cuda12 node node_modules\/onnxruntime-node\/script\/install\.js/);
    return true;
  });
  const r = klein(['conform', path.join(root, 'test'), '--device', 'cuda']);
  assert.equal(r.status, 2, r.stderr);
  assert.match(r.stderr, /klein: device cuda is not available: the CUDA execution provider is not installed/);
});

test('klein devices explains a missing WebGPU adapter and auto falls back', { skip: cudaInstalled && 'the CUDA provider is installed here' }, () => {
  // A manifest path that does not exist: the Vulkan loader finds no driver, as on a machine never set up.
  const r = klein(['devices', '--json'], { VK_ICD_FILENAMES: path.join(os.tmpdir(), 'klein-no-such-icd.json'), VK_DRIVER_FILES: undefined });
  assert.equal(r.status, 0, r.stderr);
  const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l));
  const webgpu = lines.find((l) => l.device === 'webgpu');
  assert.equal(webgpu.available, false);
  assert.match(webgpu.reason, /no WebGPU adapter.*scripts\/setup-webgpu\.sh/);
  assert.equal(lines.find((l) => l.device === 'cpu').available, true);
  assert.deepEqual(lines.at(-1), { auto: 'cpu' });
});

test('WebGPU: the probe finds an adapter and auto picks it over the CPU', { skip: noVulkan }, async () => {
  const p = await probeDevice('webgpu');
  assert.equal(p.available, true, p.reason);
  assert.equal(await resolveDevice('webgpu'), 'webgpu');
  if (!cudaInstalled) assert.equal(await resolveDevice('auto'), 'webgpu');
});

/** Builds `body` over checkpoint `dir` with `policy`, compiles it into its weight store and opens it on `device`. */
async function openOn(dir: string, name: string, policy: WeightPolicy, device: Device, body: (g: Graph, nn: Layers) => void) {
  const g = new Graph(name);
  body(g, layersOf(g, Checkpoint.open(dir), policy));
  const c = await compile(g, policy, `test-${name}`);
  return { ...c, session: await sessionFor(c.file, device, policy) };
}

async function runOut(s: Awaited<ReturnType<typeof openOn>>, feeds: Parameters<typeof s.session.run>[0], name: string): Promise<Float32Array> {
  try {
    return (await s.session.run(feeds))[name].data as Float32Array;
  } finally {
    await s.session.release();
  }
}

test('WebGPU: a small block with bf16 weights matches the CPU provider', { skip: noVulkan }, async () => {
  const dir = tmp('klein-webgpu-');
  const [n, d, h] = [7, 48, 96];
  writeSafetensors(path.join(dir, 'w.safetensors'), {
    pad: { dtype: 'U8', shape: [5], data: new Uint8Array(5) }, // unaligned weights, as in real checkpoints
    'fc1.weight': { dtype: 'BF16', shape: [h, d], data: f32ToBf16(rand(h * d, 1)) },
    'fc1.bias': { dtype: 'F32', shape: [h], data: rand(h, 2) },
    'fc2.weight': { dtype: 'BF16', shape: [d, h], data: f32ToBf16(rand(d * h, 3)) },
  });
  // LayerNorm → Linear → SiLU → Linear → residual → attention-style softmax(x·xᵀ/√d)·x: the op mix of a DiT block.
  const block = (g: Graph, nn: Layers) => {
    const x = g.input('x', 'float32', [n, d]);
    const hdn = nn.silu(nn.linear(nn.layerNorm(x, 1e-6, undefined, d), 'fc1'));
    const y = g.op('Add', [x, nn.linear(hdn, 'fc2')]);
    const scores = g.op('Mul', [g.op('MatMul', [y, g.op('Transpose', [y], { perm: [1, 0] })]), g.scalarF32(1 / Math.sqrt(d))]);
    g.output(g.op('MatMul', [g.op('Softmax', [scores], { axis: -1 }), y]), 'out');
  };
  const feeds = { x: f32(rand(n * d, 4), [n, d]) };
  // what each device runs: the CPU's exact policy there, the GPU policy in fp32 on WebGPU
  const a = await runOut(await openOn(dir, 'webgpu-block', new Fp32Policy(), 'cpu', block), feeds, 'out');
  const gpu = await openOn(dir, 'webgpu-block', new GpuPolicy('fp32'), 'webgpu', block);
  // one compiled file serves every device: the GPU policy's graph opens on the CPU from the same file and store
  const onCpu = await openOn(dir, 'webgpu-block', new GpuPolicy('fp32'), 'cpu', block);
  assert.deepEqual([onCpu.cached, onCpu.file, onCpu.store.built], [true, gpu.file, false]);
  const b = await runOut(gpu, feeds, 'out');
  const c = await runOut(onCpu, feeds, 'out');
  assert.equal(b.length, n * d);
  let maxErr = 0;
  let maxAbs = 0;
  for (let i = 0; i < a.length; i++) {
    maxErr = Math.max(maxErr, Math.abs(a[i] - b[i]), Math.abs(c[i] - b[i]));
    maxAbs = Math.max(maxAbs, Math.abs(a[i]));
  }
  assert.ok(maxAbs > 0.1, 'the block must produce non-trivial values');
  // Both compute in fp32; only summation order differs.
  assert.ok(maxErr <= 1e-4 * maxAbs, `max |cpu - webgpu| = ${maxErr} (max |y| = ${maxAbs})`);
});

test('WebGPU: klein conform resolves --device webgpu and reports the device and its dtype', { skip: noVulkan }, () => {
  const empty = tmp('klein-webgpu-golden-');
  const r = klein(['conform', empty, '--device', 'webgpu'], { KLEIN_GPU_DTYPE: undefined });
  assert.match(r.stdout, /^device: webgpu \(fp16\)$/m);
  assert.match(klein(['conform', empty, '--device', 'webgpu', '--gpu-dtype', 'fp32']).stdout, /^device: webgpu \(fp32\)$/m);
  assert.match(r.stdout, /no golden case found/);
  assert.equal(r.status, 1);
});

test('WebGPU: MultiHeadAttention matches the CPU (pinned to it where the kernel fails its self-test, as on lavapipe)', { skip: noVulkan }, async () => {
  const dir = tmp('klein-webgpu-mha-');
  writeSafetensors(path.join(dir, 'w.safetensors'), { 'q.weight': { dtype: 'F32', shape: [64, 64], data: rand(64 * 64, 7) } });
  const s = 64;
  // self-attention through ORT's MultiHeadAttention contrib op (nn.attention) over `s` positions, 2 heads of 32
  const mha = (g: Graph, nn: Layers) => {
    const x = g.input('x', 'float32', [1, s, 64]);
    g.output(nn.attention(nn.linear(x, 'q'), x, x, 2), 'y');
  };
  const feeds = { x: f32(rand(s * 64, 8).map((v) => 4 * v), [1, s, 64]) };
  const a = await runOut(await openOn(dir, 'webgpu-mha', new Fp32Policy(), 'cpu', mha), feeds, 'y');
  const b = await runOut(await openOn(dir, 'webgpu-mha', new GpuPolicy('fp32'), 'webgpu', mha), feeds, 'y');
  let maxErr = 0;
  for (let i = 0; i < a.length; i++) maxErr = Math.max(maxErr, Math.abs(a[i] - b[i]));
  // fp32 summation order gives ~2e-5 on these logits (|q·k| up to ~50); the WebGPU kernel's error was ~0.4.
  assert.ok(maxErr < 1e-4, `max |cpu - webgpu| = ${maxErr}`);
});

test('WebGPU: diffAgainstCpu compares every float intermediate of a graph', { skip: noVulkan }, async () => {
  const dir = tmp('klein-webgpu-diff-');
  writeSafetensors(path.join(dir, 'w.safetensors'), { 'fc.weight': { dtype: 'BF16', shape: [16, 8], data: f32ToBf16(rand(128, 9)) } });
  const g = new Graph('diff');
  const policy = new GpuPolicy('fp32');
  const nn = layersOf(g, Checkpoint.open(dir), policy);
  g.output(g.op('Softmax', [nn.silu(nn.linear(g.input('x', 'float32', [3, 8]), 'fc'))], { axis: -1 }), 'y');
  const { store, file } = await compile(g, policy);
  const diffs = await diffAgainstCpu(file, { x: f32(rand(24, 10), [3, 8]) }, 'webgpu');
  // the bf16 weight was widened and transposed once by the weight store: no Cast or Transpose in the graph
  // MatMul, Sigmoid, Mul (SiLU), Softmax, and the Identity naming the output
  assert.deepEqual(diffs.map((d) => d.opType), ['MatMul', 'Sigmoid', 'Mul', 'Softmax', 'Identity']);
  for (const d of diffs) assert.ok(d.maxAbs > 0 && d.maxAbsErr <= 1e-5 * Math.max(1, d.maxAbs), `${d.output}: ${d.maxAbsErr}`);
  assert.equal(fs.readdirSync(store.folder).filter((f) => f.includes('device-diff')).length, 0, 'the widened model is removed');
});
