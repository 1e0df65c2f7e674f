import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { layersNeeded, parseQwen3Config, Qwen3ConfigError } from '../../src/models/qwen3/config.ts';
import { Qwen3TextEncoder } from '../../src/models/qwen3/runtime.ts';
import { rotateHalfAngles } from '../../src/graph/nn/rope.ts';
import { writeRandomQwen3Checkpoint } from '../../src/fixtures/qwen3.ts';
import { cpuTarget } from '../../src/runtime/target.ts';
import { UserError } from '../../src/errors.ts';

// the golden tiny shape: 36 layers so klein's 9/18/27 apply, head_dim 16 ≠ hidden/heads = 8
const TINY = {
  model_type: 'qwen3', hidden_size: 32, intermediate_size: 64, num_hidden_layers: 36, num_attention_heads: 4, num_key_value_heads: 2,
  head_dim: 16, rms_norm_eps: 1e-6, rope_theta: 1000000, vocab_size: 512, tie_word_embeddings: true, hidden_act: 'silu',
};

const tmp = (p: string) => fs.mkdtempSync(path.join(os.tmpdir(), p));
const target = cpuTarget();
const bf16Dir = tmp('klein-qwen3-bf16-');
writeRandomQwen3Checkpoint(bf16Dir, TINY, { seed: 11, dtype: 'BF16', layers: 27 });

function batch(rows: number[][], L = 64): { ids: BigInt64Array; mask: BigInt64Array } {
  const ids = new BigInt64Array(rows.length * L).fill(511n);
  const mask = new BigInt64Array(rows.length * L);
  rows.forEach((r, b) => r.forEach((t, i) => {
    ids[b * L + i] = BigInt(t);
    mask[b * L + i] = 1n;
  }));
  return { ids, mask };
}

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

test('config.json parsing: head_dim defaults to hidden/heads, explicit head_dim wins, unsupported models are named', () => {
  const c = parseQwen3Config(TINY);
  assert.equal(c.headDim, 16);
  assert.equal(parseQwen3Config({ ...TINY, head_dim: undefined }).headDim, 8);
  assert.equal(parseQwen3Config({ ...TINY, num_key_value_heads: undefined }).numKeyValueHeads, 4);
  assert.equal(parseQwen3Config({ ...TINY, rope_theta: undefined, rope_parameters: { rope_type: 'default', rope_theta: 5e6 } }).ropeTheta, 5e6);
  assert.throws(() => parseQwen3Config({ ...TINY, model_type: 'mistral' }), /expected "qwen3"/);
  assert.throws(() => parseQwen3Config({ ...TINY, rope_scaling: { rope_type: 'yarn', factor: 4 } }), /yarn/);
  assert.throws(() => parseQwen3Config({ ...TINY, num_key_value_heads: 3 }), /multiple/);
  assert.throws(() => parseQwen3Config({ ...TINY, hidden_size: 'big' }), /hidden_size must be a number/);
  assert.throws(() => parseQwen3Config({ ...TINY, model_type: 'llama' }), (e) => e instanceof Qwen3ConfigError && e instanceof UserError, 'a config the user can fix is a UserError');
  assert.equal(layersNeeded({ outputLayers: [9, 18, 27] }), 27);
  assert.equal(layersNeeded({ outputLayers: [9], hiddenStates: [36] }), 36);
});

test('RoPE tables: position 0 is the identity, halves duplicated, angle = position · θ^(-2i/d)', () => {
  const { cos, sin } = rotateHalfAngles(16, 1e6, 8);
  for (let i = 0; i < 16; i++) {
    assert.equal(cos[i], 1);
    assert.equal(sin[i], 0);
  }
  assert.equal(cos[16 * 3 + 2], cos[16 * 3 + 10]);
  assert.ok(Math.abs(sin[16 * 5 + 1] - Math.sin(5 * 1e6 ** (-2 / 16))) < 1e-6);
});

