// glibc's malloc tunables for engine processes (runtime/malloc-env.ts): merged into the environment without losing
// the user's own entries, and in force in the process that runs `klein bench pipeline` (it re-executes itself once),
// unless KLEIN_MALLOC_TUNABLES=0. Exit codes pass through the re-execution.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';
import { engineProcessEnv, hasEngineTunables, mallocTunablesApply } from '../../src/runtime/malloc-env.ts';
import { runKlein, tmpDir } from './helpers.ts';

const noGlibc = mallocTunablesApply({}) ? false : 'not Linux with glibc ≥ 2.35: the tunables do not apply';
let dir: string;
let model: string;
before(() => {
  dir = tmpDir('malloc');
  model = path.join(dir, 'model');
  writeTinyModel(model, { seed: 3 });
});
after(() => fs.rmSync(dir, { recursive: true, force: true }));

test('engineProcessEnv adds the tunables once and keeps the user\'s entries (theirs win)', { skip: noGlibc }, () => {
  const plain = engineProcessEnv({ PATH: '/bin' });
  assert.equal(plain.GLIBC_TUNABLES, 'glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576');
  assert.equal(plain.PATH, '/bin');
  assert.ok(hasEngineTunables(plain) && !hasEngineTunables({}));
  const user = engineProcessEnv({ GLIBC_TUNABLES: 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0' });
  assert.equal(user.GLIBC_TUNABLES, 'glibc.malloc.hugetlb=0:glibc.malloc.mmap_threshold=1048576:glibc.malloc.arena_max=2');
  assert.deepEqual(engineProcessEnv(plain), plain, 'adding them again changes nothing');
  assert.deepEqual(engineProcessEnv({ KLEIN_MALLOC_TUNABLES: '0' }), { KLEIN_MALLOC_TUNABLES: '0' }, 'turned off: the environment as given');
});

test('klein bench pipeline runs with the tunables in force; KLEIN_MALLOC_TUNABLES=0 runs without; exit codes pass through', { skip: noGlibc, timeout: 120_000 }, async () => {
  const args = ['bench', 'pipeline', '--model', model, '--size', '64x64'];
  const on = await runKlein(args, { GLIBC_TUNABLES: 'glibc.malloc.arena_max=2' });
  assert.equal(on.code, 0, on.stderr);
  assert.match(on.stdout, /GLIBC_TUNABLES glibc\.malloc\.hugetlb=1:glibc\.malloc\.mmap_threshold=1048576:glibc\.malloc\.arena_max=2\n/);
  assert.match(on.stdout, /^seconds: \d/m);
  const off = await runKlein(args, { KLEIN_MALLOC_TUNABLES: '0', GLIBC_TUNABLES: '' });
  assert.equal(off.code, 0, off.stderr);
  assert.match(off.stdout, /GLIBC_TUNABLES \(none\)\n/);
  const bad = await runKlein(['bench', 'pipeline', '--model', model, '--size', '65x64']);
  assert.equal(bad.code, 2, 'a usage error exits 2 through the re-execution');
  assert.match(bad.stderr, /klein: .*multiple/);
});
