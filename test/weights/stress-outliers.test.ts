import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  MASSIVE_CHANNELS,
  MASSIVE_FACTOR,
  MASSIVE_TOKENS,
  OUTLIER_CHANNEL_FACTORS,
  SWIGLU_FACTOR,
  applyOutlierEdits,
  applyOutlierEditsBf16,
  outlierChannels,
  qwen3OutlierEdits,
} from '../../src/weights/stress-outliers.ts';
import { Checkpoint, SafetensorsFile, bf16ToF32, f32ToBf16, readFloat32 } from '../../src/weights/safetensors.ts';
import { KLEIN_4B, writeRandomFlux2Checkpoint, type Flux2Config } from '../../src/models/flux2-transformer.ts';
import { writeRandomQwen3Checkpoint } from '../../bench/text-encoder.ts';

const tmp = (p: string) => fs.mkdtempSync(path.join(os.tmpdir(), p));

test('outlierChannels: fixed, distinct, inside the width, a different set per salt', () => {
  const a = outlierChannels(3072, 4);
  assert.deepEqual(a, outlierChannels(3072, 4));
  assert.deepEqual(a, [284, 1052, 1820, 2588]);
  assert.equal(new Set(a).size, 4);
  for (const w of [7, 32, 9728]) for (const c of outlierChannels(w, 4, 2)) assert.ok(c >= 0 && c < w);
  assert.notDeepEqual(outlierChannels(3072, 2, 1), a.slice(0, 2));
});

test('qwen3OutlierEdits: norm channels ×20–100, massive template tokens, SwiGLU rows; nothing else', () => {
  const norm = qwen3OutlierEdits('model.layers.3.input_layernorm.weight', [2560]);
  assert.deepEqual(norm.map((e) => e.factor), [...OUTLIER_CHANNEL_FACTORS]);
  assert.deepEqual(norm.map((e) => e.cols![0]), outlierChannels(2560, 4));
  assert.deepEqual(qwen3OutlierEdits('layers.0.post_attention_layernorm.weight', [2560]), norm);
  const emb = qwen3OutlierEdits('model.embed_tokens.weight', [151936, 2560]);
  assert.deepEqual(emb, [{ rows: [...MASSIVE_TOKENS], cols: outlierChannels(2560, MASSIVE_CHANNELS, 1), factor: MASSIVE_FACTOR }]);
  assert.deepEqual(qwen3OutlierEdits('model.embed_tokens.weight', [100, 32])[0].rows, [], 'a tiny vocabulary has none of the template tokens');
  const gate = qwen3OutlierEdits('model.layers.1.mlp.gate_proj.weight', [9728, 2560]);
  assert.deepEqual(gate, qwen3OutlierEdits('model.layers.1.mlp.up_proj.weight', [9728, 2560]));
  assert.equal(gate[0].factor, SWIGLU_FACTOR);
  for (const n of ['model.layers.1.mlp.down_proj.weight', 'model.layers.1.self_attn.q_proj.weight', 'model.norm.weight', 'model.layers.1.self_attn.q_norm.weight']) {
    assert.deepEqual(qwen3OutlierEdits(n, [8, 8]), [], n);
  }
});

test('applyOutlierEdits: x·factor + offset on the named entries only; the bf16 form rounds the same result', () => {
  const x = Float32Array.from({ length: 12 }, (_, i) => i + 1); // [3, 4]
  const edits = [{ rows: [1], cols: [0, 3], factor: 10 }, { rows: [2], offset: 0.5 }];
  const y = Float32Array.from(x);
  applyOutlierEdits(y, [3, 4], edits);
  assert.deepEqual(Array.from(y), [1, 2, 3, 4, 50, 6, 7, 80, 9.5, 10.5, 11.5, 12.5]);
  const b = f32ToBf16(x);
  applyOutlierEditsBf16(b, [3, 4], edits);
  assert.deepEqual(Array.from(bf16ToF32(b)), Array.from(bf16ToF32(f32ToBf16(y))));
  const v = Float32Array.of(1, 1, 1);
  applyOutlierEdits(v, [3], [{ cols: [1], factor: 40 }]);
  assert.deepEqual(Array.from(v), [1, 40, 1]);
  assert.throws(() => applyOutlierEdits(v, [3], [{ cols: [3], factor: 2 }]), /column 3 outside/);
  assert.throws(() => applyOutlierEdits(y, [3, 4], [{ rows: [3], factor: 2 }]), /row 3 outside/);
});

/** `timestep_embedding(t)` → time_in → silu, the input of every modulation (spec §1.2), in float64. */
function siluVec(st: SafetensorsFile, t: number): Float64Array {
  const W = (n: string) => ({ d: readFloat32(st.tensors.get(n)!), s: st.tensors.get(n)!.shape });
  const mv = (w: { d: Float32Array; s: number[] }, x: Float64Array) => Float64Array.from({ length: w.s[0] }, (_, r) => x.reduce((a, v, k) => a + w.d[r * w.s[1] + k] * v, 0));
  const silu = (x: Float64Array) => x.map((v) => v / (1 + Math.exp(-v)));
  const emb = new Float64Array(256);
  for (let k = 0; k < 128; k++) {
    const a = 1000 * t * Math.exp((-Math.log(10000) * k) / 128);
    emb[k] = Math.cos(a);
    emb[128 + k] = Math.sin(a);
  }
  return silu(mv(W('time_in.out_layer.weight'), silu(mv(W('time_in.in_layer.weight'), emb))));
}

