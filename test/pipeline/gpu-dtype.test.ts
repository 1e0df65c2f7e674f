// KleinPipeline's GPU dtype: fixed at open (fp16 refused on the CPU, none reported there), carried to every
// component it loads, and part of the prompt cache key, so a shared cache never serves an fp16 context to an fp32
// pipeline or the reverse. The WebGPU tests run on Mesa lavapipe (scripts/setup-webgpu.sh) and are skipped with
// that reason when VK_ICD_FILENAMES is unset.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { UsageError } from '../../src/cli/errors.ts';
import { KleinPipeline } from '../../src/pipeline/pipeline.ts';
import { PromptEmbeddingCache } from '../../src/text/prompt-cache.ts';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';

const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (CI does)';

let dir: string;
let model: string;

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-gpu-dtype-'));
  model = path.join(dir, 'model');
  writeTinyModel(model, { seed: 3 });
});

after(() => fs.rmSync(dir, { recursive: true, force: true }));

test('on the CPU a pipeline has no GPU dtype, and fp16 is refused at open', async () => {
  const p = await KleinPipeline.open({ model, device: 'cpu', gpuDtype: 'fp32' });
  assert.equal(p.device, 'cpu');
  assert.equal(p.gpuDtype, undefined);
  await p.encodePrompts(['a fox']);
  assert.deepEqual(p.componentDtypes(), { 'text-encoder': 'fp32' });
  await p.close();
  await assert.rejects(KleinPipeline.open({ model, device: 'cpu', gpuDtype: 'fp16' }), (e: Error) => e instanceof UsageError && /fp16 compute needs a GPU device/.test(e.message));
});

test('webgpu: fp16 and fp32 pipelines sharing a prompt cache each encode the prompt themselves; the contexts differ slightly', { skip: noVulkan }, async () => {
  const cache = new PromptEmbeddingCache();
  const f16 = await KleinPipeline.open({ model, device: 'webgpu', gpuDtype: 'fp16', promptCache: cache });
  const f32 = await KleinPipeline.open({ model, device: 'webgpu', gpuDtype: 'fp32', promptCache: cache });
  try {
    assert.equal(f16.gpuDtype, 'fp16');
    assert.equal(f32.gpuDtype, 'fp32');
    const a = await f16.encodePrompts(['a tiny red fox']);
    assert.equal(cache.stats.misses, 1);
    const b = await f32.encodePrompts(['a tiny red fox']);
    assert.equal(cache.stats.misses, 2, 'an fp32 pipeline was served an fp16 prompt context');
    assert.equal(cache.stats.hits, 0);
    await f16.encodePrompts(['a tiny red fox']);
    assert.equal(cache.stats.hits, 1, 'fp16 contexts are cached for fp16 pipelines');
    assert.equal(f16.componentDtypes()['text-encoder'], 'fp16');
    assert.equal(f32.componentDtypes()['text-encoder'], 'fp32');
    // close, not equal: the text encoder really ran in fp16 (relative to the context's largest value)
    let maxRef = 0;
    let maxErr = 0;
    for (let i = 0; i < a.ctx.length; i++) {
      maxRef = Math.max(maxRef, Math.abs(b.ctx[i]));
      maxErr = Math.max(maxErr, Math.abs(a.ctx[i] - b.ctx[i]));
    }
    assert.ok(maxErr > 0, 'the fp16 context equals the fp32 one');
    assert.ok(maxErr < 0.05 * maxRef, `fp16 context off by ${maxErr} (max |ref| ${maxRef})`);
  } finally {
    await f16.close();
    await f32.close();
  }
});

test('webgpu: $KLEIN_GPU_DTYPE is the default, else fp16', { skip: noVulkan }, async () => {
  const saved = process.env.KLEIN_GPU_DTYPE;
  try {
    delete process.env.KLEIN_GPU_DTYPE;
    assert.equal((await KleinPipeline.open({ model, device: 'webgpu' })).gpuDtype, 'fp16');
    process.env.KLEIN_GPU_DTYPE = 'fp32';
    assert.equal((await KleinPipeline.open({ model, device: 'webgpu' })).gpuDtype, 'fp32');
    // the option wins over the variable
    assert.equal((await KleinPipeline.open({ model, device: 'webgpu', gpuDtype: 'fp16' })).gpuDtype, 'fp16');
  } finally {
    if (saved === undefined) delete process.env.KLEIN_GPU_DTYPE;
    else process.env.KLEIN_GPU_DTYPE = saved;
  }
});
