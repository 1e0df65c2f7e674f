import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import { Graph, MS_DOMAIN, ONNX_ELEM } from '../../src/graph/onnx-graph.ts';
import { Fp32Policy } from '../../src/graph/nn/weight-policy.ts';
import { compileGraph, f32, i64, openSession } from '../../src/runtime/session.ts';
import { Checkpoint, SafetensorsFile, f32ToBf16, writeSafetensors } from '../../src/weights/safetensors.ts';
import { WeightStore, kleinCacheRoot } from '../../src/weights/weight-store.ts';
import { compile, layersOf } from './helpers.ts';

// weight stores and compiled graphs of this file's temporary checkpoints go to a cache folder of their own
const cacheRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-graph-cache-'));
process.env.KLEIN_CACHE_DIR = cacheRoot;
const tmpDirs: string[] = [];
after(() => {
  for (const d of [cacheRoot, ...tmpDirs]) fs.rmSync(d, { recursive: true, force: true });
});

const tmp = () => {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-graph-'));
  tmpDirs.push(d);
  return d;
};
const arr = (t: { data: unknown }) => Array.from(t.data as Float32Array);
const cpu = (file: string) => openSession(file, { device: 'cpu', threads: 1, prepack: false });
const { TensorProto } = onnxProto.onnx;

function close(a: number[], b: number[], tol = 1e-6): void {
  assert.equal(a.length, b.length);
  a.forEach((v, i) => assert.ok(Math.abs(v - b[i]) <= tol, `[${i}] ${v} vs ${b[i]}`));
}

/** A model without external weights, written to a file ORT opens. */
function writeModel(g: Graph): string {
  const file = path.join(tmp(), `${g.name}.onnx`);
  fs.writeFileSync(file, g.serialize());
  return file;
}

test('ops with int, float, ints and string attributes; constants; scalars; scopes', async () => {
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
  const file = writeModel(g);
  // node names carry the scope, like a module path
  const model = onnxProto.onnx.ModelProto.decode(fs.readFileSync(file));
  assert.ok(model.graph!.node!.some((n) => n.name!.startsWith('block.0/Softmax')));
  assert.deepEqual(model.opsetImport!.map((o) => o.domain), ['', MS_DOMAIN]);
  const s = await cpu(file);
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
  await s.release();
});

test('multi-output ops, int64 constants, contrib ops and the layer library', async () => {
  const dir = tmp();
  writeSafetensors(path.join(dir, 'w.safetensors'), { 'norm.scale': { dtype: 'BF16', shape: [6], data: f32ToBf16(Float32Array.of(1, 1, 1, 1, 1, 2)) } });
  const g = new Graph('multi');
  const nn = layersOf(g, Checkpoint.open(dir), new Fp32Policy());
  const x = g.input('x', 'float32', [1, 6]);
  const [a, b, c] = g.opN('Split', [x, g.constI64([1, 2, 3])], 3, { axis: -1 });
  g.output(a, 'a');
  g.output(b, 'b');
  g.output(c, 'c');
  const [vals, idx] = g.opN('TopK', [x, g.constI64([2])], 2, { axis: -1 });
  assert.deepEqual([vals.type, idx.type], ['float32', 'int64'], 'TopK: values like the input, indices int64');
  g.output(vals, 'top');
  g.output(idx, 'top_i');
  g.output(g.op('FusedMatMul', [x, g.op('Transpose', [x], { perm: [1, 0] })], { alpha: { float: 0.5 } }, { domain: MS_DOMAIN }), 'fused');
  g.output(nn.rmsNorm(x, 'norm.scale', 0), 'rms');
  g.output(nn.silu(x), 'silu');
  const ids = g.input('ids', 'int64', [2]);
  g.output(g.op('Add', [ids, g.constI64([10n, 2n ** 40n])]), 'ids_out');
  const { file } = await compile(g, nn.policy);
  const s = await cpu(file);
  const r = await s.run({ x: f32(Float32Array.of(1, 2, 3, 4, 5, 6), [1, 6]), ids: i64(BigInt64Array.of(1n, 2n), [2]) });
  assert.deepEqual(arr(r.a), [1]);
  assert.deepEqual(arr(r.b), [2, 3]);
  assert.deepEqual(arr(r.c), [4, 5, 6]);
  assert.deepEqual(arr(r.top), [6, 5]);
  assert.equal(r.top_i.type, 'int64');
  assert.deepEqual(Array.from(r.top_i.data as BigInt64Array), [5n, 4n]);
  assert.deepEqual(arr(r.fused), [45.5]);
  const rms = Math.sqrt(91 / 6);
  close(arr(r.rms), [1, 2, 3, 4, 5, 12].map((v) => v / rms), 1e-6);
  close(arr(r.silu), [1, 2, 3, 4, 5, 6].map((v) => v / (1 + Math.exp(-v))), 1e-6);
  assert.deepEqual(Array.from(r.ids_out.data as BigInt64Array), [11n, 2n ** 40n + 2n]);
  await s.release();
});