test('writeRandomFlux2Checkpoint outliers: (1 + scale) of the adaLN outlier channels within 2× of 20/40/70/100 at every t; SwiGLU rows ×8', () => {
  const cfg: Flux2Config = { ...KLEIN_4B, hiddenSize: 1024, numHeads: 8, contextInDim: 64, depth: 1, depthSingleBlocks: 1 };
  const dir = tmp('klein-stress-flux2-');
  const [plain, stress] = [path.join(dir, 'plain.safetensors'), path.join(dir, 'stress.safetensors')];
  writeRandomFlux2Checkpoint(plain, cfg, { dtype: 'F32', seed: 3 });
  writeRandomFlux2Checkpoint(stress, cfg, { dtype: 'F32', seed: 3, outliers: true });
  const [p, s] = [new SafetensorsFile(plain), new SafetensorsFile(stress)];
  const changed = [...s.tensors.keys()].filter((n) => {
    const before = readFloat32(p.tensors.get(n)!);
    return !readFloat32(s.tensors.get(n)!).every((v, i) => v === before[i]);
  });
  assert.deepEqual(changed.sort(), ['double_blocks.0.img_mlp.0.weight', 'double_blocks.0.txt_mlp.0.weight', 'double_stream_modulation_img.lin.weight', 'double_stream_modulation_txt.lin.weight', 'single_blocks.0.linear1.weight', 'single_stream_modulation.lin.weight']);
  const H = cfg.hiddenSize;
  const mod = readFloat32(s.tensors.get('single_stream_modulation.lin.weight')!);
  for (const t of [0, 0.5, 1]) {
    const v = siluVec(s, t);
    outlierChannels(H, 4).forEach((c, i) => {
      const scale = v.reduce((a, x, k) => a + mod[(H + c) * H + k] * x, 0);
      const ratio = (1 + scale) / OUTLIER_CHANNEL_FACTORS[i];
      assert.ok(ratio > 0.5 && ratio < 2, `t ${t}, channel ${c}: 1 + scale = ${(1 + scale).toFixed(1)} for a target of ${OUTLIER_CHANNEL_FACTORS[i]}`);
    });
  }
  const mlp = 3 * H;
  const gate = readFloat32(s.tensors.get('double_blocks.0.img_mlp.0.weight')!);
  const gate0 = readFloat32(p.tensors.get('double_blocks.0.img_mlp.0.weight')!);
  for (const c of outlierChannels(mlp, 4, 2)) for (const row of [c, mlp + c]) assert.equal(gate[row * H + 5], Math.fround(gate0[row * H + 5] * SWIGLU_FACTOR));
});

test('writeRandomQwen3Checkpoint outliers: the template tokens carry two channels ×1000, norm channels ×20–100', () => {
  const config = {
    model_type: 'qwen3', hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1,
    head_dim: 8, rms_norm_eps: 1e-6, rope_theta: 1000000, vocab_size: 151936, tie_word_embeddings: true, hidden_act: 'silu',
  };
  const [plain, stress] = [tmp('klein-stress-qwen3-'), tmp('klein-stress-qwen3-')];
  writeRandomQwen3Checkpoint(plain, config, { seed: 5, layers: 2 });
  writeRandomQwen3Checkpoint(stress, config, { seed: 5, layers: 2, outliers: true });
  const [p, s] = [Checkpoint.open(plain), Checkpoint.open(stress)];
  const e0 = readFloat32(p.info('model.embed_tokens.weight'));
  const e1 = readFloat32(s.info('model.embed_tokens.weight'));
  const mc = outlierChannels(16, MASSIVE_CHANNELS, 1);
  for (const tok of MASSIVE_TOKENS) {
    for (let c = 0; c < 16; c++) {
      const ratio = e1[tok * 16 + c] / e0[tok * 16 + c];
      if (mc.includes(c)) assert.ok(Math.abs(ratio / MASSIVE_FACTOR - 1) < 0.01, `token ${tok} channel ${c}: ×${ratio}`);
      else assert.equal(ratio, 1);
    }
  }
  assert.equal(e1[5 * 16 + mc[0]], e0[5 * 16 + mc[0]], 'other tokens are untouched');
  const g0 = readFloat32(p.info('model.layers.1.input_layernorm.weight'));
  const g1 = readFloat32(s.info('model.layers.1.input_layernorm.weight'));
  outlierChannels(16, 4).forEach((c, i) => assert.ok(Math.abs(g1[c] / g0[c] / OUTLIER_CHANNEL_FACTORS[i] - 1) < 0.01));
  assert.deepEqual(readFloat32(s.info('model.layers.1.mlp.down_proj.weight')), readFloat32(p.info('model.layers.1.mlp.down_proj.weight')));
});
