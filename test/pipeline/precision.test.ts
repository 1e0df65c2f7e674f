// Both precisions end to end on a tiny model in the official layout: exact and fast each give a real image, fast
// stays close to exact (PSNR bound), contexts of one precision are never served to the other from a shared prompt
// cache, and the CLI and the server take, check and report --precision.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { psnr8 as psnr } from '../../src/conform/compare.ts';
import { KleinPipeline } from '../../src/pipeline/pipeline.ts';
import type { GenerateRequest } from '../../src/pipeline/types.ts';
import { PromptEmbeddingCache } from '../../src/text/prompt-cache.ts';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';
import { runKlein, startServe, stopProcess } from '../cli/helpers.ts';
import { startRedis } from '../scale/redis-helper.ts';
import { cpuTarget } from '../../src/runtime/target.ts';
import { targetFromFlags } from '../../src/cli/target-options.ts';

/**
 * PSNR of the fast image against the exact one (same seed), measured on this tiny model (int8 text encoder and
 * transformer, 96×64, 4 steps): 53.5 dB for seeds 5 and 6; two unrelated images (seeds 5 vs 6) are at 13.7 dB.
 * The bound, 40 dB, allows a 4.7× larger rms pixel error (another CPU's int8 kernels, e.g. AVX2 without VNNI, round
 * differently); a fast mode that goes wrong (a wrong scale, a transposed weight) falls far below it.
 */
const PSNR_BOUND_DB = 40;

let dir: string;
let model: string;
const req: GenerateRequest = { prompt: 'a tiny red fox in the snow', width: 96, height: 64, seed: 5, numImages: 1, outputFormat: 'png' };

async function rgb(png: Uint8Array): Promise<{ data: Buffer; width: number; height: number; channels: number }> {
  const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
  return { data, width: info.width, height: info.height, channels: info.channels };
}


before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-precision-'));
  model = path.join(dir, 'model');
  writeTinyModel(model, { seed: 4 });
});

const servers: ChildProcess[] = [];
after(() => {
  for (const p of servers) if (p.exitCode === null) p.kill('SIGKILL');
  fs.rmSync(dir, { recursive: true, force: true });
});

test('exact and fast both give a decodable image; fast differs from exact but stays above the PSNR bound; a shared prompt cache keeps them apart', async () => {
  const cache = new PromptEmbeddingCache();
  const exact = await KleinPipeline.open({ target: cpuTarget(), model, promptCache: cache });
  const fast = await KleinPipeline.open({ target: cpuTarget('fast'), model, promptCache: cache });
  try {
    assert.equal(exact.target.precision, 'exact');
    assert.equal(fast.target.precision, 'fast');
    assert.equal(fast.componentDtypes().transformer, 'int8', 'fast mode says its Linears are int8');
    const a = await exact.generate(req);
    assert.equal(cache.stats.misses, 1);
    const b = await fast.generate(req);
    // the fast pipeline must encode the prompt itself, not reuse the exact context
    assert.equal(cache.stats.misses, 2, 'a fast request was served an exact prompt context');
    assert.equal(cache.stats.hits, 0);
    const again = await fast.generate(req);
    assert.equal(cache.stats.hits, 1, 'fast contexts are cached for fast requests');
    assert.ok(Buffer.from(again.images[0].data).equals(Buffer.from(b.images[0].data)), 'fast mode is deterministic');

    const ia = await rgb(a.images[0].data);
    const ib = await rgb(b.images[0].data);
    for (const im of [ia, ib]) {
      assert.deepEqual([im.width, im.height, im.channels], [96, 64, 3]);
      assert.ok(new Set(im.data).size > 50, 'a varied image, not a constant one');
    }
    const p = psnr(ia.data, ib.data);
    assert.ok(Number.isFinite(p), 'fast mode gave the exact image: nothing was quantized');
    assert.ok(p > PSNR_BOUND_DB, `PSNR(fast, exact) = ${p.toFixed(2)} dB ≤ ${PSNR_BOUND_DB} dB`);
  } finally {
    await exact.close();
    await fast.close();
  }
});

test('a precision other than exact|fast is refused where the target is resolved', async () => {
  await assert.rejects(targetFromFlags({ precision: 'int4' }), /--precision: unknown precision "int4"; use one of: exact, fast/);
});

test('klein generate --precision fast writes an image and reports the precision; bogus values exit 2', async () => {
  const out = path.join(dir, 'fast.png');
  const r = await runKlein(['generate', 'a fox', '-m', model, '--size', '64x64', '--seed', '1', '--precision', 'fast', '-o', out, '--json', '-q']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout).precision, 'fast');
  assert.equal((await rgb(fs.readFileSync(out))).width, 64);
  const env = await runKlein(['generate', 'a fox', '-m', model, '--size', '64x64', '--seed', '1', '-o', out, '--json', '-q'], { KLEIN_PRECISION: 'fast' });
  assert.equal(env.code, 0, env.stderr);
  assert.equal(JSON.parse(env.stdout).precision, 'fast', '$KLEIN_PRECISION is the default');

  const bogus = await runKlein(['generate', 'a fox', '-m', model, '--precision', 'bogus', '-o', out]);
  assert.equal(bogus.code, 2);
  assert.match(bogus.stderr, /--precision: unknown precision "bogus"; use one of: exact, fast/);
  const bogusEnv = await runKlein(['generate', 'a fox', '-m', model, '-o', out], { KLEIN_PRECISION: 'half' });
  assert.equal(bogusEnv.code, 2);
  assert.match(bogusEnv.stderr, /KLEIN_PRECISION: unknown precision "half"/);
  for (const cmd of [['serve', '--port', '0', '--data', path.join(dir, 'd1')], ['mcp', '--data', path.join(dir, 'd2')], ['worker', '--queue', 'redis://127.0.0.1:1', '--api', 'http://127.0.0.1:1']]) {
    const x = await runKlein([...cmd, '-m', model, '--precision', 'bogus'], { KLEIN_WORKER_TOKEN: 'x'.repeat(24) });
    assert.equal(x.code, 2, `${cmd[0]}: ${x.stderr}`);
    assert.match(x.stderr, /unknown precision "bogus"/, cmd[0]);
  }
});

