// The Qwen3 text encoder on GPU devices: the GPU graph's shape (every projection a MatMul by an in-memory [in, out]
// weight in the compute dtype, nothing bf16 handed to ORT, embeddings fed from the host), the weight conversion,
// the refusal of fast mode, the CPU graph key left as it was, and — on WebGPU (Mesa 25 lavapipe on a CPU-only
// machine, see scripts/setup-webgpu.sh) — the golden cases in fp32 and fp16. The WebGPU tests are skipped with that
// reason when VK_ICD_FILENAMES is unset.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ortPlacements } from '../graph/ort-placement.ts';
import onnxProto from 'onnx-proto';
import { buildQwen3Graph, gpuWeightBytes, qwen3GraphKey, Qwen3TextEncoder, readQwen3Config, weightsPath, type Qwen3GpuWeight, type Qwen3GraphOptions } from '../../src/models/qwen3.ts';
import { Checkpoint, readFloat32, writeSafetensors } from '../../src/weights/safetensors.ts';
import { writeRandomQwen3Checkpoint } from '../../bench/text-encoder.ts';
import { GoldenCase, findCases } from '../../src/conform/golden.ts';
import { relativeError } from '../../src/conform/compare.ts';
import { TEXT_FP16_FACTOR } from '../../src/conform/text-encoder.ts';
import { UsageError } from '../../src/cli/errors.ts';
import { GOLDEN_DIR } from '../golden.ts';

const GOLDEN = path.join(GOLDEN_DIR, 'text_encoder');
const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (CI does)';
const STATES = [1, 9, 18, 27, 35, 36];

// the golden tiny shape in bf16, as real checkpoints are stored: 3 layers are enough for the graph's structure
const TINY = {
  model_type: 'qwen3', hidden_size: 32, intermediate_size: 64, num_hidden_layers: 36, num_attention_heads: 4, num_key_value_heads: 2,
  head_dim: 16, rms_norm_eps: 1e-6, rope_theta: 1000000, vocab_size: 512, tie_word_embeddings: true, hidden_act: 'silu',
};
const bf16Dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-qwen3-gpu-bf16-'));
writeRandomQwen3Checkpoint(bf16Dir, TINY, { seed: 5, dtype: 'BF16', layers: 3 });

/** Op types, initializers and inputs of a graph as ONNX would store it. */
function inspect(dir: string, opts: Qwen3GraphOptions): { ops: Map<string, number>; inits: onnxProto.onnx.ITensorProto[]; inputs: string[]; gpuWeights: Qwen3GpuWeight[] } {
  const ck = Checkpoint.open(weightsPath(dir));
  const gpuWeights: Qwen3GpuWeight[] = [];
  const g = buildQwen3Graph(ck, readQwen3Config(dir), opts, undefined, gpuWeights);
  const model = onnxProto.onnx.ModelProto.decode(g.serialize(dir));
  const ops = new Map<string, number>();
  for (const n of model.graph!.node!) ops.set(n.opType!, (ops.get(n.opType!) ?? 0) + 1);
  return { ops, inits: model.graph!.initializer!, inputs: model.graph!.input!.map((i) => i.name!), gpuWeights };
}

