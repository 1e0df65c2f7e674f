// Device selection, and real graphs on ONNX Runtime's WebGPU provider. On a CPU-only machine the WebGPU
// tests need Mesa 25's lavapipe (scripts/setup-webgpu.sh, which CI runs); without VK_ICD_FILENAMES they are
// skipped with that reason rather than failing on a machine that was never set up.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Graph, MS_DOMAIN } from '../../src/graph/onnx-graph.ts';
import { diffAgainstCpu } from '../../src/graph/device-diff.ts';
import { linear, layerNormNoAffine, silu } from '../../src/graph/nn.ts';
import { loadGraph, f32, sessionOptions, compileGraph } from '../../src/graph/session.ts';
import { DeviceUnavailableError, ortNativeDir, parseDevice, probeDevice, resolveDevice } from '../../src/graph/device.ts';
import { Checkpoint, writeSafetensors, f32ToBf16 } from '../../src/weights/safetensors.ts';

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

test('sessionOptions maps each device to its ORT provider and refuses an unresolved auto', () => {
  assert.deepEqual(sessionOptions({ device: 'cpu' }).executionProviders, ['cpu']);
  assert.deepEqual(sessionOptions({}).executionProviders, ['cpu']);
  assert.deepEqual(sessionOptions({ device: 'webgpu' }).executionProviders, [{ name: 'webgpu' }]);
  assert.deepEqual(sessionOptions({ device: 'cuda' }).executionProviders, [{ name: 'cuda', deviceId: 0 }]);
  assert.throws(() => sessionOptions({ device: 'auto' }), /resolve 'auto'/);
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

test('WebGPU: a small block with bf16 weights in place matches the CPU provider', { skip: noVulkan }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-webgpu-'));
  const [n, d, h] = [7, 48, 96];
  writeSafetensors(path.join(dir, 'w.safetensors'), {
    pad: { dtype: 'U8', shape: [5], data: new Uint8Array(5) }, // unaligned weights, as in real checkpoints
    w1: { dtype: 'BF16', shape: [h, d], data: f32ToBf16(rand(h * d, 1)) },
    b1: { dtype: 'F32', shape: [h], data: rand(h, 2) },
    w2: { dtype: 'BF16', shape: [d, h], data: f32ToBf16(rand(d * h, 3)) },
  });
  const ck = Checkpoint.open(dir);
  // LayerNorm → Linear → SiLU → Linear → residual → attention-style softmax(x·xᵀ/√d)·x: the op mix of a DiT block.
  const build = () => {
    const g = new Graph('webgpu-block');
    const x = g.input('x', 'float32', [n, d]);
    const hdn = silu(g, linear(g, layerNormNoAffine(g, x, d, 1e-6), ck.info('w1'), ck.info('b1')));
    const y = g.op('Add', [x, linear(g, hdn, ck.info('w2'))]);
    const scores = g.op('Mul', [g.op('MatMul', [y, g.op('Transpose', [y], { perm: [1, 0] })]), g.scalarF32(1 / Math.sqrt(d))]);
    g.output(g.op('MatMul', [g.op('Softmax', [scores], { axis: -1 }), y]), 'out');
    return g;
  };
  const x = rand(n * d, 4);
  const files = [ck.info('w1').file];
  const cpu = await loadGraph('webgpu-block', {}, files, build, { device: 'cpu' });
  const gpu = await loadGraph('webgpu-block', {}, files, build, { device: 'webgpu' });
  assert.equal(gpu.cached, true); // one compiled file serves every device
  const a = (await cpu.session.run({ x: f32(x, [n, d]) })).out.data as Float32Array;
  const b = (await gpu.session.run({ x: f32(x, [n, d]) })).out.data as Float32Array;
  assert.equal(b.length, n * d);
  let maxErr = 0;
  let maxAbs = 0;
  for (let i = 0; i < a.length; i++) {
    maxErr = Math.max(maxErr, Math.abs(a[i] - b[i]));
    maxAbs = Math.max(maxAbs, Math.abs(a[i]));
  }
  assert.ok(maxAbs > 0.1, 'the block must produce non-trivial values');
  // Both compute in fp32; only summation order differs.
  assert.ok(maxErr <= 1e-4 * maxAbs, `max |cpu - webgpu| = ${maxErr} (max |y| = ${maxAbs})`);
});

test('WebGPU: klein conform resolves --device webgpu and reports the device', { skip: noVulkan }, () => {
  const empty = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-webgpu-golden-'));
  const r = klein(['conform', empty, '--device', 'webgpu']);
  assert.match(r.stdout, /^device: webgpu$/m);
  assert.match(r.stdout, /no golden case found/);
  assert.equal(r.status, 1);
});

/** Self-attention through ORT's MultiHeadAttention contrib op over `s` positions, 2 heads of 32. */
function mhaModel(dir: string, s: number) {
  const ck = Checkpoint.open(dir);
  return () => {
    const g = new Graph('webgpu-mha');
    const x = g.input('x', 'float32', [1, s, 64]);
    const q = linear(g, x, ck.info('w1'));
    g.output(g.op('MultiHeadAttention', [q, x, x], { num_heads: 2 }, { domain: MS_DOMAIN, hint: 'sdpa' }), 'y');
    return g;
  };
}

test('WebGPU: MultiHeadAttention matches the CPU (pinned to it where the kernel fails its self-test, as on lavapipe)', { skip: noVulkan }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-webgpu-mha-'));
  writeSafetensors(path.join(dir, 'w.safetensors'), { w1: { dtype: 'F32', shape: [64, 64], data: rand(64 * 64, 7) } });
  const s = 64;
  const x = f32(rand(s * 64, 8).map((v) => 4 * v), [1, s, 64]);
  const files = [path.join(dir, 'w.safetensors')];
  const a = (await (await loadGraph('mha', { s }, files, mhaModel(dir, s), { device: 'cpu' })).session.run({ x })).y.data as Float32Array;
  const b = (await (await loadGraph('mha', { s }, files, mhaModel(dir, s), { device: 'webgpu' })).session.run({ x })).y.data as Float32Array;
  let maxErr = 0;
  for (let i = 0; i < a.length; i++) maxErr = Math.max(maxErr, Math.abs(a[i] - b[i]));
  // fp32 summation order gives ~2e-5 on these logits (|q·k| up to ~50); the WebGPU kernel's error was ~0.4.
  assert.ok(maxErr < 1e-4, `max |cpu - webgpu| = ${maxErr}`);
});

