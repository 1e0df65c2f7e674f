import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FLUX2_DEV, KLEIN_4B, KLEIN_9B, type Flux2Config } from '../../src/models/flux2/config.ts';
import { Flux2Transformer } from '../../src/models/flux2/runtime.ts';
import { Flux2CheckpointError, flux2BflShapes, openFlux2Checkpoint } from '../../src/models/flux2/checkpoint.ts';
import { writeRandomFlux2Checkpoint } from '../../src/fixtures/flux2.ts';
import { cpuTarget } from '../../src/runtime/target.ts';
import { Checkpoint, SafetensorsFile, readRaw, writeSafetensors, type TensorToWrite } from '../../src/weights/safetensors.ts';
import { GOLDEN_DIR } from '../golden.ts';

const GOLDEN = path.join(GOLDEN_DIR, 'transformer');
const readFlux2Config = (p: string) => openFlux2Checkpoint(p).config;
const load = (p: string) => Flux2Transformer.load(p, { target: cpuTarget() });
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'klein-flux2-'));

/** A tiny config like the golden one but with other numbers (3 heads, odd depths, unequal RoPE axes). */
const TINY: Flux2Config = { inChannels: 16, contextInDim: 24, hiddenSize: 96, numHeads: 3, depth: 1, depthSingleBlocks: 3, axesDim: [4, 12, 8, 8], theta: 2000, mlpRatio: 2, useGuidanceEmbed: false };

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** Inputs for `batch` samples of a gw × gh grid plus `refs` reference grids and `nCtx` text tokens. */
function inputs(c: Flux2Config, batch: number, gw: number, gh: number, nCtx: number, refs: Array<[number, number]> = [], seed = 1) {
  let s = seed;
  const rnd = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
  const grids: Array<[number, number, number]> = [[0, gw, gh], ...refs.map(([w, h], k): [number, number, number] => [10 + 10 * k, w, h])];
  const n = grids.reduce((a, [, w, h]) => a + w * h, 0);
  const xIds = new BigInt64Array(batch * n * 4);
  for (let b = 0; b < batch; b++) {
    let i = b * n;
    for (const [t, w, h] of grids) for (let r = 0; r < h; r++) for (let col = 0; col < w; col++, i++) xIds.set([BigInt(t), BigInt(r), BigInt(col), 0n], i * 4);
  }
  const ctxIds = new BigInt64Array(batch * nCtx * 4);
  for (let b = 0; b < batch; b++) for (let l = 0; l < nCtx; l++) ctxIds[(b * nCtx + l) * 4 + 3] = BigInt(l);
  return {
    x: Float32Array.from({ length: batch * n * c.inChannels }, rnd),
    xIds,
    timesteps: Float32Array.from({ length: batch }, (_, b) => 0.9 - 0.5 * b),
    ctx: Float32Array.from({ length: batch * nCtx * c.contextInDim }, rnd),
    ctxIds,
    batch,
    nTokens: n,
    nCtx,
  };
}

test('parameter counts of the presets match the spec (klein 4B = 3,875,544,576 in 149 tensors)', () => {
  const count = (c: Flux2Config) => flux2BflShapes(c).reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0);
  assert.equal(count(KLEIN_4B), 3_875_544_576);
  assert.equal(flux2BflShapes(KLEIN_4B).length, 149);
  assert.equal(Math.round(count(KLEIN_9B) / 1e6), 9079);
  assert.equal(flux2BflShapes(KLEIN_9B).length, 201);
  assert.equal(Math.round(count(FLUX2_DEV) / 1e6), 32223);
  assert.equal(flux2BflShapes(FLUX2_DEV).length, 299);
});

