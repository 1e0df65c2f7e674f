import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { cfgCombine, computeEmpiricalMu, eulerStep, getSchedule } from '../../src/pipeline/schedule.ts';
import { GOLDEN_DIR } from '../golden.ts';

const GOLDEN = path.join(GOLDEN_DIR, 'sampler/schedules.json');

test('getSchedule matches every BFL schedule of the golden file within 2 float32 ulps', () => {
  const doc = JSON.parse(fs.readFileSync(GOLDEN, 'utf8')) as { schedules: Array<{ num_steps: number; image_seq_len: number; mu: number; bfl: { timesteps: number[] } }> };
  assert.equal(doc.schedules.length, 18);
  for (const s of doc.schedules) {
    assert.equal(computeEmpiricalMu(s.image_seq_len, s.num_steps), s.mu);
    const t = getSchedule(s.num_steps, s.image_seq_len);
    assert.equal(t.length, s.num_steps + 1);
    for (let i = 0; i < t.length; i++) assert.ok(Math.abs(t[i] - s.bfl.timesteps[i]) <= 1.2e-7, `${s.image_seq_len}/${s.num_steps}[${i}]: ${t[i]} vs ${s.bfl.timesteps[i]}`);
  }
});

test('the spec table: 512² at 4 steps gives mu 2.030690 and sigmas 1, 0.958085, 0.883982, 0.717497, 0', () => {
  assert.ok(Math.abs(computeEmpiricalMu(1024, 4) - 2.03069) < 1e-6);
  const t = getSchedule(4, 1024);
  [1, 0.958085, 0.883982, 0.717497, 0].forEach((v, i) => assert.ok(Math.abs(t[i] - v) < 1e-6, `${i}: ${t[i]}`));
  // above 4300 tokens mu no longer depends on the step count
  assert.equal(computeEmpiricalMu(9216, 4), computeEmpiricalMu(9216, 50));
});

test('every schedule starts at 1, ends at 0 and decreases strictly', () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 60 }), fc.integer({ min: 1, max: 16384 }), (steps, seq) => {
      const t = getSchedule(steps, seq);
      assert.equal(t[0], 1);
      assert.equal(t[steps], 0);
      for (let i = 1; i <= steps; i++) assert.ok(t[i] < t[i - 1]);
    }),
  );
  assert.throws(() => getSchedule(0, 16), /positive integer/);
});

test('eulerStep uses only the target tokens of each batch row; cfgCombine is uncond + g·(cond − uncond)', () => {
  // batch of 2, 2 target values per row, velocity rows carry 1 extra (reference) value that must be ignored
  const x = new Float32Array([1, 2, 3, 4]);
  const v = new Float32Array([10, 20, 999, 30, 40, 999]);
  eulerStep(x, v, 1, 0.75, 2);
  assert.deepEqual(Array.from(x), [1 - 2.5, 2 - 5, 3 - 7.5, 4 - 10]);
  assert.throws(() => eulerStep(new Float32Array(4), new Float32Array(2), 1, 0), /does not cover/);
  assert.deepEqual(Array.from(cfgCombine(new Float32Array([1, 2, 3, 6]), 4)), [1 + 4 * 2, 2 + 4 * 4]);
  assert.deepEqual(Array.from(cfgCombine(new Float32Array([1, 2, 3, 6]), 1)), [3, 6]);
});
