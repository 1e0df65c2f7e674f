import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import { Graph } from '../../src/graph/onnx-graph.ts';
import { Int8Policy } from '../../src/graph/nn/weight-policy.ts';
import { dequantizeInt8, INT8_SCHEME, type QuantizeOptions, type WeightRows } from '../../src/weights/quantize.ts';
import { createQuantizer } from '../../src/runtime/int8-quantizer.ts';
import { f32 } from '../../src/runtime/session.ts';
import { Checkpoint, writeSafetensors } from '../../src/weights/safetensors.ts';
import { relativeError } from '../../src/conform/compare.ts';
import { compile, layersOf, sessionFor } from './helpers.ts';

// the weight store of this file's checkpoint goes to a cache folder of its own
const cacheRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-quant-cache-'));
process.env.KLEIN_CACHE_DIR = cacheRoot;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-quant-'));
// the scheme as the weight stores run it: ORT, one thread
const quantizer = await createQuantizer();
const quantizeInt8 = (w: WeightRows, N: number, K: number, o?: QuantizeOptions) => quantizer.quantize(w, N, K, o);
after(async () => {
  await quantizer.release();
  fs.rmSync(cacheRoot, { recursive: true, force: true });
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Deterministic uniform values in [-amp, amp). */
function uniform(n: number, seed: number, amp = 1): Float32Array {
  let s = seed >>> 0 || 1;
  return Float32Array.from({ length: n }, () => {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    return ((s / 2 ** 32) * 2 - 1) * amp;
  });
}


test('quantizeInt8: exact values, per-output-column scales, halves to even, transposed [in, out] layout', async () => {
  // W [out=2, in=4]: row 0 has max |w| 7.9375 = 127 · 0.0625 → scale 0.0625 (a power of two: every w / scale is
  // exact, ties included); row 1 is all zero → scale 1, q 0
  const w = Float32Array.of(7.9375, -0.09375, 0.03125, 0.15625, 0, 0, 0, 0);
  const qw = await quantizeInt8(w, 2, 4);
  assert.equal(qw.outFeatures, 2);
  assert.equal(qw.inFeatures, 4);
  assert.deepEqual(Array.from(qw.scale), [0.0625, 1]);
  // q[k, n]: column 0 = row 0 of W: 127, −1.5 → −2, 0.5 → 0, 2.5 → 2 (halves to even); column 1 = zeros
  assert.deepEqual(Array.from(qw.q), [127, 0, -2, 0, 0, 0, 2, 0]);
  // the extremes are exactly ±127 on both signs
  const h = await quantizeInt8(Float32Array.of(-7.9375, 0.09375, -0.21875, 7.9375), 1, 4);
  assert.equal(h.scale[0], 0.0625);
  assert.deepEqual(Array.from(h.q), [-127, 2, -4, 127]);
  // a scale that is not a power of two: max / 127 as an fp32 division
  const t = await quantizeInt8(Float32Array.of(2.54, -1.27, 0.01), 1, 3);
  assert.equal(t.scale[0], Math.fround(Math.fround(2.54) / 127));
  assert.deepEqual(Array.from(t.q), [127, -64, 0]);
});

test('quantizeInt8: round trip within half a step per element, ~0.6 % rms on uniform weights; deterministic', async () => {
  const [N, K] = [96, 200];
  const w = uniform(N * K, 7, 0.05);
  w[5 * K + 3] = 3; // an outlier only costs its own column precision
  const qw = await quantizeInt8(w, N, K);
  const back = dequantizeInt8(qw);
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < K; k++) {
      const err = Math.abs(back[n * K + k] - w[n * K + k]);
      assert.ok(err <= qw.scale[n] / 2 + 1e-9, `[${n}, ${k}] error ${err} over half a step ${qw.scale[n] / 2}`);
    }
  }
  // uniform values over ±127 steps: rms error step/√12 against rms 127·step/√3 → 0.45 %; the outlier column is coarse
  const others = (a: Float32Array) => a.filter((_, i) => Math.floor(i / K) !== 5);
  const e = relativeError(others(back), others(w)).rms;
  assert.ok(e > 0.003 && e < 0.006, `round-trip rms ${e}`);
  const again = await quantizeInt8(w, N, K);
  assert.deepEqual(again.q, qw.q);
  assert.deepEqual(again.scale, qw.scale);
});