test('configs: golden BFL params, diffusers config.json and shape inference agree', () => {
  const bfl = readFlux2Config(GOLDEN);
  assert.deepEqual(bfl, { inChannels: 128, contextInDim: 96, hiddenSize: 64, numHeads: 2, depth: 2, depthSingleBlocks: 2, axesDim: [8, 8, 8, 8], theta: 2000, mlpRatio: 3, useGuidanceEmbed: false });
  assert.deepEqual(readFlux2Config(path.join(GOLDEN, 'diffusers')), bfl);
  const w = openFlux2Checkpoint(path.join(GOLDEN, 'diffusers'));
  assert.equal(w.layout, 'diffusers');
  // a bare BFL file without config.json (like flux-2-klein-4b.safetensors): read off the shapes
  const dir = tmp();
  fs.linkSync(path.join(GOLDEN, 'model.safetensors'), path.join(dir, 'flux-2-klein-tiny.safetensors'));
  assert.deepEqual(readFlux2Config(path.join(dir, 'flux-2-klein-tiny.safetensors')), bfl);
  assert.deepEqual(readFlux2Config(dir), bfl);
});

test('random checkpoints: BFL and diffusers layouts (and a sharded diffusers folder) give the same outputs', async () => {
  const dir = tmp();
  const bflFile = path.join(dir, 'bfl', 'model.safetensors');
  writeRandomFlux2Checkpoint(bflFile, TINY, { layout: 'bfl', seed: 7, dtype: 'BF16' });
  const diffFile = path.join(dir, 'diffusers', 'diffusion_pytorch_model.safetensors');
  writeRandomFlux2Checkpoint(diffFile, TINY, { layout: 'diffusers', seed: 7, dtype: 'BF16' });
  // split the diffusers file into two shards with an index, as large HF checkpoints are
  const st = new SafetensorsFile(diffFile);
  const shards: Array<Record<string, TensorToWrite>> = [{}, {}];
  const weightMap: Record<string, string> = {};
  st.names.forEach((n, i) => {
    const info = st.info(n);
    shards[i % 2][n] = { dtype: info.dtype, shape: info.shape, data: new Uint16Array(new Uint8Array(readRaw(info)).buffer) };
    weightMap[n] = `diffusion_pytorch_model-0000${(i % 2) + 1}-of-00002.safetensors`;
  });
  const sharded = path.join(dir, 'sharded');
  shards.forEach((t, k) => writeSafetensors(path.join(sharded, `diffusion_pytorch_model-0000${k + 1}-of-00002.safetensors`), t, st.metadata));
  fs.writeFileSync(path.join(sharded, 'diffusion_pytorch_model.safetensors.index.json'), JSON.stringify({ weight_map: weightMap }));
  assert.equal(Checkpoint.open(sharded).files.length, 2);

  const inp = inputs(TINY, 1, 3, 2, 5, [[2, 2]]);
  const outs: Float32Array[] = [];
  for (const p of [bflFile, path.dirname(diffFile), sharded]) {
    const m = await load(p);
    assert.deepEqual(m.config, TINY);
    outs.push(await m.forward(inp));
    await m.close();
  }
  assert.ok(outs[0].every(Number.isFinite));
  assert.ok(Math.max(...outs[0].map(Math.abs)) > 0.01, 'the output is not trivially zero');
  assert.ok(maxAbsDiff(outs[0], outs[1]) <= 1e-5, `bfl vs diffusers ${maxAbsDiff(outs[0], outs[1])}`);
  assert.equal(maxAbsDiff(outs[1], outs[2]), 0);
});

