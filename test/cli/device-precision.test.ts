// The device and precision as a user meets them on every command, through the real CLI in a child process:
// $KLEIN_DEVICE is the default --device of serve, worker, mcp and conform as of generate and edit (a bad value
// exits 2 naming the variable); `--precision fast` with a GPU device exits 2 before anything loads or any GPU is
// probed (so this runs on a CPU-only machine); and `klein serve`'s stop line says what happens to the runs, alone
// and scaled out.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { refuseFastOnGpu } from '../../src/cli/target-options.ts';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';
import { startRedis } from '../scale/redis-helper.ts';
import { pipelineCommands, runKlein, startServe, stopProcess, tmpDir, type ServeProcess } from './helpers.ts';

let dir: string;
let model: string;
const children: ChildProcess[] = [];
const WORKER_TOKEN = 'x'.repeat(24);

before(async () => {
  dir = tmpDir('device-precision');
  model = path.join(dir, 'model');
  writeTinyModel(model, { seed: 2 });
  await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 30, g: 200, b: 30 } } }).png().toFile(path.join(dir, 'ref.png'));
});

after(() => {
  for (const p of children) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
  fs.rmSync(dir, { recursive: true, force: true });
});


test('$KLEIN_DEVICE: a bad value exits 2 naming the variable on serve, worker, mcp and conform; each help says it is the default', async () => {
  const golden = path.join(dir, 'empty-golden');
  fs.mkdirSync(golden);
  const cmds = [...pipelineCommands(model, dir).filter((c) => ['serve', 'worker', 'mcp'].includes(c.name)), { name: 'conform', args: ['conform', golden] }];
  for (const c of cmds) {
    const r = await runKlein(c.args, { KLEIN_DEVICE: 'bogus', KLEIN_WORKER_TOKEN: WORKER_TOKEN, KLEIN_PRECISION: '' });
    assert.equal(r.code, 2, `${c.name}: ${r.stderr}`);
    assert.match(r.stderr, /KLEIN_DEVICE: unknown device "bogus"; use one of: cpu, webgpu, cuda, auto/, c.name);
    const help = await runKlein([c.args[0], '--help']);
    assert.match(help.stdout, /--device <device>[^]*default: \$KLEIN_DEVICE,\s+else\s+cpu/, `${c.name} --help`);
  }
  // the flag wins over the variable; the golden folder is empty, so conform gets past the device and finds nothing
  const flag = await runKlein(['conform', golden, '--device', 'cpu'], { KLEIN_DEVICE: 'bogus' });
  assert.equal(flag.code, 1, flag.stderr);
  assert.match(flag.stdout, /no golden case found/);
  const bad = await runKlein(['conform', golden, '--device', 'gpu']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--device: unknown device "gpu"/);
});

/** Starts `klein serve ARGS` on the tiny model; resolves once it listens (and, on a first start, printed its key). */
function serve(args: string[], env: Record<string, string> = {}): Promise<ServeProcess> {
  return startServe(['-m', model, '--port', '0', ...args], { env: { KLEIN_PRECISION: '', KLEIN_GPU_DTYPE: '', ...env }, track: children });
}

const stop = stopProcess;

test('KLEIN_DEVICE=cpu: klein serve runs on the CPU in fast mode, the CPU default, and says so; its stop line says running runs go back to the queue for the next start', async () => {
  const s = await serve(['--data', path.join(dir, 'serve-cpu')], { KLEIN_DEVICE: 'cpu' });
  assert.match(s.out(), /klein serve: \S+ \(fast precision, the CPU default; --precision exact gives the reference numbers\) on cpu \(fast: int8 products, row-outliers activations\) from /);
  assert.equal(await stop(s.proc), 0, s.out());
  assert.match(s.out(), /klein serve: stopping \(running runs stop and go back to the queue for the next start\)/);
});

test('klein serve --queue: the stop line says runs on workers get the drain time to finish before the rest go back to the queue', async () => {
  const redis = await startRedis();
  try {
    const env = { KLEIN_DEVICE: 'cpu', KLEIN_WORKER_TOKEN: WORKER_TOKEN };
    const remoteOnly = await serve(['--data', path.join(dir, 'serve-q0'), '--queue', redis.url, '--workers', '0'], env);
    assert.equal(await stop(remoteOnly.proc), 0, remoteOnly.out());
    assert.match(remoteOnly.out(), /klein serve: stopping \(runs on remote workers get up to 20 s to finish, the rest go back to the queue for the next start\)/);
    // stopped the moment it has started, while its local worker's BullMQ connections may still be opening: a clean
    // stop all the same (test/scale/close-while-starting.test.ts)
    const withLocal = await serve(['--data', path.join(dir, 'serve-q1'), '--queue', redis.url, '--workers', '1'], env);
    assert.equal(await stop(withLocal.proc), 0, withLocal.out());
    assert.match(withLocal.out(), /klein serve: stopping \(local workers finish their current run, runs on remote workers get up to 20 s to finish, /);
  } finally {
    redis.stop();
  }
});

test('--precision fast with a GPU device exits 2 on every pipeline command before any device is probed, naming the flags or the variables', async () => {
  for (const c of pipelineCommands(model, dir)) {
    // webgpu and cuda are unavailable on a CPU-only machine: probing them would fail with another message
    const byFlag = await runKlein([...c.args, '--device', 'webgpu', '--precision', 'fast'], { KLEIN_WORKER_TOKEN: WORKER_TOKEN });
    assert.equal(byFlag.code, 2, `${c.name}: ${byFlag.stderr}`);
    assert.match(byFlag.stderr, /--precision fast cannot run with --device webgpu: fast mode \(int8 products\) runs on the CPU only; use --precision exact on webgpu, or --device cpu/, c.name);
    const byEnv = await runKlein(c.args, { KLEIN_WORKER_TOKEN: WORKER_TOKEN, KLEIN_PRECISION: 'fast', KLEIN_DEVICE: 'cuda' });
    assert.equal(byEnv.code, 2, `${c.name}: ${byEnv.stderr}`);
    assert.match(byEnv.stderr, /--precision fast \(from \$KLEIN_PRECISION\) cannot run with --device cuda \(from \$KLEIN_DEVICE\): fast mode \(int8 products\) runs on the CPU only/, c.name);
  }
});

test('refuseFastOnGpu: auto is judged by the device it chose; the CPU and exact pass', () => {
  assert.throws(() => refuseFastOnGpu('fast', 'webgpu', { precision: 'fast', device: 'auto' }), /--precision fast cannot run with --device auto \(here webgpu\): fast mode \(int8 products\) runs on the CPU only/);
  assert.doesNotThrow(() => refuseFastOnGpu('fast', 'auto', { precision: 'fast', device: 'auto' }), 'auto is judged once resolved');
  assert.doesNotThrow(() => refuseFastOnGpu('fast', 'cpu', { precision: 'fast', device: 'auto' }));
  assert.doesNotThrow(() => refuseFastOnGpu('exact', 'cuda', { device: 'cuda' }));
});