test('quantizeInt8 rejects a wrong length, a bad shape and non-finite weights', async () => {
  await assert.rejects(quantizeInt8(new Float32Array(5), 2, 3), /5 values for a \[2, 3\] weight/);
  await assert.rejects(quantizeInt8(new Float32Array(0), 0, 3), /bad shape/);
  await assert.rejects(quantizeInt8(Float32Array.of(1, Number.NaN), 2, 1), /output 1 has a non-finite weight/);
  await assert.rejects(quantizeInt8(Float32Array.of(1, Infinity), 1, 2), /output 0 has a non-finite weight/);
});

test('Int8Policy: the Linears it selects run as DynamicQuantizeMatMul on stored int8 weights (x Wᵀ within 1.5 % rms, with and without bias); the others stay exact', async () => {
  const [M, K, N] = [64, 256, 96];
  const w = uniform(N * K, 3, Math.sqrt(3 / K));
  const x = uniform(M * K, 4);
  const bias = uniform(N, 5, 0.5);
  writeSafetensors(path.join(dir, 'w.safetensors'), {
    'q.weight': { dtype: 'F32', shape: [N, K], data: w },
    'qb.weight': { dtype: 'F32', shape: [N, K], data: w },
    'qb.bias': { dtype: 'F32', shape: [N], data: bias },
    'keep.weight': { dtype: 'F32', shape: [N, K], data: w },
  });
  const ref = new Float64Array(M * N);
  for (let m = 0; m < M; m++) for (let n = 0; n < N; n++) {
    let acc = 0;
    for (let k = 0; k < K; k++) acc += x[m * K + k] * w[n * K + k];
    ref[m * N + n] = acc;
  }
  const policy = new Int8Policy((name) => name !== 'keep.weight', 'dynamic');
  assert.equal(policy.tag, `int8-${INT8_SCHEME}`, 'the scheme names the weight store, so a new scheme never reads old bytes');
  const g = new Graph('qlinear');
  const nn = layersOf(g, Checkpoint.open(dir), policy);
  const xin = g.input('x', 'float32', ['m', K]);
  g.output(nn.linear(xin, 'q'), 'y', ['m', N]);
  g.output(nn.linear(xin, 'qb'), 'yb', ['m', N]);
  g.output(nn.linear(xin, 'keep'), 'exact', ['m', N]);
  const { store, file } = await compile(g, policy);
  const model = onnxProto.onnx.ModelProto.decode(fs.readFileSync(file));
  assert.deepEqual(model.graph!.node!.filter((n) => /MatMul/.test(n.opType!)).map((n) => n.opType).sort(), ['DynamicQuantizeMatMul', 'DynamicQuantizeMatMul', 'FusedMatMul']);
  // the store holds exactly quantizeInt8's bytes: int8 [in, out] and one fp32 scale per output
  const qw = await quantizeInt8(w, N, K);
  const bin = fs.readFileSync(path.join(store.folder, 'weights.bin'));
  /** A copy of the stored bytes of weight `key` (aligned, so typed arrays can view it). */
  const stored = (key: string): ArrayBuffer => {
    const at = store.locate(g.weights.get(key)!);
    assert.equal(at.location, 'weights.bin');
    return Uint8Array.from(bin.subarray(at.offset, at.offset + at.length)).buffer;
  };
  assert.deepEqual(new Int8Array(stored('q.weight.q')), qw.q);
  assert.deepEqual(new Float32Array(stored('q.weight.scale')), qw.scale);
  const sess = await sessionFor(file, 'cpu', policy);
  try {
    const out = await sess.run({ x: f32(x, [M, K]) });
    const y = out.y.data as Float32Array;
    const e = relativeError(y, ref).rms;
    // weight rounding (~0.5 %) plus the op's per-tensor uint8 activations (~0.3 %): not exact, but close
    assert.ok(e > 1e-4 && e < 0.015, `relative rms ${e}`);
    const yb = out.yb.data as Float32Array;
    for (let i = 0; i < M * N; i++) assert.ok(Math.abs(yb[i] - (y[i] + bias[i % N])) < 1e-4, `bias at ${i}`);
    // a Linear the policy does not select is the fp32 product
    const exact = relativeError(out.exact.data as Float32Array, ref).rms;
    assert.ok(exact < 1e-6, `unselected Linear: relative rms ${exact}`);
  } finally {
    await sess.release();
  }
});