/** Starts `klein serve` with `args` on the tiny model; resolves with its URL once it listens (fast precision). */
async function serve(args: string[], env: Record<string, string> = {}): Promise<{ proc: ChildProcess; url: string }> {
  const { proc, url, out } = await startServe(['--model', model, '--port', '0', ...args], { env, track: servers });
  assert.match(out(), /\(fast precision\)/);
  return { proc, url };
}

const stop = stopProcess;

test('klein serve --precision fast reports it in /v1/models and /v1/health', async () => {
  const { proc, url } = await serve(['--data', path.join(dir, 'data'), '--precision', 'fast']);
  const models = (await (await fetch(`${url}/v1/models`)).json()) as { data: Array<{ id: string; precision: string }> };
  assert.ok(models.data.length > 0);
  for (const m of models.data) assert.equal(m.precision, 'fast', m.id);
  const health = (await (await fetch(`${url}/v1/health`)).json()) as { precision: string };
  assert.equal(health.precision, 'fast');
  await stop(proc);
});

test('scale-out: a queue worker announces its precision (/v1/health workers[].precision)', async () => {
  const redis = await startRedis();
  try {
    const { proc, url } = await serve(['--data', path.join(dir, 'data-queue'), '--precision', 'fast', '--queue', redis.url, '--workers', '1'], { KLEIN_WORKER_TOKEN: 'precision-test-token-0123456789' });
    let health: { precision: string; workers?: Array<{ precision: string; device: string }> } = { precision: '' };
    for (let i = 0; i < 50 && !health.workers?.length; i++) {
      health = (await (await fetch(`${url}/v1/health`)).json()) as typeof health;
      if (!health.workers?.length) await new Promise((r) => setTimeout(r, 200));
    }
    assert.equal(health.precision, 'fast');
    assert.equal(health.workers?.length, 1, JSON.stringify(health));
    assert.equal(health.workers![0].precision, 'fast');
    await stop(proc);
  } finally {
    redis.stop();
  }
});

test('the CPU default is fast mode: klein generate says so and reports it; --precision exact and $KLEIN_PRECISION=exact give exact; the helps say it; bench and conform stay exact', async () => {
  const out = path.join(dir, 'default.png');
  const args = ['generate', 'a fox', '-m', model, '--size', '64x64', '--seed', '1', '-o', out, '--json'];
  const unset = { KLEIN_PRECISION: undefined, KLEIN_DEVICE: undefined };
  const byDefault = await runKlein(args, unset);
  assert.equal(byDefault.code, 0, byDefault.stderr);
  assert.equal(JSON.parse(byDefault.stdout).precision, 'fast');
  assert.match(byDefault.stderr, /klein: fast precision on cpu \(fast: int8 products, row-outliers activations\), the CPU default; --precision exact gives the reference numbers/);
  const fastImage = await rgb(fs.readFileSync(out));
  const exact = await runKlein([...args, '--precision', 'exact'], unset);
  assert.equal(exact.code, 0, exact.stderr);
  assert.equal(JSON.parse(exact.stdout).precision, 'exact');
  assert.doesNotMatch(exact.stderr, /CPU default/);
  const p = psnr(fastImage.data, (await rgb(fs.readFileSync(out))).data);
  assert.ok(Number.isFinite(p) && p > PSNR_BOUND_DB, `the default (fast) and exact images: PSNR ${p}`);
  const byEnv = await runKlein(args, { ...unset, KLEIN_PRECISION: 'exact' });
  assert.equal(JSON.parse(byEnv.stdout).precision, 'exact', '$KLEIN_PRECISION=exact');
  const asked = await runKlein([...args, '--precision', 'fast'], unset);
  assert.doesNotMatch(asked.stderr, /CPU default/, 'no note when fast mode was asked for');
  for (const cmd of ['generate', 'edit', 'serve', 'worker', 'mcp']) {
    const help = await runKlein([cmd, '--help']);
    assert.match(help.stdout.replace(/\s+/g, ' '), /default: \$KLEIN_PRECISION, else fast on the CPU and exact on GPUs/, `${cmd} --help`);
  }
  await withEnv({ KLEIN_PRECISION: undefined }, async () => {
    assert.equal((await targetFromFlags({ device: 'cpu' })).precision, 'exact', 'bench and conform: exact unless asked');
    assert.equal((await targetFromFlags({ device: 'cpu' }, { cpuPrecision: 'fast' })).precision, 'fast');
  });
});

/** Runs `fn` with the variables set (undefined: unset), restoring them after. */
async function withEnv(vars: Record<string, string | undefined>, fn: () => Promise<void>): Promise<void> {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
  for (const [k, v] of Object.entries(vars)) if (v === undefined) delete process.env[k]; else process.env[k] = v;
  try {
    await fn();
  } finally {
    for (const [k, v] of Object.entries(saved)) if (v === undefined) delete process.env[k]; else process.env[k] = v;
  }
}
