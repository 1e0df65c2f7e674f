import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import path from 'node:path';
import { boxBlurReplicate, estimateForeground, cutoutRGBA, truncateToUint8, cutout } from '../../src/pipeline/matting.ts';
import { MattingPredictor } from '../../src/pipeline/matting-model.ts';
import { cpuTarget } from '../../src/runtime/target.ts';
import { GOLDEN_DIR } from '../golden.ts';

/** The reference's mean_blur written the slow way: replicate-pad, then average every k×k window. */
function bruteBlur(src: Float32Array, w: number, h: number, k: number): Float32Array {
  const before = k % 2 === 0 ? k / 2 - 1 : (k - 1) / 2;
  const clamp = (v: number, n: number) => Math.min(n - 1, Math.max(0, v));
  const out = new Float32Array(w * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let s = 0;
      for (let dy = 0; dy < k; dy++) for (let dx = 0; dx < k; dx++) s += src[clamp(y - before + dy, h) * w + clamp(x - before + dx, w)];
      out[y * w + x] = s / (k * k);
    }
  }
  return out;
}

test('box blur equals replicate padding + average pooling, for even, odd and oversized kernels', () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 9 }), fc.integer({ min: 1, max: 9 }), fc.integer({ min: 1, max: 14 }), fc.integer(), (w, h, k, seed) => {
      let s = seed >>> 0;
      const src = Float32Array.from({ length: w * h }, () => ((s = (s * 1103515245 + 12345) >>> 0) % 1000) / 999);
      const got = boxBlurReplicate(src, w, h, 1, k);
      const want = bruteBlur(src, w, h, k);
      for (let i = 0; i < got.length; i++) assert.ok(Math.abs(got[i] - want[i]) < 1e-6, `w=${w} h=${h} k=${k} i=${i}: ${got[i]} vs ${want[i]}`);
    }),
    { numRuns: 200 },
  );
});

/** A red subject over a green backdrop with a soft 16-pixel edge: I = αF + (1−α)B. */
function composite(w: number, h: number) {
  const F = [0.9, 0.15, 0.1], B = [0.1, 0.8, 0.2];
  const alpha = new Float32Array(w * h);
  const rgb = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const a = Math.min(1, Math.max(0, (x - 40) / 16));
      alpha[y * w + x] = a;
      for (let c = 0; c < 3; c++) rgb[(y * w + x) * 3 + c] = Math.round((a * F[c] + (1 - a) * B[c]) * 255);
    }
  }
  return { rgb, alpha, F };
}

test('foreground estimation removes the backdrop colour from soft edges', () => {
  const w = 120, h = 40;
  const { rgb, alpha, F } = composite(w, h);
  const fg = estimateForeground(rgb, alpha, w, h);
  let rawErr = 0, estErr = 0, n = 0;
  for (let i = 0; i < w * h; i++) {
    if (alpha[i] < 0.1 || alpha[i] > 0.9) continue;
    for (let c = 0; c < 3; c++) {
      rawErr += Math.abs(rgb[i * 3 + c] / 255 - F[c]);
      estErr += Math.abs(fg[i * 3 + c] - F[c]);
    }
    n++;
  }
  assert.ok(n > 100);
  // the raw pixels at the edge are a mix with the green; the estimate is close to the red subject
  assert.ok(estErr / n < 0.1, `mean estimate error ${estErr / n} (raw ${rawErr / n})`);
  assert.ok(estErr < rawErr / 3, `estimate ${estErr / n} vs raw ${rawErr / n}`);
  for (const v of fg) assert.ok(v >= 0 && v <= 1);
});

test('cutout RGBA: straight alpha rounded to 8 bits, invisible pixels zeroed, raw colours without refinement', () => {
  const w = 120, h = 4;
  const { rgb, alpha } = composite(w, h);
  const raw = cutoutRGBA(rgb, alpha, w, h, { refine: false });
  const refined = cutoutRGBA(rgb, alpha, w, h);
  for (let i = 0; i < w * h; i++) {
    const a = Math.round(alpha[i] * 255);
    assert.equal(raw[i * 4 + 3], a);
    assert.equal(refined[i * 4 + 3], a);
    if (a === 0) assert.deepEqual([...raw.subarray(i * 4, i * 4 + 3), ...refined.subarray(i * 4, i * 4 + 3)], [0, 0, 0, 0, 0, 0]);
    else assert.deepEqual([...raw.subarray(i * 4, i * 4 + 3)], [...rgb.subarray(i * 3, i * 3 + 3)]);
  }
  // at a half-transparent pixel the refined red is near the subject's, the raw one is the mix
  const mid = 48;
  assert.ok(refined[mid * 4] > 210 && raw[mid * 4] < 150, `refined ${refined[mid * 4]} raw ${raw[mid * 4]}`);
});

test('matting input errors are clear', () => {
  assert.throws(() => estimateForeground(new Uint8Array(10), new Float32Array(4), 2, 2), /expected 2×2×3/);
  assert.throws(() => estimateForeground(new Uint8Array(12), new Float32Array(3), 2, 2), /alpha holds 3 values/);
  assert.throws(() => cutoutRGBA(new Uint8Array(12), new Float32Array(4), 0, 2), /bad image size/);
  assert.throws(() => boxBlurReplicate(new Float32Array(4), 2, 2, 1, 0), /blur size/);
  assert.deepEqual([...truncateToUint8(Float32Array.from([0, 0.5, 0.99999, 1, 1.5, -1]))], [0, 127, 254, 255, 255, 0]);
});

test('cutout runs the matting model and returns RGBA whose alpha is its matte', async () => {
  const model = await MattingPredictor.load(path.join(GOLDEN_DIR, 'birefnet/model.safetensors'), { target: cpuTarget(), inputSize: 64 });
  try {
    const w = 50, h = 30;
    const { rgb } = composite(w, h);
    const { rgba, alpha } = await cutout(model, rgb, w, h);
    assert.deepEqual(alpha, await model.predict(rgb, w, h));
    const distinct = new Set<number>();
    for (let i = 0; i < w * h; i++) {
      assert.equal(rgba[i * 4 + 3], Math.round(alpha[i] * 255));
      distinct.add(rgba[i * 4 + 3]);
    }
    assert.ok(distinct.size > 10, `alpha takes ${distinct.size} values`);
    await assert.rejects(cutout(model, rgb, w + 1, h), /expected 51×30×3/);
  } finally {
    await model.close();
  }
});
