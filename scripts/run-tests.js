#!/usr/bin/env node
// `npm test`: first sets the machine up (scripts/setup-debian.sh: redis-server, chromium and Mesa's WebGPU driver on
// Debian 12; only checks when they are there), then runs test/**/*.test.ts with node's built-in test runner (through
// tsx), so CI reads its summary. A run of every file type-checks and lints first (`npm run typecheck`, `npm run lint`:
// the import layering and the size rules).
// Arguments filter test files by substring: `npm test -- service`. KLEIN_TEST_SETUP=skip leaves the machine as it is.
// The run gets a KLEIN_CACHE_DIR of its own (see below).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const filters = process.argv.slice(2);

function walk(dir) {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? walk(p) : e.name.endsWith('.test.ts') ? [p] : [];
  });
}

/** The environment after the set-up script's `export` lines (VK_ICD_FILENAMES, LD_LIBRARY_PATH for lavapipe). */
function preparedEnv() {
  if (process.env.KLEIN_TEST_SETUP === 'skip') return process.env;
  const script = 'out="$(scripts/setup-debian.sh)" && eval "$out" && env -0';
  const r = spawnSync('bash', ['-c', script], { cwd: root, stdio: ['inherit', 'pipe', 'inherit'], maxBuffer: 16 << 20 });
  if (r.status !== 0) {
    console.error('npm test: the machine set-up failed (see above); KLEIN_TEST_SETUP=skip runs the tests without it');
    process.exit(1);
  }
  const env = {};
  for (const entry of r.stdout.toString('utf8').split('\0')) {
    const eq = entry.indexOf('=');
    if (eq > 0) env[entry.slice(0, eq)] = entry.slice(eq + 1);
  }
  return env;
}

const files = walk(path.join(root, 'test'))
  .map((f) => path.relative(root, f))
  .filter((f) => filters.length === 0 || filters.some((s) => f.includes(s)))
  .sort();
if (files.length === 0) {
  console.error('no test files matched');
  process.exit(1);
}
const env = preparedEnv();
if (filters.length === 0) {
  for (const check of ['typecheck', 'lint']) {
    const r = spawnSync('npm', ['run', '--silent', check], { cwd: root, stdio: 'inherit', env });
    if (r.status !== 0) {
      console.error(`npm test: npm run ${check} failed (see above); no test was run`);
      process.exit(r.status ?? 1);
    }
  }
}
// Weight stores and compiled graphs of the run's temporary checkpoints go to a cache folder of the run's own, removed
// after it (each store hard-links its checkpoint, so stale folders would keep deleted test models on disk too).
// KLEIN_TEST_SHARED_CACHE_DIR names the user's cache for the few tests that reuse large inputs across runs (the
// bench's random real-width checkpoints).
const sharedCache = env.KLEIN_CACHE_DIR || path.join(os.homedir(), '.cache', 'klein');
const runCache = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-test-cache-'));
// a terminal's Ctrl-C reaches the test process too; the runner outlives it to remove the run's cache
process.on('SIGINT', () => {});
const args = ['--import', 'tsx', '--test', '--test-reporter=spec', `--test-concurrency=${process.env.TEST_CONCURRENCY ?? 1}`, ...files];
const r = spawnSync(process.execPath, args, {
  cwd: root,
  stdio: 'inherit',
  env: { ...env, KLEIN_LOG_LEVEL: env.KLEIN_LOG_LEVEL ?? 'silent', KLEIN_CACHE_DIR: runCache, KLEIN_TEST_SHARED_CACHE_DIR: sharedCache },
});
fs.rmSync(runCache, { recursive: true, force: true });
process.exit(r.status ?? 1);
