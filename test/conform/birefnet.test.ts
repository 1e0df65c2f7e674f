import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { cpuTarget } from '../../src/runtime/target.ts';
import { birefnetComponent } from '../../src/conform/birefnet.ts';
import type { CaseResult } from '../../src/conform/types.ts';
import { GOLDEN_DIR as GOLDEN } from '../golden.ts';

test('klein conform: every BiRefNet golden output passes', async () => {
  const results: CaseResult[] = [];
  for await (const r of birefnetComponent.run(GOLDEN, { target: cpuTarget() })) results.push(r);
  for (const r of results) assert.ok(r.passed, `${r.name}: max_abs_err=${r.maxAbsErr} tol=${r.tolerance} ${r.error ?? ''}`);
  const names = results.map((r) => r.name);
  for (const c of ['case1', 'case2']) {
    for (const out of ['resized_image_uint8_hwc', 'input', 'logits', 'alpha', 'alpha_source_size (predict)', 'mask_uint8_model_size', 'mask_uint8_source_size', 'foreground_uint8_hwc']) {
      assert.ok(names.includes(`birefnet/${c} ${out}`), `missing birefnet/${c} ${out} in ${names.join(', ')}`);
    }
  }
});

test('the BiRefNet component yields nothing for a folder without BiRefNet cases', async () => {
  const results: CaseResult[] = [];
  for await (const r of birefnetComponent.run(path.join(GOLDEN, 'birefnet'), { target: cpuTarget() })) results.push(r);
  assert.equal(results.length, 0);
});