test('one graph for every size; batch samples with their own timesteps equal single runs; references only add tokens', async () => {
  const dir = tmp();
  const file = path.join(dir, 'model.safetensors');
  writeRandomFlux2Checkpoint(file, TINY, { seed: 3, dtype: 'F32' });
  const m = await load(file);
  assert.equal(m.graphCached, false);
  assert.equal(m.weightsBuilt, true, 'the first load materialises the weight store');
  const m2 = await load(file);
  assert.equal(m2.graphCached, true, 'second load reuses the compiled graphs');
  assert.equal(m2.weightsBuilt, false, 'second load reuses the weight store');
  await m2.close();
  try {
    const batch = inputs(TINY, 2, 4, 3, 6, [], 5);
    const both = await m.forward(batch);
    const per = (b: number) => {
      const n = batch.nTokens;
      return {
        ...batch,
        batch: 1,
        x: batch.x.slice(b * n * TINY.inChannels, (b + 1) * n * TINY.inChannels),
        xIds: batch.xIds.slice(b * n * 4, (b + 1) * n * 4),
        timesteps: batch.timesteps.slice(b, b + 1),
        ctx: batch.ctx.slice(b * 6 * TINY.contextInDim, (b + 1) * 6 * TINY.contextInDim),
        ctxIds: batch.ctxIds.slice(b * 6 * 4, (b + 1) * 6 * 4),
      };
    };
    const n = batch.nTokens * TINY.inChannels;
    const s0 = await m.forward(per(0));
    const s1 = await m.forward(per(1));
    assert.ok(maxAbsDiff(both.subarray(0, n), s0) <= 1e-5);
    assert.ok(maxAbsDiff(both.subarray(n), s1) <= 1e-5);
    assert.ok(maxAbsDiff(s0, s1) > 1e-3, 'different timesteps and contexts give different outputs');
    // another size and text length through the same sessions, with two references appended
    const refs = inputs(TINY, 1, 2, 5, 9, [[3, 1], [2, 2]], 8);
    const out = await m.forward(refs);
    assert.equal(out.length, (10 + 3 + 4) * TINY.inChannels);
    // references change the target tokens' output (joint attention), so they are really attended
    const noRefs = await m.forward({ ...refs, nTokens: 10, x: refs.x.subarray(0, 10 * TINY.inChannels), xIds: refs.xIds.subarray(0, 40) });
    assert.ok(maxAbsDiff(out.subarray(0, 10 * TINY.inChannels), noRefs) > 1e-4);
  } finally {
    await m.close();
  }
});

test('a context prepared once serves every step: steps equal whole forwards, the context is not changed by them', async () => {
  const dir = tmp();
  const file = path.join(dir, 'model.safetensors');
  writeRandomFlux2Checkpoint(file, TINY, { seed: 4, dtype: 'F32' });
  const m = await load(file);
  try {
    const inp = inputs(TINY, 2, 3, 2, 5, [[2, 1]], 7);
    const context = await m.prepareContext(inp);
    const later = { ...inp, x: inp.x.map((v) => v * 0.25 + 0.1), timesteps: Float32Array.of(0.3, 0.05) };
    for (const step of [inp, later, inp]) assert.equal(maxAbsDiff(await m.step(step, context), await m.forward(step)), 0);
    // the text projection and RoPE tables are really in the context: another prompt's context changes the step
    const other = await m.prepareContext({ ...inp, ctx: inp.ctx.map((v) => -v) });
    assert.ok(maxAbsDiff(await m.step(inp, other), await m.step(inp, context)) > 1e-4);
    await assert.rejects(m.step({ ...inp, batch: 1, x: inp.x.subarray(0, inp.x.length / 2), timesteps: inp.timesteps.subarray(0, 1) }, context), /context is for batch 2, 8 tokens, 5 text tokens; the step has 1, 8, 5/);
    context.dispose();
    await assert.rejects(m.step(inp, context), /context was disposed/);
  } finally {
    await m.close();
  }
});

test('guidance-embedding configs (FLUX.2 dev style) take a guidance input that changes the output', async () => {
  const dir = tmp();
  const cfg: Flux2Config = { ...TINY, useGuidanceEmbed: true, depthSingleBlocks: 0 };
  const file = path.join(dir, 'model.safetensors');
  writeRandomFlux2Checkpoint(file, cfg, { seed: 2 });
  const m = await load(file);
  try {
    const inp = inputs(cfg, 1, 2, 2, 3);
    await assert.rejects(m.forward(inp), /guidance is required/);
    const a = await m.forward({ ...inp, guidance: Float32Array.of(1) });
    const b = await m.forward({ ...inp, guidance: Float32Array.of(4) });
    assert.ok(maxAbsDiff(a, b) > 1e-4, 'the guidance value changes the output');
  } finally {
    await m.close();
  }
});

