import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { cpuTarget } from '../../src/runtime/target.ts';
import { vaeComponent, writeDiffusersVaeCopy } from '../../src/conform/vae.ts';
import type { CaseResult } from '../../src/conform/types.ts';
import { Checkpoint } from '../../src/weights/safetensors.ts';
import { detectVaeLayout, inferVaeConfig, vaeKey } from '../../src/models/vae/checkpoint.ts';
import { FLUX2_VAE_CONFIG } from '../../src/models/vae/config.ts';

import { GOLDEN_DIR as GOLDEN } from '../golden.ts';

test('klein conform: every VAE golden output passes in both key layouts', async () => {
  const results: CaseResult[] = [];
  for await (const r of vaeComponent.run(GOLDEN, { target: cpuTarget() })) results.push(r);
  for (const r of results) assert.ok(r.passed, `${r.name}: max_abs_err=${r.maxAbsErr} tol=${r.tolerance} ${r.error ?? ''}`);
  const names = results.map((r) => r.name);
  for (const layout of ['bfl', 'diffusers']) {
    for (const out of ['decode_case (LAYOUT) image', 'encode_case (LAYOUT) moments', 'encode_case (LAYOUT) mean', 'encode_case (LAYOUT) latent']) {
      const want = `vae/${out.replace('LAYOUT', layout)}`;
      assert.ok(names.includes(want), `missing ${want} in ${names.join(', ')}`);
    }
  }
});

test('vaeKey reproduces the official converter mapping for every tensor', () => {
  const mapping = JSON.parse(fs.readFileSync(path.join(GOLDEN, 'vae/diffusers_key_mapping_from_bfl.json'), 'utf8')) as Record<string, { from: string }>;
  const levels = inferVaeConfig(Checkpoint.open(path.join(GOLDEN, 'vae/model.safetensors')), 'bfl').chMult.length;
  assert.ok(Object.keys(mapping).length > 200);
  for (const [df, { from }] of Object.entries(mapping)) assert.equal(vaeKey(from, 'diffusers', levels), df, from);
});

test('layout and config are read from the checkpoint', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-vae-layout-'));
  try {
    const bfl = Checkpoint.open(path.join(GOLDEN, 'vae/model.safetensors'));
    assert.equal(detectVaeLayout(bfl), 'bfl');
    assert.deepEqual(inferVaeConfig(bfl, 'bfl'), { inChannels: 3, outChannels: 3, ch: 32, chMult: [1, 1, 1, 2], numResBlocks: 2, zChannels: 32 });
    const df = path.join(dir, 'vae.safetensors');
    writeDiffusersVaeCopy(path.join(GOLDEN, 'vae/model.safetensors'), path.join(GOLDEN, 'vae/diffusers_key_mapping_from_bfl.json'), df);
    const d = Checkpoint.open(df);
    assert.equal(detectVaeLayout(d), 'diffusers');
    assert.deepEqual(inferVaeConfig(d, 'diffusers'), inferVaeConfig(bfl, 'bfl'));
    assert.deepEqual(d.info('decoder.mid_block.attentions.0.to_q.weight').shape, [64, 64]);
    assert.equal(FLUX2_VAE_CONFIG.ch, 128);
    const other = Checkpoint.open(path.join(GOLDEN, 'transformer/model.safetensors'));
    assert.throws(() => detectVaeLayout(other), /not a FLUX\.2 VAE checkpoint/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
