// `--gpu-dtype` as a user meets it: every command that opens a pipeline refuses an unknown dtype and fp16 on the
// CPU (exit 2, before anything loads); on WebGPU (Mesa lavapipe on a CPU-only machine, see
// scripts/setup-webgpu.sh) a tiny-model image in fp32 and in fp16 are both real PNGs, fp32 matches the CPU and fp16
// is close to fp32 but not equal to it, and `klein serve` / its queue workers report the dtype. The WebGPU tests are
// skipped with that reason when VK_ICD_FILENAMES is unset.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { psnr8 } from '../../src/conform/compare.ts';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';
import { startRedis } from '../scale/redis-helper.ts';
import { pipelineCommands, runKlein, startServe, stopProcess, tmpDir } from './helpers.ts';

const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (CI does)';

/**
 * fp16 vs fp32 on WebGPU, this tiny model, 64×64, 4 steps, seed 7 (text encoder, transformer and VAE decoder in
 * fp16): 48.0 dB, max |Δ| 6 of 255; fp32 vs the CPU: 86 dB, max |Δ| 1. Unrelated images are ~14 dB apart. 35 dB
 * allows a 4.5× larger rms error than measured (another adapter's fp16 kernels), while an fp16 path that went
 * wrong (a wrong cast, a clamped activation) falls far below it.
 */
const FP16_PSNR_BOUND_DB = 35;

let dir: string;
let model: string;
const children: ChildProcess[] = [];

before(() => {
  dir = tmpDir('gpu-dtype');
  model = path.join(dir, 'model');
  writeTinyModel(model, { seed: 2 });
});

after(() => {
  for (const p of children) if (p.exitCode === null) p.kill('SIGKILL');
  fs.rmSync(dir, { recursive: true, force: true });
});

async function rgb(file: string): Promise<{ data: Buffer; width: number; height: number; format?: string }> {
  const meta = await sharp(file).metadata();
  const { data, info } = await sharp(file).raw().toBuffer({ resolveWithObject: true });
  return { data, width: info.width, height: info.height, format: meta.format };
}

function maxAbsDiff(a: Buffer, b: Buffer): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** Each command that opens a pipeline, with what it needs to get as far as the dtype check. */
function commands(): Array<{ name: string; args: string[] }> {
  return [...pipelineCommands(model, dir), { name: 'bench pipeline', args: ['bench', 'pipeline', '--model', model, '--size', '64x64'] }];
}

test('--gpu-dtype: an unknown dtype, and fp16 with the CPU, exit 2 with a message on every command; fp32 with the CPU is fine', async () => {
  await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 200, g: 30, b: 30 } } }).png().toFile(path.join(dir, 'ref.png'));
  const env = { KLEIN_WORKER_TOKEN: 'x'.repeat(24) };
  for (const c of commands()) {
    const bad = await runKlein([...c.args, '--device', 'cpu', '--gpu-dtype', 'bf16'], env);
    assert.equal(bad.code, 2, `${c.name}: ${bad.stderr}`);
    assert.match(bad.stderr, /--gpu-dtype: unknown GPU dtype "bf16"; use one of: fp32, fp16/, c.name);
    const cpu16 = await runKlein([...c.args, '--device', 'cpu', '--gpu-dtype', 'fp16'], env);
    assert.equal(cpu16.code, 2, `${c.name}: ${cpu16.stderr}`);
    assert.match(cpu16.stderr, /--gpu-dtype fp16: fp16 compute needs a GPU device \(--device webgpu or cuda\)/, c.name);
    const help = await runKlein([...c.args.slice(0, c.name === 'bench pipeline' ? 2 : 1), '--help']);
    assert.match(help.stdout, /--gpu-dtype <dtype>/, `${c.name} --help`);
  }
  // $KLEIN_GPU_DTYPE is about GPUs: the CPU ignores it; the flag's fp32 is what the CPU computes in anyway
  const out = path.join(dir, 'cpu32.png');
  const r = await runKlein(['generate', 'a fox', '-m', model, '--size', '64x64', '--seed', '1', '--device', 'cpu', '--gpu-dtype', 'fp32', '-o', out, '--json', '-q'], { KLEIN_GPU_DTYPE: 'fp16' });
  assert.equal(r.code, 0, r.stderr);
  const rep = JSON.parse(r.stdout) as { device: string; gpu_dtype?: string };
  assert.equal(rep.device, 'cpu');
  assert.equal(rep.gpu_dtype, undefined, 'no GPU dtype is reported on the CPU');
  assert.equal((await rgb(out)).format, 'png');
});

