// The Qwen3 text encoder on GPU devices: the GPU graph's shape (every projection a MatMul by an [in, out] weight in
// the compute dtype, nothing bf16 handed to ORT, embeddings fed from the host), the weight conversion, the refusal of
// fast mode, and — on WebGPU (Mesa 25 lavapipe on a CPU-only machine, see scripts/setup-webgpu.sh) — the golden
// cases in fp32 and fp16. The WebGPU tests are skipped with that reason when VK_ICD_FILENAMES is unset.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ortPlacements } from '../graph/ort-placement.ts';
import { Graph } from '../../src/graph/onnx-graph.ts';
import { Layers } from '../../src/graph/nn/layers.ts';
import { policyFor } from '../../src/runtime/component.ts';
import { cpuTarget, resolveTarget, type ExecutionTarget } from '../../src/runtime/target.ts';
import { Qwen3Weights } from '../../src/models/qwen3/checkpoint.ts';
import { isProjection } from '../../src/models/qwen3/config.ts';
import { buildQwen3Forward } from '../../src/models/qwen3/forward.ts';
import { Qwen3TextEncoder } from '../../src/models/qwen3/runtime.ts';
import { Checkpoint, readFloat32, writeSafetensors } from '../../src/weights/safetensors.ts';
import { convertedRef } from '../../src/weights/weight-ref.ts';
import { computeWeight, conversionState } from '../../src/weights/weight-values.ts';
import { writeRandomQwen3Checkpoint } from '../../src/fixtures/qwen3.ts';
import { GoldenCase, findCases } from '../../src/conform/golden.ts';
import { relativeError } from '../../src/conform/compare.ts';
import { TEXT_FP16_FACTOR } from '../../src/conform/text-encoder.ts';
import { UserError } from '../../src/errors.ts';
import { GOLDEN_DIR } from '../golden.ts';

const GOLDEN = path.join(GOLDEN_DIR, 'text_encoder');
const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (CI does)';
const STATES = [1, 9, 18, 27, 35, 36];
const webgpu = (gpuDtype: 'fp32' | 'fp16'): Promise<ExecutionTarget> => resolveTarget({ device: 'webgpu', gpuDtype });

// the golden tiny shape in bf16, as real checkpoints are stored: 3 layers are enough for the graph's structure
const TINY = {
  model_type: 'qwen3', hidden_size: 32, intermediate_size: 64, num_hidden_layers: 36, num_attention_heads: 4, num_key_value_heads: 2,
  head_dim: 16, rms_norm_eps: 1e-6, rope_theta: 1000000, vocab_size: 512, tie_word_embeddings: true, hidden_act: 'silu',
};
const bf16Dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-qwen3-gpu-bf16-'));
writeRandomQwen3Checkpoint(bf16Dir, TINY, { seed: 5, dtype: 'BF16', layers: 3 });

/** The encoder's graph for layers 1–3 on `target`: op counts, inputs and the weights it asks the store for. */
function inspect(target: ExecutionTarget): { ops: Map<string, number>; g: Graph } {
  const w = Qwen3Weights.open(bf16Dir);
  const g = new Graph('qwen3');
  buildQwen3Forward(new Layers({ g, weights: w, policy: policyFor(target, { int8: isProjection }) }), w.config, { outputLayers: [1, 2, 3], hiddenStates: [], maxPositions: 16 });
  const ops = new Map<string, number>();
  for (const n of g.nodes) ops.set(n.proto.opType!, (ops.get(n.proto.opType!) ?? 0) + 1);
  return { ops, g };
}

test('GPU graph: every projection is a MatMul by an [in, out] weight in the compute dtype; nothing bf16 reaches ORT', () => {
  // the exact CPU graph: FusedMatMul(transB) on the [out, in] weights widened to fp32
  const cpu = inspect(cpuTarget());
  assert.equal(cpu.ops.get('FusedMatMul'), 3 * 7);
  assert.ok([...cpu.g.weights.values()].every((r) => r.type === 'float32' && r.transform.kind === 'convert' && !r.transform.transpose));
  for (const dtype of ['fp32', 'fp16'] as const) {
    const { ops, g } = inspect({ device: 'webgpu', precision: 'exact', gpuDtype: dtype });
    assert.equal(ops.get('Gemm'), undefined, `${dtype}: no Gemm`);
    assert.equal(ops.get('FusedMatMul'), undefined, `${dtype}: no FusedMatMul (WebGPU has none)`);
    assert.equal(ops.get('Gather'), undefined, `${dtype}: the embedding table is not in the graph`);
    assert.ok(g.inputs.some((i) => i.value.name === 'inputs_embeds'));
    // 7 projections per layer plus the two attention products (scores, probs·V) per layer
    assert.equal(ops.get('MatMul'), 3 * 9);
    const refs = [...g.weights.values()];
    const projections = refs.filter((r) => r.transform.kind === 'convert' && r.transform.transpose);
    assert.equal(projections.length, 3 * 7, 'the projections, transposed to [in, out]');
    assert.ok(projections.every((r) => r.type === (dtype === 'fp16' ? 'float16' : 'float32')));
    const q = projections.find((r) => r.key === 'layers.0.self_attn.q_proj.weight.T')!;
    assert.deepEqual(q.dims, [32, 64], 'q_proj [64, 32] is stored transposed');
    // the norms stay fp32; no bf16 tensor is handed to ORT, and the 512-row embedding table not at all
    assert.ok(refs.every((r) => r.type === 'float32' || r.type === 'float16'), `${dtype}: only fp32 and fp16 weights`);
    assert.ok(!refs.some((r) => r.key.includes('embed_tokens')));
    // fp16: q/k/v share the cast of their input, as do gate/up: 4 casts in and 7 back per layer
    assert.equal(ops.get('Cast') ?? 0, (dtype === 'fp16' ? 3 * 11 : 0) + 1, `${dtype}: casts (+1 for the mask)`);
  }
});

