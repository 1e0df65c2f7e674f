import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Graph } from '../../src/graph/onnx-graph.ts';
import { linear } from '../../src/graph/nn.ts';
import { loadGraph, f32 } from '../../src/graph/session.ts';
import { Checkpoint, writeSafetensors, f32ToBf16 } from '../../src/weights/safetensors.ts';

test('a bf16 Linear weight referenced in place in a safetensors file runs in ORT', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-smoke-'));
  // an odd-sized tensor first so the weight sits at an unaligned offset
  writeSafetensors(path.join(dir, 'm.safetensors'), {
    pad: { dtype: 'U8', shape: [3], data: new Uint8Array(3) },
    w: { dtype: 'BF16', shape: [3, 2], data: f32ToBf16(new Float32Array([1, 2, 3, 4, 5, 6])) },
  });
  const ck = Checkpoint.open(dir);
  const build = () => {
    const g = new Graph('smoke');
    g.output(linear(g, g.input('x', 'float32', ['n', 2]), ck.info('w')), 'y');
    return g;
  };
  const first = await loadGraph('smoke', {}, [ck.info('w').file], build);
  assert.equal(first.cached, false);
  const r = await first.session.run({ x: f32(new Float32Array([1, 1, 2, 0]), [2, 2]) });
  assert.deepEqual(Array.from(r.y.data as Float32Array), [3, 7, 11, 2, 6, 10]);
  const second = await loadGraph('smoke', {}, [ck.info('w').file], build);
  assert.equal(second.cached, true);
  assert.equal(second.file, first.file);
});
