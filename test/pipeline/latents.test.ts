import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import fc from 'fast-check';
import { GoldenCase } from '../../src/conform/golden.ts';
import { compareRelative } from '../../src/conform/compare.ts';
import { SafetensorsFile, readFloat32 } from '../../src/weights/safetensors.ts';
import {
  bnDenormalize, bnNormalize, imagePositionIds, latentToTokens, patchify, referenceTimeOffset, referenceTokens, tokensToLatent, unpatchify,
} from '../../src/pipeline/latents.ts';
import { GOLDEN_DIR as GOLDEN } from '../golden.ts';

const vaeModel = new SafetensorsFile(path.join(GOLDEN, 'vae/model.safetensors'));
const bnMean = readFloat32(vaeModel.info('bn.running_mean'));
const bnVar = readFloat32(vaeModel.info('bn.running_var'));

test('patchify of the golden posterior mean is the golden mean_patchified, bit for bit', () => {
  const c = new GoldenCase(path.join(GOLDEN, 'vae/encode_case.safetensors'));
  const p = patchify(c.f32('mean'), c.shape('mean'));
  assert.deepEqual(p.dims, c.shape('mean_patchified'));
  assert.deepEqual(p.data, c.f32('mean_patchified'));
  const back = unpatchify(p.data, p.dims);
  assert.deepEqual(back.data, c.f32('mean'));
});

test('BatchNorm normalisation and row-major tokens match the golden encode case', () => {
  const c = new GoldenCase(path.join(GOLDEN, 'vae/encode_case.safetensors'));
  const dims = c.shape('mean_patchified');
  const latent = bnNormalize(c.f32('mean_patchified'), dims, bnMean, bnVar);
  const cmp = compareRelative(latent, c.f32('latent'), 1e-6);
  assert.ok(cmp.passed, `latent max err ${cmp.maxAbsErr}`);
  const tok = latentToTokens(c.f32('latent'), dims);
  assert.deepEqual(tok.dims, c.shape('latent_tokens'));
  assert.deepEqual(tok.data, c.f32('latent_tokens'));
  assert.deepEqual(imagePositionIds(dims[2], dims[3]), c.i64('latent_token_ids'));
});

test('decode-side plumbing matches the golden decode case (denormalise, unpatchify, tokens)', () => {
  const c = new GoldenCase(path.join(GOLDEN, 'vae/decode_case.safetensors'));
  const dims = c.shape('z');
  const inv = bnDenormalize(c.f32('z'), dims, bnMean, bnVar);
  const cmp = compareRelative(inv, c.f32('z_inv_normalized'), 1e-6);
  assert.ok(cmp.passed, `denormalised max err ${cmp.maxAbsErr}`);
  const un = unpatchify(c.f32('z_inv_normalized'), dims);
  assert.deepEqual(un.dims, c.shape('z_unpatchified'));
  assert.deepEqual(un.data, c.f32('z_unpatchified'));
  const tok = latentToTokens(c.f32('z'), dims);
  assert.deepEqual(tok.data, c.f32('z_tokens'));
  assert.deepEqual(imagePositionIds(dims[2], dims[3]), c.i64('z_token_ids'));
  const grid = tokensToLatent(tok.data, tok.dims, dims[2], dims[3]);
  assert.deepEqual(grid.data, c.f32('z'));
});

test('reference tokens and ids of the golden edit pipeline (t = 10 for the first reference)', () => {
  const c = new GoldenCase(path.join(GOLDEN, 'pipeline/edit.safetensors'));
  const ref = referenceTokens([{ data: c.f32('ref_latent'), dims: c.shape('ref_latent') }]);
  assert.equal(ref.count, c.shape('img_cond_seq')[1]);
  assert.deepEqual(ref.tokens, c.f32('img_cond_seq'));
  assert.deepEqual(ref.ids, c.i64('img_cond_seq_ids'));
  // the final latent of the sampler is the row-major grid of its tokens
  const [, , h, w] = c.shape('final_latent');
  const grid = tokensToLatent(c.f32('final_tokens'), c.shape('final_tokens'), h, w);
  assert.deepEqual(grid.data, c.f32('final_latent'));
});

test('several references each get their own grid at t = 10, 20, 30', () => {
  const a = { data: Float32Array.from({ length: 2 * 1 * 2 }, (_, i) => i), dims: [1, 2, 1, 2] };
  const b = { data: Float32Array.from({ length: 2 * 2 * 1 }, (_, i) => 100 + i), dims: [1, 2, 2, 1] };
  const r = referenceTokens([a, b, a]);
  assert.equal(r.count, 6);
  assert.deepEqual(Array.from(r.ids, Number), [10, 0, 0, 0, 10, 0, 1, 0, 20, 0, 0, 0, 20, 1, 0, 0, 30, 0, 0, 0, 30, 0, 1, 0]);
  // token 0 of reference a = channels (0, 2); token 2 = reference b row 0 = (100, 102)
  assert.deepEqual(Array.from(r.tokens.subarray(0, 2)), [0, 2]);
  assert.deepEqual(Array.from(r.tokens.subarray(4, 6)), [100, 102]);
  assert.equal(referenceTimeOffset(3), 40);
});

test('patchify/unpatchify and tokens round-trip on random shapes', () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 2 }), fc.integer({ min: 1, max: 5 }), fc.integer({ min: 1, max: 4 }), fc.integer({ min: 1, max: 4 }), (B, C, h, w) => {
      const dims = [B, C, 2 * h, 2 * w];
      const x = Float32Array.from({ length: B * C * 4 * h * w }, (_, i) => i * 0.5 - 3);
      const p = patchify(x, dims);
      assert.deepEqual(p.dims, [B, 4 * C, h, w]);
      // channel c·4 + pi·2 + pj of patch (i, j) is pixel (2i + pi, 2j + pj) of channel c
      const c = C - 1, pi = 1, pj = 0, i = h - 1, j = 0;
      assert.equal(p.data[((0 * 4 * C + c * 4 + pi * 2 + pj) * h + i) * w + j], x[((0 * C + c) * 2 * h + 2 * i + pi) * 2 * w + 2 * j + pj]);
      assert.deepEqual(unpatchify(p.data, p.dims).data, x);
      const t = latentToTokens(p.data, p.dims);
      assert.deepEqual(tokensToLatent(t.data, t.dims, h, w).data, p.data);
    }),
    { numRuns: 30 },
  );
});

test('bad shapes are refused with a clear message', () => {
  assert.throws(() => patchify(new Float32Array(6), [1, 2, 3, 1]), /even H and W/);
  assert.throws(() => unpatchify(new Float32Array(6), [1, 6, 1, 1]), /divisible by 4/);
  assert.throws(() => tokensToLatent(new Float32Array(12), [1, 3, 4], 2, 2), /do not fill a 2×2 grid/);
  assert.throws(() => bnNormalize(new Float32Array(4), [1, 4, 1, 1], new Float32Array(3), new Float32Array(3)), /statistics have 3/);
});