test('GPU graph: every projection is a MatMul by an in-memory [in, out] weight in the compute dtype; nothing bf16 reaches ORT', () => {
  const base = { outputLayers: [1, 2, 3], maxPositions: 16 };
  const cpu = inspect(bf16Dir, { ...base, weights: 'runtime-cast' });
  // the CPU graph as it always was: Gemm(transB) on the stored bf16 weights, each behind a Cast, the table gathered
  assert.equal(cpu.ops.get('Gemm'), 3 * 7);
  assert.ok(cpu.inits.some((t) => t.dataType === 16), 'the CPU graph keeps its bf16 weights');
  assert.ok(!cpu.inputs.includes('inputs_embeds'));
  for (const dtype of ['fp32', 'fp16'] as const) {
    const gpu = inspect(bf16Dir, { ...base, gpu: { dtype } });
    assert.equal(gpu.ops.get('Gemm'), undefined, `${dtype}: no Gemm`);
    assert.equal(gpu.ops.get('Gather'), undefined, `${dtype}: the embedding table is not in the graph`);
    assert.ok(gpu.inputs.includes('inputs_embeds'));
    // 7 projections per layer plus the two attention products (scores, probs·V) per layer
    assert.equal(gpu.ops.get('MatMul'), 3 * 9);
    assert.equal(gpu.gpuWeights.length, 3 * 7);
    assert.ok(gpu.gpuWeights.every((w) => w.fp16 === (dtype === 'fp16')));
    assert.ok(gpu.inits.every((t) => t.dataType === 1 || t.dataType === 7 || t.dataType === 10), `${dtype}: only fp32, int64 and fp16 initializers`);
    const mem = gpu.inits.filter((t) => t.externalData?.some((e) => e.key === 'location' && e.value!.startsWith('qwen3-mem/')));
    assert.equal(mem.length, 3 * 7, 'the projections come from memory');
    assert.ok(mem.every((t) => t.dataType === (dtype === 'fp16' ? 10 : 1)));
    const q = mem.find((t) => t.name === 'model.layers.0.self_attn.q_proj.weight.T')!;
    assert.deepEqual(q.dims!.map(Number), [32, 64], 'q_proj [64, 32] is stored transposed');
    // no tensor read from the checkpoint files by ORT (it cannot mix that with in-memory data)
    assert.ok(gpu.inits.every((t) => !t.externalData?.length || mem.includes(t)));
    // fp16: q/k/v share the cast of their input, as do gate/up: 4 casts in and 7 back per layer
    assert.equal(gpu.ops.get('Cast') ?? 0, (dtype === 'fp16' ? 3 * 11 : 0) + 1, `${dtype}: casts (+1 for the mask)`);
  }
});

test('gpuWeightBytes: bf16 widened, transposed to [in, out], narrowed to fp16 with values beyond ±65504 clamped and counted', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-qwen3-gpu-w-'));
  const file = path.join(dir, 'w.safetensors');
  // [out 2, in 3] in bf16: 1, 2, 3 / -1.5, 70000 (bf16 → 70144), -1e5 (bf16 → -99840)
  const bf16 = (x: number) => new Uint32Array(Float32Array.of(x).buffer)[0] >>> 16;
  writeSafetensors(file, { w: { dtype: 'BF16', shape: [2, 3], data: Uint16Array.from([1, 2, 3, -1.5, 70000, -1e5], bf16) } });
  const info = Checkpoint.open(file).info('w');
  const f32 = readFloat32(info);
  const stats = { fp16Overflows: 0 };
  const t32 = new Float32Array(gpuWeightBytes({ location: 'x', info, fp16: false }, stats).buffer);
  assert.deepEqual(Array.from(t32), [f32[0], f32[3], f32[1], f32[4], f32[2], f32[5]]);
  assert.equal(stats.fp16Overflows, 0);
  const t16 = new Uint16Array(gpuWeightBytes({ location: 'x', info, fp16: true }, stats).buffer);
  assert.deepEqual(Array.from(t16), [0x3c00, 0xbe00, 0x4000, 0x7bff, 0x4200, 0xfbff]);
  assert.equal(stats.fp16Overflows, 2);
});

test('fast (int8) precision on a GPU device is refused clearly, before the device is probed', async () => {
  for (const device of ['webgpu', 'cuda'] as const) {
    await assert.rejects(
      Qwen3TextEncoder.load(GOLDEN, { precision: 'fast', session: { device } }),
      (e: unknown) => e instanceof UsageError && e.message === `qwen3: precision fast (int8 products) runs on the CPU only; use precision exact on ${device}`,
    );
  }
  await assert.rejects(Qwen3TextEncoder.load(GOLDEN, { session: { device: 'cpu', gpuDtype: 'fp16' } }), /fp16 compute needs a GPU device/);
});

test('on the CPU the encoder computes in fp32 and its exact graphs keep the key they always had', async () => {
  const cfg = readQwen3Config(GOLDEN);
  const graphOpts: Qwen3GraphOptions = { outputLayers: [9, 18, 27], hiddenStates: [], maxPositions: 512, weights: 'runtime-cast' };
  // compiled graphs on disk are found by this key: a new field would silently recompile every user's graphs
  assert.deepEqual(qwen3GraphKey(cfg, graphOpts, ['f:1:2']), { cfg, graphOpts });
  const gpu16 = qwen3GraphKey(cfg, { ...graphOpts, weights: undefined, gpu: { dtype: 'fp16' } }, ['f:1:2']);
  const gpu32 = qwen3GraphKey(cfg, { ...graphOpts, weights: undefined, gpu: { dtype: 'fp32' } }, ['f:1:2']);
  assert.notDeepEqual(gpu16, gpu32);
  const enc = await Qwen3TextEncoder.load(GOLDEN, { session: { device: 'cpu' } });
  try {
    assert.equal(enc.device, 'cpu');
    assert.equal(enc.computeDtype, 'fp32');
    assert.equal(enc.fp16Overflows, 0);
  } finally {
    await enc.close();
  }
});