test('clear errors: bad inputs, wrong files, shape mismatches, float8', async () => {
  const m = await load(GOLDEN);
  try {
    const inp = inputs(m.config, 1, 2, 2, 3);
    await assert.rejects(m.forward({ ...inp, x: inp.x.subarray(1) }), /x has 511 values, expected 512/);
    await assert.rejects(m.forward({ ...inp, nCtx: 0 }), /nCtx must be a positive integer/);
    await assert.rejects(m.forward({ ...inp, timesteps: new Float32Array(2) }), /timesteps has 2 values, expected 1/);
  } finally {
    await m.close();
  }
  const dir = tmp();
  assert.throws(() => openFlux2Checkpoint(path.join(dir, 'nothing')), /transformer checkpoint not found/);
  assert.throws(() => openFlux2Checkpoint(dir), /no FLUX\.2 transformer weights/);
  // another model's weights
  writeSafetensors(path.join(dir, 'model.safetensors'), { 'encoder.conv_in.weight': { dtype: 'F32', shape: [1], data: new Float32Array(1) } });
  assert.throws(() => openFlux2Checkpoint(dir), (e: Error) => e instanceof Flux2CheckpointError && /not a FLUX\.2 transformer checkpoint/.test(e.message));
  // config.json that does not match the weights
  const bad = tmp();
  fs.linkSync(path.join(GOLDEN, 'model.safetensors'), path.join(bad, 'model.safetensors'));
  fs.writeFileSync(path.join(bad, 'config.json'), JSON.stringify({ ...JSON.parse(fs.readFileSync(path.join(GOLDEN, 'config.json'), 'utf8')), hidden_size: 128, num_heads: 4 }));
  assert.throws(() => openFlux2Checkpoint(bad), /img_in\.weight has shape \[\[64,128\]\], the config needs \[128,128\]/);
  fs.writeFileSync(path.join(bad, 'config.json'), JSON.stringify({ ...JSON.parse(fs.readFileSync(path.join(GOLDEN, 'config.json'), 'utf8')), depth: 1 }));
  assert.throws(() => openFlux2Checkpoint(bad), /not part of a FLUX\.2 transformer with this config, e\.g\. double_blocks\.1\./);
  fs.writeFileSync(path.join(bad, 'config.json'), JSON.stringify({ ...JSON.parse(fs.readFileSync(path.join(GOLDEN, 'config.json'), 'utf8')), axes_dim: [8, 8, 8, 6] }));
  assert.throws(() => openFlux2Checkpoint(bad), /RoPE axes \[8,8,8,6\] must be even and sum to the head dim 32/);
  fs.writeFileSync(path.join(bad, 'config.json'), '{"foo": 1}');
  assert.throws(() => openFlux2Checkpoint(bad), /neither a BFL FLUX\.2 params file/);
  // float8 weights are recognised and refused with a pointer to the bf16 checkpoint
  const f8 = tmp();
  const tensors: Record<string, TensorToWrite> = {};
  for (const { name, shape } of flux2BflShapes(TINY)) {
    const n = shape.reduce((a, b) => a * b, 1);
    tensors[name] = name.endsWith('.scale') ? { dtype: 'F32', shape, data: new Float32Array(n) } : { dtype: 'F8_E4M3', shape, data: new Uint8Array(n) };
  }
  writeSafetensors(path.join(f8, 'model.safetensors'), tensors, { flux2_config: JSON.stringify(TINY) });
  assert.throws(() => openFlux2Checkpoint(f8), /dtype F8_E4M3 \(float8 checkpoints are not supported yet; use the bf16 checkpoint\)/);
});
