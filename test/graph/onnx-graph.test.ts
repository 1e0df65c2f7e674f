import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import { Graph, MS_DOMAIN } from '../../src/graph/onnx-graph.ts';
import { linear, rmsNorm, splitLast } from '../../src/graph/nn.ts';
import { compileGraph, loadGraph, f32, i64, openSession } from '../../src/graph/session.ts';
import { Checkpoint, f32ToBf16, writeSafetensors } from '../../src/weights/safetensors.ts';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'klein-graph-'));
const arr = (t: { data: unknown }) => Array.from(t.data as Float32Array);

function close(a: number[], b: number[], tol = 1e-6): void {
  assert.equal(a.length, b.length);
  a.forEach((v, i) => assert.ok(Math.abs(v - b[i]) <= tol, `[${i}] ${v} vs ${b[i]}`));
}

test('ops with int, float, ints and string attributes; constants; scalars; scopes', async () => {
  const dir = tmp();
  const g = new Graph('ops');
  const x = g.input('x', 'float32', ['n', 4]);
  const y = g.within('block.0', () => {
    const t = g.op('Transpose', [x], { perm: [1, 0] }); // ints
    const s = g.op('Softmax', [t], { axis: 0 }); // int
    const ln = g.op('LayerNormalization', [x, g.constF32([1, 1, 1, 1]), g.constF32([0, 0, 0, 1])], { axis: -1, epsilon: { float: 0.5 } }); // float
    const r = g.op('Resize', [g.op('Unsqueeze', [x, g.constI64([0])]), null, null, g.constI64([1, 2, 8])], { mode: 'nearest' }); // string + omitted inputs
    return { s, ln, r };
  });
  g.output(y.s, 'softmax');
  g.output(y.ln, 'ln');
  g.output(g.op('Mul', [y.r, g.scalarF32(2)]), 'resized');
  assert.ok(g.fresh('k').startsWith('k_'));
  const file = path.join(dir, 'ops.onnx');
  fs.writeFileSync(file, g.serialize(dir));
  // node names carry the scope, like a module path
  const model = onnxProto.onnx.ModelProto.decode(fs.readFileSync(file));
  assert.ok(model.graph!.node!.some((n) => n.name!.startsWith('block.0/Softmax')));
  assert.deepEqual(model.opsetImport!.map((o) => o.domain), ['', MS_DOMAIN]);
  const s = await openSession(file);
  const r = await s.run({ x: f32(Float32Array.of(1, 2, 3, 4, 0, 0, 0, 0), [2, 4]) });
  // softmax over axis 0 of xᵀ [4, 2]: over the 4 features of each sample (column)
  const ex = [1, 2, 3, 4].map(Math.exp);
  const sum = ex.reduce((p, q) => p + q, 0);
  close(arr(r.softmax), ex.flatMap((v) => [v / sum, 0.25]));
  // LayerNorm with eps 0.5 over [1,2,3,4]: var 1.25 → (x−2.5)/√1.75, plus the bias on the last element
  close(arr(r.ln).slice(0, 4), [-1.5, -0.5, 0.5, 1.5].map((v, i) => v / Math.sqrt(1.75) + (i === 3 ? 1 : 0)), 1e-5);
  assert.deepEqual(r.resized.dims, [1, 2, 8]);
  assert.deepEqual(arr(r.resized).slice(0, 8), [2, 2, 4, 4, 6, 6, 8, 8]);
  assert.throws(() => g.op('LeakyRelu', [x], { alpha: 0.1 }), /not an integer; use \{float: 0.1\}/);
});

test('multi-output ops, int64 constants, contrib ops and nn helpers', async () => {
  const dir = tmp();
  const g = new Graph('multi');
  const x = g.input('x', 'float32', [1, 6]);
  const [a, b, c] = splitLast(g, x, [1, 2, 3]);
  g.output(a, 'a');
  g.output(b, 'b');
  g.output(c, 'c');
  const [vals, idx] = g.opN('TopK', [x, g.constI64([2])], 2, { axis: -1 });
  g.output(vals, 'top');
  g.output(idx, 'top_i', 'int64');
  g.output(g.op('FusedMatMul', [x, g.op('Transpose', [x], { perm: [1, 0] })], { alpha: { float: 0.5 } }, { domain: MS_DOMAIN }), 'fused');
  g.output(rmsNorm(g, x, g.constF32([1, 1, 1, 1, 1, 2]), 0), 'rms');
  const ids = g.input('ids', 'int64', [2]);
  g.output(g.op('Add', [ids, g.constI64([10n, 2n ** 40n])]), 'ids_out', 'int64');
  const file = path.join(dir, 'multi.onnx');
  fs.writeFileSync(file, g.serialize(dir));
  const s = await openSession(file);
  const r = await s.run({ x: f32(Float32Array.of(1, 2, 3, 4, 5, 6), [1, 6]), ids: i64(BigInt64Array.of(1n, 2n), [2]) });
  assert.deepEqual(arr(r.a), [1]);
  assert.deepEqual(arr(r.b), [2, 3]);
  assert.deepEqual(arr(r.c), [4, 5, 6]);
  assert.deepEqual(arr(r.top), [6, 5]);
  assert.deepEqual(Array.from(r.top_i.data as BigInt64Array), [5n, 4n]);
  assert.deepEqual(arr(r.fused), [45.5]);
  const rms = Math.sqrt(91 / 6);
  close(arr(r.rms), [1, 2, 3, 4, 5, 12].map((v) => v / rms), 1e-6);
  assert.deepEqual(Array.from(r.ids_out.data as BigInt64Array), [11n, 2n ** 40n + 2n]);
});