test('typed values: every op output has its element type, casts are explicit, and ORT agrees with the declared types', async () => {
  const g = new Graph('types');
  const x = g.input('x', 'float32', [2, 3]);
  const before = g.nodeCount;
  assert.equal(g.cast(x, 'float32'), x, 'a cast to the same type is no node');
  assert.equal(g.nodeCount, before);
  const h = g.cast(x, 'float16');
  assert.equal(h.type, 'float16');
  const shape = g.op('Shape', [x]);
  assert.equal(shape.type, 'int64');
  const positive = g.op('Greater', [x, g.scalarF32(0)]);
  assert.equal(positive.type, 'bool');
  const picked = g.op('Where', [positive, h, g.cast(g.op('Neg', [x]), 'float16')]);
  assert.equal(picked.type, 'float16', 'Where is typed like its values, not its condition');
  const [q, scale, zero] = g.opN('DynamicQuantizeLinear', [x], 3);
  assert.deepEqual([q.type, scale.type, zero.type], ['uint8', 'float32', 'uint8']);
  g.output(picked, 'abs_half');
  g.output(shape, 'shape');
  g.output(q, 'q');
  g.output(g.cast(picked, 'float32'), 'abs');
  const model = onnxProto.onnx.ModelProto.decode(g.serialize());
  const declared = Object.fromEntries(model.graph!.output!.map((o) => [o.name, o.type!.tensorType!.elemType]));
  assert.deepEqual(declared, { abs_half: ONNX_ELEM.float16, shape: ONNX_ELEM.int64, q: ONNX_ELEM.uint8, abs: ONNX_ELEM.float32 });
  // ORT refuses a model whose declared types contradict its ops, and returns tensors of the declared types
  const s = await cpu(writeModel(g));
  const r = await s.run({ x: f32(Float32Array.of(-1, 2, -3, 0.5, -0.25, 4), [2, 3]) });
  assert.deepEqual([r.abs_half.type, r.shape.type, r.q.type, r.abs.type], ['float16', 'int64', 'uint8', 'float32']);
  assert.deepEqual(arr(r.abs), [1, 2, 3, 0.5, 0.25, 4]);
  assert.deepEqual(Array.from(r.shape.data as BigInt64Array), [2n, 3n]);
  await s.release();
});

