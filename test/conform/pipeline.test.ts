import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { pipelineComponent } from '../../src/conform/pipeline.ts';
import type { CaseResult } from '../../src/conform/types.ts';
import { GoldenCase } from '../../src/conform/golden.ts';
import { readRaw, writeSafetensors, type TensorToWrite } from '../../src/weights/safetensors.ts';
import { GOLDEN_DIR as GOLDEN } from '../golden.ts';

async function conformPipeline(dir: string): Promise<CaseResult[]> {
  const results: CaseResult[] = [];
  for await (const r of pipelineComponent.run(dir, { device: 'cpu' })) results.push(r);
  return results;
}

function assertAllPass(results: CaseResult[]): void {
  for (const r of results) assert.ok(r.passed, `${r.name}: max_abs_err=${r.maxAbsErr} tol=${r.tolerance} ${r.error ?? ''}`);
}

/**
 * The golden edit case with its 128×96 reference embedded in a 135×105 noise frame (odd sides) placed so that the
 * pipeline's centre crop to multiples of 16 (left ⌊7/2⌋ = 3, top ⌊9/2⌋ = 4) gives back exactly the stored reference:
 * every stored output stays the expected one.
 */
async function writeOddReferenceCase(file: string): Promise<{ width: number; height: number }> {
  const edit = new GoldenCase(path.join(GOLDEN, 'pipeline/edit.safetensors'));
  const [h, w] = edit.shape('ref_image_uint8_hwc');
  const width = w + 7;
  const height = h + 9;
  const ref = sharp(edit.u8('ref_image_uint8_hwc'), { raw: { width: w, height: h, channels: 3 } });
  const framed = await sharp({ create: { width, height, channels: 3, background: '#000', noise: { type: 'gaussian', mean: 128, sigma: 60 } } })
    .composite([{ input: await ref.png().toBuffer(), left: 3, top: 4 }])
    .removeAlpha()
    .raw()
    .toBuffer();
  const tensors: Record<string, TensorToWrite> = {};
  for (const [name, info] of edit.file.tensors) tensors[name] = { dtype: info.dtype, shape: info.shape, data: new Uint8Array(readRaw(info)) };
  tensors.ref_image_uint8_hwc = { dtype: 'U8', shape: [height, width, 3], data: new Uint8Array(framed) };
  writeSafetensors(file, tensors, edit.metadata);
  return { width, height };
}

test('klein conform: every pipeline golden case passes (t2i, edit, klein-base CFG)', async () => {
  const results = await conformPipeline(GOLDEN);
  assertAllPass(results);
  for (const c of ['t2i', 'edit', 't2i_base_cfg']) assert.ok(results.some((r) => r.name.startsWith(`pipeline/${c} `)), `no result for pipeline/${c}`);
});

test('klein conform prepares an odd-sized pipeline reference as the pipeline does (centre crop to multiples of 16)', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-conform-odd-'));
  try {
    for (const sub of ['text_encoder', 'transformer', 'vae']) fs.symlinkSync(path.join(GOLDEN, sub), path.join(dir, sub));
    const size = await writeOddReferenceCase(path.join(dir, 'pipeline', 'edit_odd.safetensors'));
    assert.deepEqual(size, { width: 135, height: 105 });
    const results = await conformPipeline(dir);
    assertAllPass(results);
    const names = results.map((r) => r.name);
    for (const n of ['ref_image_tensor', 'ref_latent', 'img_cond_seq', 'decoded', 'image_uint8_bfl']) assert.ok(names.includes(`pipeline/edit_odd ${n}`), `missing ${n}: ${names.join(', ')}`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
