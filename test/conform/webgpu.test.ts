// `klein conform --device webgpu` over every golden case, as a user runs it: on a CPU-only machine through Mesa 25's
// lavapipe (scripts/setup-webgpu.sh, which `npm test` sets up first). The transformer's Linears run in fp16 with
// their stated tolerance, everything else in fp32 with the CPU's. Skipped with that reason without a Vulkan driver.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { GOLDEN_DIR } from '../golden.ts';

const KLEIN = path.resolve(import.meta.dirname, '../../bin/klein.js');
const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (npm test does)';

test('klein conform --device webgpu: every golden case of every component passes', { skip: noVulkan }, () => {
  const env = { ...process.env };
  delete env.KLEIN_GPU_DTYPE; // the default dtype: fp16
  const r = spawnSync(process.execPath, [KLEIN, 'conform', GOLDEN_DIR, '--device', 'webgpu'], { encoding: 'utf8', timeout: 20 * 60_000, env });
  assert.equal(r.status, 0, `exit ${r.status} ${r.signal ?? ''}\n${r.stdout.split('\n').filter((l) => !l.startsWith('PASS')).join('\n')}\n${r.stderr}`);
  assert.match(r.stdout, /^device: webgpu \(fp16\)$/m);
  assert.match(r.stdout, /^\d+ passed, 0 failed$/m);
  for (const component of ['tokenizer', 'text_encoder', 'transformer', 'vae', 'sampler', 'pipeline', 'birefnet']) {
    assert.match(r.stdout, new RegExp(`^PASS ${component}/`, 'm'), `no passing ${component} case`);
  }
});