test('sharded bf16 checkpoint: context is [B, L, 3·hidden], batch rows are independent, pads never leak into real tokens', async () => {
  const enc = await Qwen3TextEncoder.load(bf16Dir, { target, hiddenStates: [9, 27], maxPositions: 64 });
  try {
    assert.equal(enc.contextDim, 96);
    assert.ok(enc.weightFiles.length >= 27, 'the index.json shards are referenced');
    const a = [500, 502, 504, 17, 42, 99, 501, 504];
    const b = [500, 502, 504, 7, 8, 9, 10, 11, 12, 501, 504, 500, 503];
    const both = batch([a, b]);
    const r = await enc.run(both.ids, both.mask, 2);
    assert.equal(r.context.length, 2 * 64 * 96);
    assert.ok(r.context.every(Number.isFinite));
    const row = 64 * 96;
    const onlyB = batch([b]);
    assert.ok(maxDiff(r.context.subarray(row), await enc.embed(onlyB.ids, onlyB.mask, 1)) < 1e-5, 'batching changes nothing');
    // context = [hs9 ‖ hs18 ‖ hs27] per token
    const hs9 = r.hiddenStates.get(9)!;
    const hs27 = r.hiddenStates.get(27)!;
    for (const t of [0, 5, 63]) {
      assert.deepEqual(Array.from(r.context.subarray(t * 96, t * 96 + 32)), Array.from(hs9.subarray(t * 32, t * 32 + 32)));
      assert.deepEqual(Array.from(r.context.subarray(t * 96 + 64, t * 96 + 96)), Array.from(hs27.subarray(t * 32, t * 32 + 32)));
    }
    // key-padding mask: different ids at padded positions leave every real token's state unchanged …
    const other = batch([a]);
    for (let i = a.length; i < 64; i++) other.ids[i] = BigInt(i);
    const base = batch([a]);
    const x = await enc.embed(base.ids, base.mask, 1);
    const y = await enc.embed(other.ids, other.mask, 1);
    assert.ok(maxDiff(x.subarray(0, a.length * 96), y.subarray(0, a.length * 96)) < 1e-6);
    // … while the padded rows themselves differ (they are computed, not zeroed: the transformer sees them)
    assert.ok(maxDiff(x.subarray(a.length * 96), y.subarray(a.length * 96)) > 1e-3);
    // causal mask: a later real token does not change earlier ones
    const changed = batch([[...a.slice(0, 5), 123, ...a.slice(6)]]);
    const z = await enc.embed(changed.ids, changed.mask, 1);
    assert.ok(maxDiff(x.subarray(0, 5 * 96), z.subarray(0, 5 * 96)) < 1e-6);
    assert.ok(maxDiff(x.subarray(5 * 96, 6 * 96), z.subarray(5 * 96, 6 * 96)) > 1e-3);
    // bad input is a clear error
    await assert.rejects(enc.embed(batch([[600]]).ids, batch([[600]]).mask, 1), /outside the vocabulary/);
    await assert.rejects(enc.embed(new BigInt64Array(10), new BigInt64Array(9), 1), /attention_mask/);
    await assert.rejects(enc.embed(new BigInt64Array(130), new BigInt64Array(130), 1), /exceeds/);
  } finally {
    await enc.close();
  }
});

test('bf16 weights widened into the weight store give the same context as their exact fp32 copy, which is used in place', async () => {
  const f32Dir = tmp('klein-qwen3-f32-');
  writeRandomQwen3Checkpoint(f32Dir, TINY, { seed: 11, dtype: 'F32', layers: 27 });
  const x = batch([[500, 502, 504, 1, 2, 3, 501]], 16);
  const e1 = await Qwen3TextEncoder.load(bf16Dir, { target, maxPositions: 16 });
  const e2 = await Qwen3TextEncoder.load(f32Dir, { target, maxPositions: 16 });
  try {
    const a = await e1.embed(x.ids, x.mask, 1);
    const b = await e2.embed(x.ids, x.mask, 1);
    assert.ok(maxDiff(a, b) < 1e-5, `bf16 store vs fp32 checkpoint: max diff ${maxDiff(a, b)}`);
    assert.equal(e1.computeDtype, 'fp32');
    // the fp32 checkpoint's tensors are hard-linked, not copied: its weights.bin holds nothing
    assert.equal(fs.statSync(path.join(e2.weightStore.folder, 'weights.bin')).size, 0);
    assert.ok(fs.statSync(path.join(e1.weightStore.folder, 'weights.bin')).size > 0);
  } finally {
    await Promise.all([e1.close(), e2.close()]);
  }
});

test('a checkpoint lacking the layers a request needs fails before ORT, naming the tensor', async () => {
  await assert.rejects(Qwen3TextEncoder.load(bf16Dir, { target, hiddenStates: [30] }), /missing model\.layers\.27\./);
  await assert.rejects(Qwen3TextEncoder.load(bf16Dir, { target, outputLayers: [40] }), /hidden state 40 does not exist/);
  const bad = tmp('klein-qwen3-bad-');
  writeRandomQwen3Checkpoint(bad, TINY, { seed: 1, layers: 27 });
  fs.writeFileSync(path.join(bad, 'config.json'), JSON.stringify({ ...TINY, intermediate_size: 48 }));
  await assert.rejects(Qwen3TextEncoder.load(bad, { target }), /mlp\.gate_proj\.weight has shape \[64,32\], config\.json implies \[48,32\]/);
});
