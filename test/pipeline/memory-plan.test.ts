// Memory is planned, never discovered: the residency planner's choices on synthetic needs, the needs of the real
// klein 4B shapes (what this machine type can and cannot run), and the refusal path end to end through the CLI —
// a request that cannot fit the memory limit exits 2 with the message before any weight is read.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { GiB, HEADROOM, InsufficientMemoryError, machineMemory, parseMemorySize, planResidency, type ComponentNeed } from '../../src/runtime/memory-plan.ts';
import { cpuTarget } from '../../src/runtime/target.ts';
import { KLEIN_4B } from '../../src/models/flux2/config.ts';
import { transformerNeed } from '../../src/pipeline/memory-needs.ts';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';
import { runKlein, tmpDir } from '../cli/helpers.ts';

const need = (name: string, fileGiB: number, anonGiB: number): ComponentNeed => ({ name, fileBacked: fileGiB * GiB, anon: anonGiB * GiB });
const machine = (gib: number) => ({ available: gib * GiB, source: 'test' });
const needs = [need('text encoder', 10, 1), need('transformer', 14, 2), need('VAE decoder', 0.3, 4)];

test('planResidency: everything resident when it fits, one at a time when only the largest fits, refused otherwise', () => {
  const all = planResidency(needs, machine(40), 'auto', '');
  assert.equal(all.keepLoaded, true);
  assert.equal(all.peak, 31.3 * GiB);
  const turns = planResidency(needs, machine(24), 'auto', '');
  assert.equal(turns.keepLoaded, false);
  assert.equal(turns.peak, 16 * GiB, 'the transformer, the largest component, sets the peak');
  assert.equal(turns.peakAnon, 4 * GiB);
  assert.equal(planResidency(needs, machine(40), false, '').keepLoaded, false, 'false never keeps them');
  assert.throws(
    () => planResidency(needs, machine(24), true, 'use --precision fast'),
    (e: unknown) => e instanceof InsufficientMemoryError && e.code === 'insufficient_memory' && /keeping every component loaded needs 31\.3 GiB .* 24\.0 GiB is available \(test\).* drop --keep-loaded .* or use --precision fast/.test(e.message),
  );
  assert.throws(
    () => planResidency(needs, machine(16), 'auto', 'use --precision fast or a smaller size'),
    (e: unknown) => e instanceof InsufficientMemoryError && e.needed === 16 * GiB && /this request needs 16\.0 GiB for the transformer \(14\.0 GiB of weights mapped from disk \+ 2\.0 GiB of activations\), but 16\.0 GiB is available \(test\) and klein keeps 1\.5 GiB free: use --precision fast or a smaller size/.test(e.message),
  );
  // the headroom is what separates "fits" from "refused"
  assert.equal(planResidency(needs, { available: 16 * GiB + HEADROOM, source: 't' }, 'auto', '').keepLoaded, false);
});

test('the real klein 4B transformer: exact fp32 maps 14.4 GiB of weights, fast packs ~4.1 GiB, activations grow with the tokens', () => {
  const tokens = (px: number) => (px / 16) ** 2 + 512;
  const exact = transformerNeed(KLEIN_4B, cpuTarget('exact'), 1, tokens(512));
  assert.ok(Math.abs(exact.fileBacked / GiB - 14.44) < 0.01, `${exact.fileBacked / GiB}`);
  const fast = transformerNeed(KLEIN_4B, cpuTarget('fast'), 1, tokens(512));
  assert.equal(fast.fileBacked, 0);
  assert.ok(fast.anon / GiB > 3.5 && fast.anon / GiB < 5, `${fast.anon / GiB}`);
  const big = transformerNeed(KLEIN_4B, cpuTarget('exact'), 1, tokens(2048));
  assert.equal(big.fileBacked, exact.fileBacked);
  assert.ok(big.anon > 10 * exact.anon, 'activations scale with the 16.5× more tokens of 2048²');
  assert.doesNotThrow(() => planResidency([exact], machine(23.4), 'auto', ''), 'exact 512² fits this machine type');
});

test('memory sizes and what the machine reports', () => {
  assert.equal(parseMemorySize('16G'), 16 * GiB);
  assert.equal(parseMemorySize('512m'), 512 * 2 ** 20);
  assert.equal(parseMemorySize('1.5GiB'), 1.5 * GiB);
  assert.equal(parseMemorySize('1e9'), 1e9);
  assert.throws(() => parseMemorySize('lots', 'KLEIN_MEMORY_LIMIT'), /KLEIN_MEMORY_LIMIT: "lots" is not a memory size/);
  const m = machineMemory();
  assert.ok(m.available > 0 && m.available < 2 ** 50, `${m.available} from ${m.source}`);
  assert.deepEqual(machineMemory(3 * GiB), { available: 3 * GiB, source: 'the configured memory limit' });
});

let dir: string;
let model: string;
before(() => {
  dir = tmpDir('memory-plan');
  model = path.join(dir, 'model');
  writeTinyModel(model, { seed: 3 });
});
after(() => fs.rmSync(dir, { recursive: true, force: true }));

test('klein generate: a request that cannot fit --memory-limit exits 2 with the plan, before any weight is read', async () => {
  const cache = path.join(dir, 'cache');
  const out = path.join(dir, 'x.png');
  const args = ['generate', 'a fox', '-m', model, '--size', '64x64', '--seed', '1', '--memory-limit', '1G', '-o', out];
  const r = await runKlein([...args, '--precision', 'exact'], { KLEIN_CACHE_DIR: cache });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /klein: this request needs [0-9.]+ GiB for the [a-zA-Z ]+ \(.*\), but 1\.0 GiB is available \(the configured memory limit\) and klein keeps 1\.5 GiB free: use --precision fast/);
  // fast mode (the CPU default) has no lighter precision to offer
  const byDefault = await runKlein(args, { KLEIN_CACHE_DIR: cache, KLEIN_PRECISION: undefined });
  assert.equal(byDefault.code, 2, byDefault.stderr);
  assert.match(byDefault.stderr, /klein: this request needs [0-9.]+ GiB .*but 1\.0 GiB is available \(the configured memory limit\) and klein keeps 1\.5 GiB free: use a smaller size or fewer images/);
  assert.ok(!fs.existsSync(path.join(cache, 'weights')), 'no weight store was built: nothing was read or converted');
  assert.ok(!fs.existsSync(out));
  const env = await runKlein(['generate', 'a fox', '-m', model, '--size', '64x64', '--seed', '1', '-o', out], { KLEIN_CACHE_DIR: cache, KLEIN_MEMORY_LIMIT: 'lots' });
  assert.equal(env.code, 2);
  assert.match(env.stderr, /KLEIN_MEMORY_LIMIT: "lots" is not a memory size/);
  const ok = await runKlein(['generate', 'a fox', '-m', model, '--size', '64x64', '--seed', '1', '--memory-limit', '8G', '-o', out, '-q'], { KLEIN_CACHE_DIR: cache });
  assert.equal(ok.code, 0, ok.stderr);
  assert.ok(fs.existsSync(out));
});