test('WebGPU: diffAgainstCpu compares every float intermediate of a graph', { skip: noVulkan }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-webgpu-diff-'));
  writeSafetensors(path.join(dir, 'w.safetensors'), { w1: { dtype: 'BF16', shape: [16, 8], data: f32ToBf16(rand(128, 9)) } });
  const ck = Checkpoint.open(dir);
  const { file } = compileGraph('diff', {}, [ck.info('w1').file], () => {
    const g = new Graph('diff');
    const h = silu(g, linear(g, g.input('x', 'float32', [3, 8]), ck.info('w1')));
    g.output(g.op('Softmax', [h], { axis: -1 }), 'y');
    return g;
  });
  const diffs = await diffAgainstCpu(file, { x: f32(rand(24, 10), [3, 8]) }, 'webgpu');
  // Cast (bf16 → f32), Transpose, MatMul, Sigmoid, Mul, Softmax, and the Identity naming the output.
  assert.deepEqual(diffs.map((d) => d.opType), ['Cast', 'Transpose', 'MatMul', 'Sigmoid', 'Mul', 'Softmax', 'Identity']);
  for (const d of diffs) assert.ok(d.maxAbs > 0 && d.maxAbsErr <= 1e-5 * Math.max(1, d.maxAbs), `${d.output}: ${d.maxAbsErr}`);
  assert.equal(fs.readdirSync(dir).filter((f) => f.includes('device-diff')).length, 0, 'the widened model is removed');
});