test('external weights: a bf16 weight converted once into weights.bin, an f32 one read in place at an unaligned offset through a hard link; one initializer per weight', async () => {
  const dir = tmp();
  const w1 = [1, 2, 3, 4, 5, 6]; // [3 out, 2 in]
  writeSafetensors(path.join(dir, 'a.safetensors'), {
    pad_a: { dtype: 'U8', shape: [5], data: new Uint8Array(5) },
    'w.weight': { dtype: 'BF16', shape: [3, 2], data: f32ToBf16(Float32Array.from(w1)) },
  });
  fs.mkdirSync(path.join(dir, 'sub'));
  const bFile = path.join(dir, 'sub', 'b.safetensors');
  writeSafetensors(bFile, {
    pad_b: { dtype: 'U8', shape: [1], data: new Uint8Array(1) },
    v: { dtype: 'F32', shape: [3], data: Float32Array.of(0.5, -1, 2) },
    table: { dtype: 'I64', shape: [3], data: BigInt64Array.of(7n, 8n, 2n ** 40n) },
  });
  const ck = new Checkpoint([new SafetensorsFile(path.join(dir, 'a.safetensors')), new SafetensorsFile(bFile)]);
  assert.equal(ck.info('w.weight').dataOffset % 2, 1, 'the bf16 weight starts at an odd byte offset');
  assert.equal(ck.info('v').dataOffset % 4, 1, 'the f32 weight starts at an unaligned byte offset');
  const g = new Graph('ext');
  const nn = layersOf(g, ck, new Fp32Policy());
  const x = g.input('x', 'float32', ['n', 2]);
  const y = nn.linear(x, 'w'); // [n, 3]
  const y2 = nn.linear(x, 'w'); // same weight again: one initializer
  g.output(g.op('Add', [g.op('Mul', [y, nn.param('v')]), y2]), 'y');
  const table = nn.param('table');
  assert.equal(table.type, 'int64', 'integer tables pass through as stored');
  g.output(g.op('Add', [table, g.constI64([1])]), 'table_plus_1');
  assert.equal(g.weights.size, 3);
  assert.throws(() => g.serialize(), /weight w\.weight needs a weight store to be serialized/);

  const { store, file } = await compile(g, nn.policy);
  assert.equal(store.built, true);
  assert.equal(path.dirname(file), store.folder);
  assert.ok(store.folder.startsWith(path.join(kleinCacheRoot(), 'weights')), `the store lives in the cache, not beside the checkpoint: ${store.folder}`);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['a.safetensors', 'sub']);
  const model = onnxProto.onnx.ModelProto.decode(fs.readFileSync(file));
  const ext = model.graph!.initializer!.filter((t) => t.dataLocation === TensorProto.DataLocation.EXTERNAL);
  const loc = Object.fromEntries(ext.map((t) => [t.name, Object.fromEntries(t.externalData!.map((e) => [e.key, e.value]))]));
  assert.deepEqual(Object.keys(loc).sort(), ['table', 'v', 'w.weight']);
  assert.equal(ext.find((t) => t.name === 'w.weight')!.dataType, ONNX_ELEM.float32, 'bf16 widened to fp32 by the store, not by a Cast in the graph');
  assert.ok(!model.graph!.node!.some((n) => n.opType === 'Cast'));
  assert.deepEqual(loc['w.weight'], { location: 'weights.bin', offset: '0', length: '24' });
  assert.equal(fs.statSync(path.join(store.folder, 'weights.bin')).size, 64, 'only the converted weight is written (one 64-byte aligned slot)');
  // the f32 and int64 tensors are used as stored: the graph points into a hard link of the checkpoint file
  for (const [name, length] of [['v', 12], ['table', 24]] as const) {
    assert.equal(loc[name].offset, String(ck.info(name).dataOffset));
    assert.equal(loc[name].length, String(length));
    assert.equal(fs.statSync(path.join(store.folder, loc[name].location)).ino, fs.statSync(bFile).ino, `${name}: a hard link, not a copy`);
  }
  const s = await cpu(file);
  const r = await s.run({ x: f32(Float32Array.of(1, 1, 2, 0), [2, 2]) });
  // x·Wᵀ = [[3, 7, 11], [2, 6, 10]]; y·v + y
  close(arr(r.y), [3 * 1.5, 7 * 0, 11 * 3, 2 * 1.5, 6 * 0, 10 * 3]);
  assert.deepEqual(Array.from(r.table_plus_1.data as BigInt64Array), [8n, 9n, 2n ** 40n + 1n]);
  await s.release();
  // a store answers only for the weights it holds
  assert.throws(() => store.locate({ ...g.weights.get('v')!, key: 'nope' }), /weight nope is not in/);
});