async function goldenErrors(enc: Qwen3TextEncoder): Promise<Array<{ name: string; rel: number; rms: number }>> {
  const out: Array<{ name: string; rel: number; rms: number }> = [];
  for (const c of findCases(GOLDEN, /^case.*\.safetensors$/).map((f) => new GoldenCase(f))) {
    const [batch] = c.shape('input_ids');
    const r = await enc.run(c.i64('input_ids'), c.i64('attention_mask'), batch);
    const check = (name: string, got: Float32Array, ref: Float32Array) => {
      let d = 0;
      let m = 0;
      for (let i = 0; i < ref.length; i++) {
        d = Math.max(d, Math.abs(got[i] - ref[i]));
        m = Math.max(m, Math.abs(ref[i]));
      }
      // the conformance measure: max |err| / max(1, max|ref|); NaN fails every bound below
      out.push({ name: `${c.name} ${name}`, rel: Number.isNaN(d) ? NaN : d / Math.max(1, m), rms: relativeError(got, ref).rms });
    };
    check('prompt_embeds', r.context, c.f32('prompt_embeds'));
    for (const k of STATES) if (c.has(`hidden_states.${k}`)) check(`hidden_states.${k}`, r.hiddenStates.get(k)!, c.f32(`hidden_states.${k}`));
  }
  assert.ok(out.length >= 2 + STATES.length, 'both golden cases ran');
  return out;
}

test('WebGPU fp32: the golden prompt_embeds and hidden states within 1e-4 of the reference', { skip: noVulkan }, async () => {
  const enc = await Qwen3TextEncoder.load(GOLDEN, { hiddenStates: STATES, session: { device: 'webgpu', gpuDtype: 'fp32' } });
  try {
    assert.equal(enc.device, 'webgpu');
    assert.equal(enc.computeDtype, 'fp32');
    // measured on lavapipe: 1.0e-6–1.6e-6 (max) and ~7e-7 (rms), the CPU's level
    for (const e of await goldenErrors(enc)) {
      assert.ok(e.rel < 1e-4, `${e.name}: max err / max(1, |ref|) = ${e.rel}`);
      assert.ok(e.rms < 1e-5, `${e.name}: rms err / rms ref = ${e.rms}`);
    }
  } finally {
    await enc.close();
  }
});

test('WebGPU fp16: the golden cases within the stated fp16 tolerance, and really fp16', { skip: noVulkan }, async () => {
  const enc = await Qwen3TextEncoder.load(GOLDEN, { hiddenStates: STATES, session: { device: 'webgpu', gpuDtype: 'fp16' } });
  try {
    assert.equal(enc.computeDtype, 'fp16');
    assert.equal(enc.fp16Overflows, 0);
    // measured on lavapipe: prompt_embeds 6.1e-3 (case1), 6.7e-3 (case2); hidden states 1.4e-3 (1) to 8.2e-3 (36)
    for (const e of await goldenErrors(enc)) {
      assert.ok(e.rel < TEXT_FP16_FACTOR, `${e.name}: max err / max(1, |ref|) = ${e.rel} ≥ ${TEXT_FP16_FACTOR}`);
      // fp32 gives ≤ 1.6e-6: an error below 1e-4 means the products did not run in fp16
      assert.ok(e.rel > 1e-4, `${e.name}: ${e.rel} is fp32-level: the fp16 path did not run`);
    }
  } finally {
    await enc.close();
  }
});

