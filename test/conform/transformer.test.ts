import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { cpuTarget } from '../../src/runtime/target.ts';
import { transformerComponent } from '../../src/conform/transformer.ts';
import type { CaseResult } from '../../src/conform/types.ts';
import { SafetensorsFile, readRaw, writeSafetensors, type TensorToWrite } from '../../src/weights/safetensors.ts';
import { GOLDEN_DIR as GOLDEN } from '../golden.ts';

const root = path.resolve(import.meta.dirname, '../..');

async function collect(dir: string): Promise<CaseResult[]> {
  const out: CaseResult[] = [];
  for await (const r of transformerComponent.run(dir, { target: cpuTarget() })) out.push(r);
  return out;
}

/** A copy of golden/transformer (files hard-linked or copied) that a test may add to. */
function goldenCopy(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-conform-tf-'));
  const src = path.join(GOLDEN, 'transformer');
  fs.cpSync(src, path.join(dir, 'transformer'), { recursive: true });
  fs.chmodSync(path.join(dir, 'transformer'), 0o755);
  return dir;
}

test('klein conform --component transformer passes every golden case in both key layouts', () => {
  const r = spawnSync(process.execPath, [path.join(root, 'bin/klein.js'), 'conform', GOLDEN, '--component', 'transformer'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  const lines = r.stdout.trim().split('\n');
  const cases = fs.readdirSync(path.join(GOLDEN, 'transformer')).filter((f) => /^case\d+\.safetensors$/.test(f));
  for (const c of cases) {
    for (const layout of ['bfl', 'diffusers']) {
      assert.ok(lines.some((l) => l.startsWith(`PASS transformer/${c.replace('.safetensors', '')} (${layout}) output `)), `${c} ${layout}: ${r.stdout}`);
    }
  }
  // each line carries the numbers: max abs error within the tolerance
  for (const l of lines.filter((x) => x.startsWith('PASS'))) {
    const m = /max_abs_err=(\S+) tol=(\S+)/.exec(l);
    assert.ok(m && Number(m[1]) <= Number(m[2]), l);
  }
  assert.match(lines.at(-1)!, /^\d+ passed, 0 failed$/);
  assert.equal(Number(lines.at(-1)!.split(' ')[0]), lines.filter((l) => l.startsWith('PASS')).length);
});

test('a new case file is picked up without code changes, and a wrong output fails', async () => {
  const dir = goldenCopy();
  const tdir = path.join(dir, 'transformer');
  // case10: case1's inputs with its output perturbed beyond the tolerance; case11: case4 renamed (must pass)
  const src = new SafetensorsFile(path.join(tdir, 'case1.safetensors'));
  const tensors: Record<string, TensorToWrite> = {};
  for (const name of src.names) {
    const info = src.info(name);
    const raw = new Uint8Array(readRaw(info));
    const data = info.dtype === 'I64' ? new BigInt64Array(raw.buffer) : new Float32Array(raw.buffer);
    if (name === 'output') (data as Float32Array)[5] += 0.01;
    tensors[name] = { dtype: info.dtype, shape: info.shape, data };
  }
  writeSafetensors(path.join(tdir, 'case10.safetensors'), tensors);
  fs.copyFileSync(path.join(tdir, 'case4.safetensors'), path.join(tdir, 'case11.safetensors'));
  const results = await collect(dir);
  const byName = new Map(results.map((r) => [r.name, r]));
  for (const layout of ['bfl', 'diffusers']) {
    const bad = byName.get(`transformer/case10 (${layout}) output`);
    assert.ok(bad, [...byName.keys()].join('\n'));
    assert.equal(bad.passed, false);
    assert.ok(bad.maxAbsErr > 0.009 && bad.maxAbsErr < 0.011, `error ${bad.maxAbsErr}`);
    assert.equal(byName.get(`transformer/case11 (${layout}) output`)?.passed, true);
  }
  // natural order: case2 before case10
  const names = results.map((r) => r.name);
  assert.ok(names.indexOf('transformer/case2 (bfl) output') < names.indexOf('transformer/case10 (bfl) output'));
});

test('without the diffusers folder only the BFL layout runs; without weights every case fails with a reason', async () => {
  const dir = goldenCopy();
  fs.rmSync(path.join(dir, 'transformer', 'diffusers'), { recursive: true });
  const results = await collect(dir);
  assert.ok(results.length > 0 && results.every((r) => r.passed && r.name.includes('(bfl)')));
  fs.rmSync(path.join(dir, 'transformer', 'model.safetensors'));
  const none = await collect(dir);
  assert.equal(none.length, 1);
  assert.equal(none[0].passed, false);
  assert.match(none[0].error ?? '', /no model\.safetensors/);
  // no case files: nothing to report (the CLI then fails with "no golden case found")
  const empty = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-conform-empty-'));
  assert.deepEqual(await collect(empty), []);
});