test('quantizeInt8 with rows: int16 in steps of scale / 254, within half a fine step of w', async () => {
  const [N, K] = [40, 90];
  const w = uniform(N * K, 17, 0.1);
  w[3 * K + 7] = 2; // a large weight: its column's step is coarse, the fine rows restore it
  const qw = await quantizeInt8(w, N, K, { rows: true });
  const rows = qw.rows!;
  assert.deepEqual(qw.q, (await quantizeInt8(w, N, K)).q, 'the rows leave q as it is');
  const a = dequantizeInt8(qw);
  for (let n = 0; n < N; n++) {
    assert.equal(rows.scale[n], Math.fround(qw.scale[n] / 254));
    for (let k = 0; k < K; k++) {
      const v = rows.values[k * N + n];
      assert.ok(Math.abs(v) <= 127 * 254 && Math.abs(v - qw.q[k * N + n] * 254) <= 128, `[${n}, ${k}]: ${v} is within a step of q·254 (${qw.q[k * N + n]})`);
      const err = Math.abs(v * rows.scale[n] - w[n * K + k]);
      assert.ok(err <= rows.scale[n] / 2 + 1e-7, `[${n}, ${k}] error ${err} over ${rows.scale[n] / 2}`);
    }
  }
  const exact = Float32Array.from({ length: N * K }, (_, i) => rows.values[(i % K) * N + Math.floor(i / K)] * rows.scale[Math.floor(i / K)]);
  assert.ok(relativeError(exact, w).rms < relativeError(a, w).rms / 100, 'the fine rows cut the rounding error by more than 100×');
});

test('quantizeInt8 from bf16 bits (widened a block at a time): the same bytes as from the fp32 values; non-finite bf16 is refused', async () => {
  const [N, K] = [70, 130];
  const bits = Uint16Array.from({ length: N * K }, (_, i) => ((i * 2654435761) >>> 17) & 0x7eff | (i % 3 === 0 ? 0x8000 : 0));
  bits.fill(0, 5 * K, 6 * K); // an all-zero output
  const widened = new Float32Array(new Uint32Array(Array.from(bits, (b) => b << 16)).buffer);
  for (const rows of [false, true]) {
    const a = await quantizeInt8(widened, N, K, { rows });
    const b = await quantizeInt8({ bf16: bits }, N, K, { rows });
    assert.deepEqual(b.q, a.q);
    assert.deepEqual(b.scale, a.scale);
    assert.deepEqual(b.rows, a.rows);
  }
  assert.equal((await quantizeInt8({ bf16: bits }, N, K)).scale[5], 1, 'an all-zero output gets scale 1');
  const bad = bits.slice();
  bad[9 * K + 4] = 0x7f80; // +Inf
  await assert.rejects(quantizeInt8({ bf16: bad }, N, K), /output 9 has a non-finite weight/);
  await assert.rejects(quantizeInt8({ bf16: bits }, N, K + 1), /9100 values for a \[70, 131\] weight/);
});

test('quantizeInt8 in blocks of rows: a weight of several blocks gives the columns its rows give on their own', async () => {
  const [N, K, from] = [1100, 4096, 1000]; // 4.5 M values: more than one block (runtime/int8-quantizer.ts)
  const w = uniform(N * K, 23, 0.02);
  const all = await quantizeInt8(w, N, K, { rows: true });
  const tail = await quantizeInt8(w.subarray(from * K), N - from, K, { rows: true });
  const columns = <T extends Int8Array | Int16Array>(a: T, width: number, n0: number, n1: number) => {
    const out = new (a.constructor as new (n: number) => T)(K * (n1 - n0));
    for (let k = 0; k < K; k++) out.set(a.subarray(k * width + n0, k * width + n1), k * (n1 - n0));
    return out;
  };
  assert.deepEqual(columns(all.q, N, from, N), tail.q);
  assert.deepEqual(columns(all.rows!.values, N, from, N), tail.rows!.values);
  assert.deepEqual(all.scale.subarray(from), tail.scale);
  assert.deepEqual(all.rows!.scale.subarray(from), tail.rows!.scale);
});

test('a checkpoint with a non-finite weight is refused when its store is built, naming the tensor and the output', async () => {
  const [N, K] = [6, 32];
  const w = uniform(N * K, 29, 0.1);
  w[4 * K + 9] = Number.NaN;
  const file = path.join(dir, 'nan.safetensors');
  writeSafetensors(file, { 'bad.weight': { dtype: 'F32', shape: [N, K], data: w } });
  const policy = new Int8Policy(() => true, 'row-outliers');
  const g = new Graph('qnan');
  const nn = layersOf(g, Checkpoint.open(file), policy);
  g.output(nn.linear(g.input('x', 'float32', ['m', K]), 'bad'), 'y', ['m', N]);
  await assert.rejects(compile(g, policy), (e: Error) => e.message.includes(`${file} [bad.weight]: int8 quantization: output 4 has a non-finite weight`));
});