test('GPU weights: bf16 widened, transposed to [in, out], narrowed to fp16 with values beyond ±65504 clamped and counted', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-qwen3-gpu-w-'));
  const file = path.join(dir, 'w.safetensors');
  // [out 2, in 3] in bf16: 1, 2, 3 / -1.5, 70000 (bf16 → 70144), -1e5 (bf16 → -99840)
  const bf16 = (x: number) => new Uint32Array(Float32Array.of(x).buffer)[0] >>> 16;
  writeSafetensors(file, { w: { dtype: 'BF16', shape: [2, 3], data: Uint16Array.from([1, 2, 3, -1.5, 70000, -1e5], bf16) } });
  const info = Checkpoint.open(file).info('w');
  const f32 = readFloat32(info);
  const state = conversionState();
  const stats = state.stats;
  const bytes = async (type: 'float32' | 'float16') => computeWeight(convertedRef('w.T', { parts: [info] }, type, { transpose: true }), state);
  const t32 = await bytes('float32');
  assert.deepEqual(Array.from(new Float32Array(t32.buffer, t32.byteOffset, 6)), [f32[0], f32[3], f32[1], f32[4], f32[2], f32[5]]);
  assert.equal(stats.fp16Overflows, 0);
  const t16 = await bytes('float16');
  assert.deepEqual(Array.from(new Uint16Array(t16.buffer, t16.byteOffset, 6)), [0x3c00, 0xbe00, 0x4000, 0x7bff, 0x4200, 0xfbff]);
  assert.equal(stats.fp16Overflows, 2);
});

test('fast (int8) precision on a GPU device, and fp16 on the CPU, are refused clearly, before the device is probed', async () => {
  for (const device of ['webgpu', 'cuda'] as const) {
    await assert.rejects(
      resolveTarget({ device, precision: 'fast' }),
      (e: unknown) => e instanceof UserError && e.message === `precision fast (int8 products) runs on the CPU only; use precision exact on ${device}`,
    );
  }
  await assert.rejects(resolveTarget({ device: 'cpu', gpuDtype: 'fp16' }), /fp16 compute needs a GPU device/);
});

test('on the CPU the encoder computes in fp32', async () => {
  const enc = await Qwen3TextEncoder.load(GOLDEN, { target: cpuTarget() });
  try {
    assert.equal(enc.target.device, 'cpu');
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
  const enc = await Qwen3TextEncoder.load(GOLDEN, { hiddenStates: STATES, target: await webgpu('fp32') });
  try {
    assert.equal(enc.target.device, 'webgpu');
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
  const enc = await Qwen3TextEncoder.load(GOLDEN, { hiddenStates: STATES, target: await webgpu('fp16') });
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
  // the weight store is built here first: its conversion worker cannot start under the child's --input-type flag
  const options = { target: await webgpu('fp16'), outputLayers: [1, 2, 3], maxPositions: 16 };
  await (await Qwen3TextEncoder.load(bf16Dir, options)).close();
  const src = (f: string) => JSON.stringify(path.resolve(import.meta.dirname, '../../src', f));
  const script = `import { Qwen3TextEncoder } from ${src('models/qwen3/runtime.ts')};
    import { resolveTarget } from ${src('runtime/target.ts')};
    const target = await resolveTarget({ device: 'webgpu', gpuDtype: 'fp16' });
    const enc = await Qwen3TextEncoder.load(${JSON.stringify(bf16Dir)}, { target, outputLayers: [1, 2, 3], maxPositions: 16 });
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
  const fp32 = await Qwen3TextEncoder.load(dir, { target: await webgpu('fp32'), outputLayers: [1], maxPositions: 8 });
  try {
    assert.ok((await fp32.embed(ids, mask, 1)).every(Number.isFinite), 'fp32 holds these activations');
  } finally {
    await fp32.close();
  }
  const fp16 = await Qwen3TextEncoder.load(dir, { target: await webgpu('fp16'), outputLayers: [1], maxPositions: 8 });
  try {
    assert.equal(fp16.fp16Overflows, 0, 'the weights themselves fit fp16');
    await assert.rejects(fp16.embed(ids, mask, 1), /the fp16 text encoder overflowed .*KLEIN_GPU_DTYPE=fp32/);
  } finally {
    await fp16.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