test('compiled graphs are keyed by content: the same graph reuses its file, a changed graph or checkpoint is a new file; read-only weight folders', async () => {
  const dir = tmp();
  const wf = path.join(dir, 'w.safetensors');
  writeSafetensors(wf, { 'w.weight': { dtype: 'F32', shape: [1, 1], data: Float32Array.of(3) } });
  const build = (scale?: number) => {
    const g = new Graph('c');
    const nn = layersOf(g, Checkpoint.open(wf), new Fp32Policy());
    const y = nn.linear(g.input('x', 'float32', [1, 1]), 'w');
    g.output(scale === undefined ? y : g.op('Mul', [y, g.scalarF32(scale)]), 'y');
    return g;
  };
  const run = async (file: string) => {
    const s = await cpu(file);
    try {
      return arr((await s.run({ x: f32(Float32Array.of(2), [1, 1]) })).y);
    } finally {
      await s.release();
    }
  };
  const first = await compile(build(), new Fp32Policy(), 'test-cache');
  assert.equal(first.cached, false);
  assert.equal(first.store.built, true);
  // a graph built again the same way is the same bytes: its file is reused, and so is the weight store
  const again = await compile(build(), new Fp32Policy(), 'test-cache');
  assert.deepEqual([again.cached, again.file, again.store.built, again.store.folder], [true, first.file, false, first.store.folder]);
  // another graph over the same weights: a new file beside the first, in the same store
  const other = compileGraph(build(2), again.store);
  assert.equal(other.cached, false);
  assert.notEqual(other.file, first.file);
  assert.equal(path.dirname(other.file), first.store.folder);
  assert.deepEqual(await run(other.file), [12]);
  assert.equal(compileGraph(build(2), again.store).cached, true);
  // a rewritten checkpoint (new size/mtime) gets a new weight store and so a new graph
  await new Promise((r) => setTimeout(r, 20));
  writeSafetensors(wf, { pad: { dtype: 'U8', shape: [2], data: new Uint8Array(2) }, 'w.weight': { dtype: 'F32', shape: [1, 1], data: Float32Array.of(5) } });
  const changed = await compile(build(), new Fp32Policy(), 'test-cache');
  assert.equal(changed.cached, false);
  assert.equal(changed.store.built, true);
  assert.notEqual(changed.store.folder, first.store.folder);
  assert.deepEqual(await run(changed.file), [10]);

  // read-only folder (no write bits; even root must not write there): store and graph go to the cache
  const ro = tmp();
  const rof = path.join(ro, 'w.safetensors');
  writeSafetensors(rof, { pad: { dtype: 'U8', shape: [3], data: new Uint8Array(3) }, 'w.weight': { dtype: 'F32', shape: [1, 1], data: Float32Array.of(7) } });
  fs.chmodSync(ro, 0o555);
  try {
    const g = new Graph('ro');
    const nn = layersOf(g, Checkpoint.open(rof), new Fp32Policy());
    g.output(nn.linear(g.input('x', 'float32', [1, 1]), 'w'), 'y');
    const store = await WeightStore.open({ component: 'test-ro', tag: 'fp32', refs: [...g.weights.values()] });
    const { file, cached } = compileGraph(g, store);
    assert.equal(cached, false);
    assert.ok(file.startsWith(cacheRoot), `graph written to the cache, not the read-only folder: ${file}`);
    assert.deepEqual(fs.readdirSync(ro), ['w.safetensors']);
    assert.deepEqual(await run(file), [14]);
  } finally {
    fs.chmodSync(ro, 0o755);
  }
});
