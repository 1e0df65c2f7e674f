// Fast mode on a small FLUX.2 stress model (issue 21: outlier channels ×20–100 in the adaLN scales, heavy-tailed
// SwiGLU products, a context with massive-activation tokens): the row-outliers int8 scheme stays within a stated
// bound of exact mode, and the per-tensor scheme (DynamicQuantizeMatMul) is measurably worse on the same inputs.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Flux2Transformer, type Flux2ForwardInput } from '../../src/models/flux2/runtime.ts';
import { KLEIN_4B, type Flux2Config } from '../../src/models/flux2/config.ts';
import { writeRandomFlux2Checkpoint } from '../../src/fixtures/flux2.ts';
import { MASSIVE_CHANNELS, MASSIVE_FACTOR, outlierChannels, seededRandom } from '../../src/fixtures/stress-outliers.ts';
import { cpuTarget, type ExecutionTarget } from '../../src/runtime/target.ts';
import { relativeError } from '../../src/conform/compare.ts';

const cacheRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-int8-stress-cache-'));
process.env.KLEIN_CACHE_DIR = cacheRoot;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-int8-stress-'));
after(() => {
  fs.rmSync(cacheRoot, { recursive: true, force: true });
  fs.rmSync(dir, { recursive: true, force: true });
});

// real head size (128) and MLP ratio, a sixth of the width: large enough for the stress edits' calibration
const cfg: Flux2Config = { ...KLEIN_4B, hiddenSize: 512, numHeads: 4, contextInDim: 96, depth: 1, depthSingleBlocks: 2 };

/** A 8×8 latent grid and 16 text tokens, the first 3 with the massive channels of the stress text encoder. */
function inputs(): Flux2ForwardInput {
  const [gw, gh, nTxt] = [8, 8, 16];
  const r = seededRandom(21);
  const x = Float32Array.from({ length: gw * gh * cfg.inChannels }, () => r.normal());
  const ctx = Float32Array.from({ length: nTxt * cfg.contextInDim }, () => r.normal() * 0.5);
  const state = cfg.contextInDim / 3;
  for (let t = 0; t < 3; t++) for (let s = 0; s < 3; s++) for (const c of outlierChannels(state, MASSIVE_CHANNELS, 1)) ctx[t * cfg.contextInDim + s * state + c] *= MASSIVE_FACTOR;
  const xIds = new BigInt64Array(gw * gh * 4);
  for (let i = 0; i < gw * gh; i++) [xIds[i * 4 + 1], xIds[i * 4 + 2]] = [BigInt(Math.floor(i / gw)), BigInt(i % gw)];
  const ctxIds = new BigInt64Array(nTxt * 4);
  for (let l = 0; l < nTxt; l++) ctxIds[l * 4 + 3] = BigInt(l);
  return { x, xIds, ctx, ctxIds, timesteps: Float32Array.of(0.9), batch: 1, nTokens: gw * gh, nCtx: nTxt };
}

async function step(file: string, target: ExecutionTarget, inp: Flux2ForwardInput): Promise<Float32Array> {
  const m = await Flux2Transformer.load(file, { target });
  try {
    return await m.forward(inp);
  } finally {
    await m.close();
  }
}

// Bounds: above what row-outliers measures here (1.13 % rms, 6.3 % max of max |exact| with the second pass on the
// unnormalised inputs; 1.40 % / 4.5 % without it: at this sixth of the real width the max moves either way);
// dynamic measured 53 % rms, 109 % max on the same step
const RMS_BOUND = 0.03;
const MAX_BOUND = 0.09;

test('fast mode on the small stress transformer: row-outliers within 3 % rms / 9 % max of exact; dynamic (per tensor) measurably worse', async () => {
  const file = path.join(dir, 'stress.safetensors');
  writeRandomFlux2Checkpoint(file, cfg, { dtype: 'BF16', layout: 'bfl', seed: 1, outliers: true });
  const inp = inputs();
  const exact = await step(file, cpuTarget(), inp);
  const fast = cpuTarget('fast');
  const dynamic = relativeError(await step(file, { ...fast, int8Scheme: 'dynamic' }, inp), exact);
  const rows = relativeError(await step(file, { ...fast, int8Scheme: 'row-outliers' }, inp), exact);
  const pct = (v: number) => `${(v * 100).toFixed(3)} %`;
  console.log(`  stress model, fast vs exact: row-outliers rms ${pct(rows.rms)}, max ${pct(rows.max)}; dynamic rms ${pct(dynamic.rms)}, max ${pct(dynamic.max)}`);
  assert.ok(rows.rms < RMS_BOUND && rows.max < MAX_BOUND, `row-outliers: rms ${rows.rms}, max ${rows.max}`);
  assert.ok(rows.rms > 1e-4, `row-outliers rms ${rows.rms}: the int8 products ran`);
  assert.ok(dynamic.rms > 2 * rows.rms, `dynamic rms ${dynamic.rms} should be more than twice row-outliers' ${rows.rms}`);
});