test('webgpu: klein generate --gpu-dtype fp32 matches the CPU, fp16 differs from it only slightly', { skip: noVulkan }, async () => {
  const run = async (extra: string[], name: string, env: Record<string, string> = {}) => {
    const out = path.join(dir, `${name}.png`);
    const r = await runKlein(['generate', 'a red fox', '-m', model, '-W', '64', '-H', '64', '--seed', '7', ...extra, '-o', out, '--json', '-q'], env);
    assert.equal(r.code, 0, `${name}: ${r.stderr}`);
    return { rep: JSON.parse(r.stdout) as { device: string; gpu_dtype?: string; component_dtypes?: Record<string, string> }, img: await rgb(out) };
  };
  const cpu = await run(['--device', 'cpu'], 'cpu');
  const f32 = await run(['--device', 'webgpu', '--gpu-dtype', 'fp32'], 'webgpu-fp32');
  // fp16 from the default ($KLEIN_GPU_DTYPE unset means fp16 on a GPU)
  const f16 = await run(['--device', 'webgpu'], 'webgpu-fp16', { KLEIN_GPU_DTYPE: '' });
  for (const [x, dtype] of [[f32, 'fp32'], [f16, 'fp16']] as const) {
    assert.equal(x.rep.device, 'webgpu');
    assert.equal(x.rep.gpu_dtype, dtype);
    // the text encoder and the transformer compute in the dtype asked for; the VAE in fp32 whatever it says
    assert.equal(x.rep.component_dtypes?.transformer, dtype);
    assert.equal(x.rep.component_dtypes?.['text-encoder'], dtype);
    assert.equal(x.rep.component_dtypes?.['vae-decoder'], 'fp32');
    assert.deepEqual([x.img.width, x.img.height, x.img.format], [64, 64, 'png']);
    assert.ok(new Set(x.img.data).size > 50, 'a varied image, not a constant one');
  }
  assert.ok(maxAbsDiff(f32.img.data, cpu.img.data) <= 2, `webgpu fp32 vs cpu: max |Δ| ${maxAbsDiff(f32.img.data, cpu.img.data)}`);
  assert.ok(!f16.img.data.equals(f32.img.data), 'fp16 gave the fp32 image: the dtype did not reach the models');
  const p = psnr8(f16.img.data, f32.img.data);
  assert.ok(p > FP16_PSNR_BOUND_DB, `PSNR(fp16, fp32) = ${p.toFixed(2)} dB ≤ ${FP16_PSNR_BOUND_DB} dB`);

  const badEnv = await runKlein(['generate', 'a fox', '-m', model, '--size', '64x64', '--device', 'webgpu', '-o', path.join(dir, 'x.png')], { KLEIN_GPU_DTYPE: 'half' });
  assert.equal(badEnv.code, 2);
  assert.match(badEnv.stderr, /KLEIN_GPU_DTYPE: unknown GPU dtype "half"/);
});

/** Starts `klein serve` on the tiny model; resolves with its URL and its start lines once it listens. */
async function serve(args: string[], env: Record<string, string> = {}): Promise<{ proc: ChildProcess; url: string; out: string }> {
  const { proc, url, out } = await startServe(['--model', model, '--port', '0', ...args], { env, track: children });
  return { proc, url, out: out() };
}

const stop = stopProcess;

type Health = { precision: string; gpu_dtype?: string; workers?: Array<{ device: string; gpu_dtype?: string }> };

test('klein serve on the CPU reports no GPU dtype', async () => {
  const { proc, url, out } = await serve(['--data', path.join(dir, 'cpu-data'), '--device', 'cpu', '--precision', 'exact']);
  assert.match(out, /\(exact precision\) on cpu from/);
  const health = (await (await fetch(`${url}/v1/health`)).json()) as Health;
  assert.equal(health.gpu_dtype, undefined);
  await stop(proc);
});

test('webgpu: klein serve --gpu-dtype says it at start and in /v1/health; a queue worker announces it', { skip: noVulkan }, async () => {
  const one = await serve(['--data', path.join(dir, 'gpu-data'), '--device', 'webgpu', '--gpu-dtype', 'fp32']);
  assert.match(one.out, /\(exact precision\) on webgpu in fp32 from/);
  assert.equal(((await (await fetch(`${one.url}/v1/health`)).json()) as Health).gpu_dtype, 'fp32');
  await stop(one.proc);

  const redis = await startRedis();
  try {
    const { proc, url } = await serve(['--data', path.join(dir, 'gpu-queue'), '--device', 'webgpu', '--queue', redis.url, '--workers', '1'], { KLEIN_WORKER_TOKEN: 'gpu-dtype-test-token-0123456789', KLEIN_GPU_DTYPE: 'fp16' });
    let health: Health = { precision: '' };
    for (let i = 0; i < 50 && !health.workers?.length; i++) {
      health = (await (await fetch(`${url}/v1/health`)).json()) as Health;
      if (!health.workers?.length) await new Promise((r) => setTimeout(r, 200));
    }
    assert.equal(health.gpu_dtype, 'fp16', '$KLEIN_GPU_DTYPE is the default');
    assert.deepEqual(health.workers?.map((w) => [w.device, w.gpu_dtype]), [['webgpu', 'fp16']], JSON.stringify(health));
    await stop(proc);
  } finally {
    redis.stop();
  }
});
