// The weight store end to end on a tiny Linear: a bf16 weight at an unaligned offset is widened once into the
// store's weights.bin, an fp32 one is used in place through a hard link, and ORT maps both; a second open reuses
// the store and the compiled graph.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Graph } from '../../src/graph/onnx-graph.ts';
import { Layers } from '../../src/graph/nn/layers.ts';
import { Fp32Policy } from '../../src/graph/nn/weight-policy.ts';
import { openGraphs } from '../../src/runtime/component.ts';
import { f32 } from '../../src/runtime/session.ts';
import { cpuTarget } from '../../src/runtime/target.ts';
import { Checkpoint, writeSafetensors, f32ToBf16 } from '../../src/weights/safetensors.ts';

process.env.KLEIN_CACHE_DIR = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-smoke-cache-'));

test('a bf16 weight is converted once into the store, an fp32 one is used in place; both run in ORT and are reused', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-smoke-'));
  // an odd-sized tensor first so the weights sit at unaligned offsets
  writeSafetensors(path.join(dir, 'm.safetensors'), {
    pad: { dtype: 'U8', shape: [3], data: new Uint8Array(3) },
    'a.weight': { dtype: 'BF16', shape: [3, 2], data: f32ToBf16(new Float32Array([1, 2, 3, 4, 5, 6])) },
    'b.weight': { dtype: 'F32', shape: [2, 3], data: new Float32Array([1, 0, 0, 0, 0, 1]) },
  });
  const ck = Checkpoint.open(dir);
  const weights = { parts: (n: string) => [ck.info(n)], has: (n: string) => ck.has(n) };
  const open = async () => {
    const g = new Graph('smoke');
    const nn = new Layers({ g, weights, policy: new Fp32Policy() });
    g.output(nn.linear(nn.linear(g.input('x', 'float32', ['n', 2]), 'a'), 'b'), 'y');
    return openGraphs([g], { name: 'smoke', target: cpuTarget(), policy: new Fp32Policy() });
  };
  const first = await open();
  assert.equal(first.store.built, true);
  assert.equal(first.sessions[0].cached, false);
  // a: [3, 2] bf16 widened to 24 bytes of fp32 (64-byte aligned slot); b: fp32, hard-linked, nothing converted
  assert.equal(fs.statSync(path.join(first.store.folder, 'weights.bin')).size, 64);
  const link = fs.readdirSync(path.join(first.store.folder, 'src'));
  assert.equal(link.length, 1);
  assert.equal(fs.statSync(path.join(first.store.folder, 'src', link[0])).ino, fs.statSync(path.join(dir, 'm.safetensors')).ino);
  const r = await first.sessions[0].run(new Map([['x', f32(new Float32Array([1, 1, 2, 0]), [2, 2])]]), { uploads: 0, downloads: 0 });
  // x·Aᵀ = [[3, 7, 11], [2, 6, 10]], then ·Bᵀ keeps columns 0 and 2
  assert.deepEqual(Array.from(r.y.data as Float32Array), [3, 11, 2, 10]);
  await first.sessions[0].release();
  const second = await open();
  assert.equal(second.store.built, false);
  assert.equal(second.store.folder, first.store.folder);
  assert.equal(second.sessions[0].cached, true);
  await second.sessions[0].release();
});
