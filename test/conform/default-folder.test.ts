import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';

const KLEIN = path.resolve(import.meta.dirname, '../../bin/klein.js');

test('klein conform without a folder runs the repository\'s golden vectors, from any working directory', () => {
  const r = spawnSync(process.execPath, [KLEIN, 'conform', '--component', 'sampler'], { cwd: os.tmpdir(), encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr + r.stdout);
  const m = /^(\d+) passed, 0 failed$/m.exec(r.stdout);
  assert.ok(m && Number(m[1]) > 0, r.stdout);
});