test('WebGPU fp16 on a bf16 checkpoint: every MatMul, Softmax and fp16 Cast on the WebGPU provider; the CPU keeps only shape and mask ops', { skip: noVulkan }, async () => {
  // a child process loads the encoder at ORT's verbose log level (see ort-placement.ts). Before the GPU graph, this checkpoint put every
  // bf16 weight Cast and the embedding Gather on the CPU provider (measured 203 CPU nodes at 27 layers).
  const logFile = path.join(bf16Dir, 'ort.log');
  const script = `import { Qwen3TextEncoder } from ${JSON.stringify(path.resolve(import.meta.dirname, '../../src/models/qwen3.ts'))};
    const enc = await Qwen3TextEncoder.load(${JSON.stringify(bf16Dir)}, { outputLayers: [1, 2, 3], maxPositions: 16, session: { device: 'webgpu', gpuDtype: 'fp16' } });
    await enc.close();`;
  const placements = await ortPlacements(script, logFile);
  assert.equal(placements.length, 1, 'one session');
  const placed = placements[0];
  const gpu = placed.WebGpuExecutionProvider ?? {};
  const cpu = placed.CPUExecutionProvider ?? {};
  assert.equal(gpu.MatMul, 3 * 9, `7 projections + 2 attention products per layer: ${JSON.stringify(gpu)}`);
  assert.equal(gpu.Softmax, 3);
  assert.equal(gpu.Cast, 3 * 11, 'the fp16 casts around the projections');
  // int64 shape arithmetic and the causal/padding mask: ORT keeps such ops on the CPU on purpose; the one Cast is
  // the int64 attention mask's to bool
  const shapeOps = new Set(['Shape', 'Slice', 'Concat', 'Squeeze', 'Unsqueeze', 'Range', 'LessOrEqual', 'Cast']);
  for (const op of Object.keys(cpu)) assert.ok(shapeOps.has(op), `${op} on the CPU provider: ${JSON.stringify(cpu)}`);
  assert.ok((cpu.Cast ?? 0) <= 1, `Casts on the CPU: ${JSON.stringify(cpu)}`);
});

test('WebGPU fp16: an activation beyond fp16 range is reported as an overflow naming fp32, not returned as Inf/NaN', { skip: noVulkan }, async () => {
  // one layer whose MLP gate/up products reach ~1e7 (all-ones embeddings and norms, gate/up weights 100 over 32
  // inputs: silu(3200)·3200): finite in fp32, beyond 65504 when cast to fp16 for down_proj
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-qwen3-gpu-overflow-'));
  const H = 32;
  const full = (shape: number[], v: number) => ({ dtype: 'F32' as const, shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(v) });
  const p = 'model.layers.0.';
  writeSafetensors(path.join(dir, 'model.safetensors'), {
    'model.embed_tokens.weight': full([512, H], 1),
    [`${p}input_layernorm.weight`]: full([H], 1), [`${p}post_attention_layernorm.weight`]: full([H], 1),
    [`${p}self_attn.q_proj.weight`]: full([64, H], 0.01), [`${p}self_attn.k_proj.weight`]: full([32, H], 0.01), [`${p}self_attn.v_proj.weight`]: full([32, H], 0.01),
    [`${p}self_attn.o_proj.weight`]: full([H, 64], 0.01), [`${p}self_attn.q_norm.weight`]: full([16], 1), [`${p}self_attn.k_norm.weight`]: full([16], 1),
    [`${p}mlp.gate_proj.weight`]: full([64, H], 100), [`${p}mlp.up_proj.weight`]: full([64, H], 100), [`${p}mlp.down_proj.weight`]: full([H, 64], 1e-3),
  });
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(TINY));
  const ids = BigInt64Array.from([1n, 2n, 3n, 4n]);
  const mask = BigInt64Array.from([1n, 1n, 1n, 1n]);
  const fp32 = await Qwen3TextEncoder.load(dir, { outputLayers: [1], maxPositions: 8, session: { device: 'webgpu', gpuDtype: 'fp32' } });
  try {
    assert.ok((await fp32.embed(ids, mask, 1)).every(Number.isFinite), 'fp32 holds these activations');
  } finally {
    await fp32.close();
  }
  const fp16 = await Qwen3TextEncoder.load(dir, { outputLayers: [1], maxPositions: 8, session: { device: 'webgpu', gpuDtype: 'fp16' } });
  try {
    assert.equal(fp16.fp16Overflows, 0, 'the weights themselves fit fp16');
    await assert.rejects(fp16.embed(ids, mask, 1), /the fp16 text encoder overflowed .*KLEIN_GPU_DTYPE=fp32/);
  } finally {
    await fp16.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
