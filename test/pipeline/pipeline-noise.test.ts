import { test } from 'node:test';
import assert from 'node:assert/strict';
import { gaussianNoise, initialLatentTokens, nchwToTokens, philox4x32 } from '../../src/pipeline/noise.ts';

test('Philox4x32-10 reproduces the Random123 known-answer vectors', () => {
  const o = new Uint32Array(4);
  const hex = () => Array.from(o, (x) => x.toString(16).padStart(8, '0')).join(' ');
  philox4x32(0, 0, 0, 0, 0, 0, o);
  assert.equal(hex(), '6627e8d5 e169c58d bc57ac4c 9b00dbd8');
  philox4x32(0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, o);
  assert.equal(hex(), '408f276d 41c83b0e a20bc7c6 6d5451fd');
  philox4x32(0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0, o);
  assert.equal(hex(), 'd16cfe09 94fdcceb 5001e420 24126ea1');
});

test('gaussianNoise is standard normal, deterministic per seed, and a prefix of a longer draw', () => {
  const n = gaussianNoise(7, 200_001);
  let mean = 0;
  let sq = 0;
  let beyond3 = 0;
  for (const x of n) {
    mean += x;
    sq += x * x;
    if (Math.abs(x) > 3) beyond3++;
  }
  mean /= n.length;
  const variance = sq / n.length - mean * mean;
  assert.ok(Math.abs(mean) < 0.01, `mean ${mean}`);
  assert.ok(Math.abs(variance - 1) < 0.02, `variance ${variance}`);
  assert.ok(Math.abs(beyond3 / n.length - 0.0027) < 0.001, `tail ${beyond3 / n.length}`);
  assert.deepEqual(gaussianNoise(7, 10), n.subarray(0, 10));
  assert.notDeepEqual(gaussianNoise(8, 10), n.subarray(0, 10));
  // seeds above 2^32 use the key's high word instead of wrapping onto small seeds
  assert.notDeepEqual(gaussianNoise(2 ** 32 + 7, 10), n.subarray(0, 10));
  assert.throws(() => gaussianNoise(-1, 4), /seed must be/);
  assert.throws(() => gaussianNoise(1.5, 4), /seed must be/);
});

test('latent noise is drawn in NCHW order and packed row-major into tokens', () => {
  const x = new Float32Array([0, 1, 2, 3, 10, 11, 12, 13]); // C=2, h=2, w=2
  assert.deepEqual(Array.from(nchwToTokens(x, 2, 2, 2)), [0, 10, 1, 11, 2, 12, 3, 13]);
  const t = initialLatentTokens(3, 64, 32);
  assert.equal(t.length, 2 * 4 * 128);
  const nchw = gaussianNoise(3, 128 * 8);
  assert.equal(t[1 * 128 + 5], nchw[5 * 8 + 1]); // token 1, channel 5
});