test('external weights in place: bf16 and f32 at unaligned offsets, in two files, shared initializers', async () => {
  const dir = tmp();
  const w1 = [1, 2, 3, 4, 5, 6]; // [3 out, 2 in]
  writeSafetensors(path.join(dir, 'a.safetensors'), {
    pad: { dtype: 'U8', shape: [5], data: new Uint8Array(5) },
    w: { dtype: 'BF16', shape: [3, 2], data: f32ToBf16(Float32Array.from(w1)) },
  });
  fs.mkdirSync(path.join(dir, 'sub'));
  writeSafetensors(path.join(dir, 'sub', 'b.safetensors'), {
    pad: { dtype: 'U8', shape: [1], data: new Uint8Array(1) },
    v: { dtype: 'F32', shape: [3], data: Float32Array.of(0.5, -1, 2) },
  });
  const a = Checkpoint.open(path.join(dir, 'a.safetensors'));
  const b = Checkpoint.open(path.join(dir, 'sub', 'b.safetensors'));
  assert.equal(a.info('w').dataOffset % 2, 1, 'the bf16 weight starts at an odd byte offset');
  const g = new Graph('ext');
  const x = g.input('x', 'float32', ['n', 2]);
  const y = linear(g, x, a.info('w')); // [n, 3]
  const y2 = linear(g, x, a.info('w')); // same weight again: one initializer
  g.output(g.op('Add', [g.op('Mul', [y, g.weight(b.info('v'), 'float32')]), y2]), 'y');
  const model = onnxProto.onnx.ModelProto.decode(g.serialize(dir));
  const inits = model.graph!.initializer!.filter((t) => t.dataLocation === onnxProto.onnx.TensorProto.DataLocation.EXTERNAL);
  assert.equal(inits.length, 2);
  const loc = Object.fromEntries(inits[1].externalData!.map((e) => [e.key, e.value]));
  assert.deepEqual(loc, { location: 'sub/b.safetensors', offset: String(b.info('v').dataOffset), length: '12' });
  const { session } = await loadGraph('ext', { v: 1 }, [a.info('w').file, b.info('v').file], () => g);
  const r = await session.run({ x: f32(Float32Array.of(1, 1, 2, 0), [2, 2]) });
  // x·Wᵀ = [[3, 7, 11], [2, 6, 10]]; y·v + y
  close(arr(r.y), [3 * 1.5, 7 * 0, 11 * 3, 2 * 1.5, 6 * 0, 10 * 3]);
  // a weight file outside the model folder is refused, not silently broken
  assert.throws(() => g.serialize(path.join(dir, 'sub')), /outside the model folder/);
});

test('compiled-graph cache: hit, miss on a new key, miss on changed weights; read-only weight folders', async () => {
  const dir = tmp();
  const wf = path.join(dir, 'w.safetensors');
  writeSafetensors(wf, { w: { dtype: 'F32', shape: [1, 1], data: Float32Array.of(3) } });
  let builds = 0;
  const build = () => {
    builds++;
    const ck = Checkpoint.open(wf);
    const g = new Graph('c');
    g.output(linear(g, g.input('x', 'float32', [1, 1]), ck.info('w')), 'y');
    return g;
  };
  const first = compileGraph('cache', { k: 1 }, [wf], build);
  assert.equal(first.cached, false);
  assert.equal(path.dirname(first.file), fs.realpathSync(dir));
  const again = compileGraph('cache', { k: 1 }, [wf], build);
  assert.deepEqual([again.cached, again.file, builds], [true, first.file, 1]);
  const other = compileGraph('cache', { k: 2 }, [wf], build);
  assert.equal(other.cached, false);
  assert.notEqual(other.file, first.file);
  // a rewritten checkpoint (new size/mtime) gets a new graph
  await new Promise((r) => setTimeout(r, 20));
  writeSafetensors(wf, { pad: { dtype: 'U8', shape: [2], data: new Uint8Array(2) }, w: { dtype: 'F32', shape: [1, 1], data: Float32Array.of(5) } });
  const changed = compileGraph('cache', { k: 1 }, [wf], build);
  assert.equal(changed.cached, false);
  assert.equal(builds, 3);
  const s = await openSession(changed.file);
  assert.deepEqual(arr((await s.run({ x: f32(Float32Array.of(2), [1, 1]) })).y), [10]);

  // read-only folder (no write bits; even root must not write there): the graph goes to the cache with hard links
  const ro = tmp();
  const rof = path.join(ro, 'w.safetensors');
  writeSafetensors(rof, { pad: { dtype: 'U8', shape: [3], data: new Uint8Array(3) }, w: { dtype: 'F32', shape: [1, 1], data: Float32Array.of(7) } });
  const cacheDir = tmp();
  const prevCache = process.env.KLEIN_CACHE_DIR;
  process.env.KLEIN_CACHE_DIR = cacheDir;
  fs.chmodSync(ro, 0o555);
  try {
    const ck = Checkpoint.open(rof);
    const { session, file, cached } = await loadGraph('ro', {}, [rof], () => {
      const g = new Graph('ro');
      g.output(linear(g, g.input('x', 'float32', [1, 1]), ck.info('w')), 'y');
      return g;
    });
    assert.equal(cached, false);
    assert.ok(file.startsWith(fs.realpathSync(cacheDir)), `graph written to the cache, not the read-only folder: ${file}`);
    assert.deepEqual(fs.readdirSync(ro), ['w.safetensors']);
    assert.deepEqual(arr((await session.run({ x: f32(Float32Array.of(2), [1, 1]) })).y), [14]);
  } finally {
    fs.chmodSync(ro, 0o755);
    if (prevCache === undefined) delete process.env.KLEIN_CACHE_DIR;
    else process.env.KLEIN_CACHE_DIR = prevCache;
  }
});
