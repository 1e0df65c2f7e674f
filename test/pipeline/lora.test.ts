// LoRAs end to end on the tiny model: for every LoRA file format, an image generated with `loras: [{path, scale}]`
// against the same request on a model folder whose transformer was merged as W + s·(alpha/rank)·B·A into a new fp32
// safetensors. The two differ only by fp32 rounding inside the transformer (velocity within ~1e-6 relative,
// test/models/lora-apply.test.ts), so decoded pixels may differ by at most one level (1/255); scale 0 and a request
// without LoRAs give the base image byte for byte, before and after LoRA requests on the same pipeline.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { KleinPipeline } from '../../src/pipeline/pipeline.ts';
import { PipelineInputError } from '../../src/pipeline/request.ts';
import type { GenerateRequest } from '../../src/pipeline/types.ts';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';
import { TINY_LORA_FORMATS, writeTinyLora } from '../../src/fixtures/lora.ts';
import { openFlux2Checkpoint } from '../../src/models/flux2/checkpoint.ts';
import { LoraError, loadLora } from '../../src/models/flux2/lora/load.ts';
import { mergeLorasIntoCheckpoint } from '../../src/models/flux2/lora/merge.ts';
import { cpuTarget } from '../../src/runtime/target.ts';

const SCALE = 0.8;
const REQ: GenerateRequest = { prompt: 'a red fox in the snow', width: 96, height: 64, seed: 7, numImages: 1, outputFormat: 'png' };

let dir: string;
let model: string;
let transformerFile: string;
let pipe: KleinPipeline;

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-pipe-lora-'));
  model = path.join(dir, 'model');
  writeTinyModel(model, { seed: 1, depth: 2, singleDepth: 2 });
  transformerFile = path.join(model, 'transformer', 'diffusion_pytorch_model.safetensors');
  const cfg = openFlux2Checkpoint(transformerFile).config;
  for (const f of TINY_LORA_FORMATS) writeTinyLora(path.join(dir, `${f}.safetensors`), f, cfg, { seed: 11 });
  pipe = await KleinPipeline.open({ target: cpuTarget(), model, keepLoaded: true });
});

after(async () => {
  await pipe?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function pixels(png: Uint8Array): Promise<Buffer> {
  return sharp(png).raw().toBuffer();
}

function maxDiff(a: Buffer, b: Buffer): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** The tiny model folder with its transformer replaced by `lora` merged at `scale` (fp32), other parts linked. */
function mergedModel(format: string, scale: number): string {
  const out = path.join(dir, `merged-${format}`);
  fs.mkdirSync(path.join(out, 'transformer'), { recursive: true });
  for (const e of fs.readdirSync(model)) if (e !== 'transformer') fs.symlinkSync(path.join(model, e), path.join(out, e));
  fs.symlinkSync(path.join(model, 'transformer', 'config.json'), path.join(out, 'transformer', 'config.json'));
  const lora = loadLora(path.join(dir, `${format}.safetensors`), openFlux2Checkpoint(transformerFile).config);
  mergeLorasIntoCheckpoint(transformerFile, [{ lora, scale }], path.join(out, 'transformer', 'diffusion_pytorch_model.safetensors'), { dtype: 'F32' });
  return out;
}

test('each LoRA format at scale 0.8 gives the image of its merged checkpoint (pixels within 1/255); scale 0 and none give the base bytes', async () => {
  const plain = Buffer.from((await pipe.generate(REQ)).images[0].data);
  const report: string[] = [];
  for (const format of TINY_LORA_FORMATS) {
    const file = path.join(dir, `${format}.safetensors`);
    const withLora = await pipe.generate({ ...REQ, loras: [{ path: file, scale: SCALE }] });
    assert.ok(withLora.timings.lora >= 0, 'LoRA time is reported');
    const merged = await KleinPipeline.open({ target: cpuTarget(), model: mergedModel(format, SCALE), keepLoaded: true });
    let reference: Uint8Array;
    try {
      reference = (await merged.generate(REQ)).images[0].data;
    } finally {
      await merged.close();
    }
    const [a, b, p] = await Promise.all([pixels(withLora.images[0].data), pixels(reference), pixels(plain)]);
    const d = maxDiff(a, b);
    report.push(`${format} ${d}${Buffer.from(reference).equals(Buffer.from(withLora.images[0].data)) ? ' (same bytes)' : ''}`);
    assert.ok(d <= 1, `${format}: LoRA vs merged differ by ${d}/255`);
    assert.ok(maxDiff(a, p) > 8, `${format}: the LoRA did not change the image`);
    const zero = await pipe.generate({ ...REQ, loras: [{ path: file, scale: 0 }] });
    assert.ok(Buffer.from(zero.images[0].data).equals(plain), `${format} at scale 0`);
  }
  assert.ok(Buffer.from((await pipe.generate(REQ)).images[0].data).equals(plain), 'no LoRA after LoRA requests');
  console.log(`LoRA vs merged, max pixel difference: ${report.join(', ')}`);
});

test('a LoRA for another model is refused before any component loads; bad loras fields are input errors; the pipeline works after', async () => {
  const wide = path.join(dir, 'wide.safetensors');
  const cfg = openFlux2Checkpoint(transformerFile).config;
  writeTinyLora(wide, 'kohya', { ...cfg, hiddenSize: cfg.hiddenSize * 2, numHeads: cfg.numHeads * 2 });
  const fresh = await KleinPipeline.open({ target: cpuTarget(), model });
  try {
    await assert.rejects(fresh.generate({ ...REQ, loras: [{ path: wide, scale: 1 }] }), (e: unknown) => e instanceof LoraError && e.code === 'lora_incompatible' && /maps 128 → 384/.test(e.message));
    assert.deepEqual(fresh.loadedComponents(), []);
    await assert.rejects(fresh.generate({ ...REQ, loras: [{ path: path.join(dir, 'nope.safetensors'), scale: 1 }] }), (e: unknown) => e instanceof LoraError && e.code === 'lora_not_found');
    await assert.rejects(fresh.generate({ ...REQ, loras: [{ path: wide, scale: 11 }] }), (e: unknown) => e instanceof PipelineInputError && e.code === 'invalid_loras');
    const five = Array.from({ length: 5 }, () => ({ path: wide, scale: 1 }));
    await assert.rejects(fresh.generate({ ...REQ, loras: five }), (e: unknown) => e instanceof PipelineInputError && e.code === 'invalid_loras');
    const ok = await fresh.generate({ ...REQ, loras: [{ path: path.join(dir, 'kohya.safetensors'), scale: 1 }] });
    assert.equal(ok.images.length, 1);
  } finally {
    await fresh.close();
  }
});
