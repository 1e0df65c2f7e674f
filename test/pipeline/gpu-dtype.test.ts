// KleinPipeline's GPU dtype: part of the execution target resolved at the edge (fp16 refused on the CPU, fp32 there),
// carried to every component it loads, and part of the prompt cache key, so a shared cache never serves an fp16
// context to an fp32 pipeline or the reverse. The WebGPU tests run on Mesa lavapipe (scripts/setup-webgpu.sh) and
// are skipped with that reason when VK_ICD_FILENAMES is unset.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { UsageError } from '../../src/cli/errors.ts';
import { targetFromFlags } from '../../src/cli/target-options.ts';
import { UserError } from '../../src/errors.ts';
import { KleinPipeline } from '../../src/pipeline/pipeline.ts';
import { resolveTarget } from '../../src/runtime/target.ts';
import { PromptEmbeddingCache } from '../../src/text/prompt-cache.ts';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';

const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (CI does)';

let dir: string;
let model: string;
// the weight stores of this file's tiny model go to a cache folder of their own
const cacheRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-gpu-dtype-cache-'));
process.env.KLEIN_CACHE_DIR = cacheRoot;

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-gpu-dtype-'));
  model = path.join(dir, 'model');
  writeTinyModel(model, { seed: 3 });
});

after(() => {
  fs.rmSync(dir, { recursive: true, force: true });
  fs.rmSync(cacheRoot, { recursive: true, force: true });
});

test('on the CPU a pipeline computes in fp32, and fp16 is refused before a pipeline opens', async () => {
  const p = await KleinPipeline.open({ model, target: await resolveTarget({ device: 'cpu', gpuDtype: 'fp32' }) });
  assert.equal(p.target.device, 'cpu');
  assert.equal(p.target.gpuDtype, 'fp32');
  await p.encodePrompts(['a fox']);
  assert.deepEqual(p.componentDtypes(), { 'text-encoder': 'fp32', transformer: 'fp32', 'vae-encoder': 'fp32', 'vae-decoder': 'fp32' });
  await p.close();
  await assert.rejects(resolveTarget({ device: 'cpu', gpuDtype: 'fp16' }), (e: Error) => e instanceof UserError && /fp16 compute needs a GPU device/.test(e.message));
  // at the CLI's edge: the flag is refused on the CPU; the variable is about GPUs, so the CPU ignores it
  await assert.rejects(targetFromFlags({ device: 'cpu', gpuDtype: 'fp16' }), (e: Error) => e instanceof UsageError && /--gpu-dtype fp16: fp16 compute needs a GPU device/.test(e.message));
  const saved = process.env.KLEIN_GPU_DTYPE;
  process.env.KLEIN_GPU_DTYPE = 'fp16';
  try {
    assert.equal((await targetFromFlags({ device: 'cpu' })).gpuDtype, 'fp32');
  } finally {
    if (saved === undefined) delete process.env.KLEIN_GPU_DTYPE;
    else process.env.KLEIN_GPU_DTYPE = saved;
  }
});

test('webgpu: fp16 and fp32 pipelines sharing a prompt cache each encode the prompt themselves; the contexts differ slightly', { skip: noVulkan }, async () => {
  const cache = new PromptEmbeddingCache();
  const f16 = await KleinPipeline.open({ model, target: await resolveTarget({ device: 'webgpu', gpuDtype: 'fp16' }), promptCache: cache });
  const f32 = await KleinPipeline.open({ model, target: await resolveTarget({ device: 'webgpu', gpuDtype: 'fp32' }), promptCache: cache });
  try {
    assert.equal(f16.target.gpuDtype, 'fp16');
    assert.equal(f32.target.gpuDtype, 'fp32');
    const a = await f16.encodePrompts(['a tiny red fox']);
    assert.equal(cache.stats.misses, 1);
    const b = await f32.encodePrompts(['a tiny red fox']);
    assert.equal(cache.stats.misses, 2, 'an fp32 pipeline was served an fp16 prompt context');
    assert.equal(cache.stats.hits, 0);
    await f16.encodePrompts(['a tiny red fox']);
    assert.equal(cache.stats.hits, 1, 'fp16 contexts are cached for fp16 pipelines');
    // the text encoder and transformer compute in the target's dtype; the VAE stays fp32 on GPUs
    assert.deepEqual(f16.componentDtypes(), { 'text-encoder': 'fp16', transformer: 'fp16', 'vae-encoder': 'fp32', 'vae-decoder': 'fp32' });
    assert.deepEqual(f32.componentDtypes(), { 'text-encoder': 'fp32', transformer: 'fp32', 'vae-encoder': 'fp32', 'vae-decoder': 'fp32' });
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

test('webgpu: $KLEIN_GPU_DTYPE is the default, else fp16; the flag wins', { skip: noVulkan }, async () => {
  const saved = process.env.KLEIN_GPU_DTYPE;
  const open = async (flags: { gpuDtype?: string }) => {
    const p = await KleinPipeline.open({ model, target: await targetFromFlags({ device: 'webgpu', ...flags }) });
    await p.close();
    return p.target.gpuDtype;
  };
  try {
    delete process.env.KLEIN_GPU_DTYPE;
    assert.equal(await open({}), 'fp16');
    process.env.KLEIN_GPU_DTYPE = 'fp32';
    assert.equal(await open({}), 'fp32');
    // the option wins over the variable
    assert.equal(await open({ gpuDtype: 'fp16' }), 'fp16');
    process.env.KLEIN_GPU_DTYPE = 'half';
    await assert.rejects(open({}), (e: Error) => e instanceof UsageError && /^KLEIN_GPU_DTYPE: unknown GPU dtype "half"; use one of: fp32, fp16$/.test(e.message));
  } finally {
    if (saved === undefined) delete process.env.KLEIN_GPU_DTYPE;
    else process.env.KLEIN_GPU_DTYPE = saved;
  }
});
