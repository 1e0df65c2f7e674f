// LoRAs applied by the transformer as side products (models/flux2/lora/apply.ts), checked against the reference the
// issue names: a checkpoint whose weights were merged as W + s·(alpha/rank)·B·A and written as a new safetensors
// (fp32, so the only differences are fp32 rounding of the two association orders). Also: no LoRA or scale 0 runs
// the base sessions bit for bit, switching sets changes nothing but the feeds, several LoRAs stack, and fast mode
// keeps the side product in fp32 beside its int8 products; on WebGPU (lavapipe here) a step uploads x and t only.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Flux2Config } from '../../src/models/flux2/config.ts';
import { Flux2Transformer, type Flux2ForwardInput } from '../../src/models/flux2/runtime.ts';
import { writeRandomFlux2Checkpoint } from '../../src/fixtures/flux2.ts';
import { loadLora, type AppliedLora } from '../../src/models/flux2/lora/load.ts';
import { mergeLorasIntoCheckpoint } from '../../src/models/flux2/lora/merge.ts';
import { TINY_LORA_FORMATS, writeTinyLora } from '../../src/fixtures/lora.ts';
import { cpuTarget, type ExecutionTarget } from '../../src/runtime/target.ts';

const CFG: Flux2Config = { inChannels: 16, contextInDim: 24, hiddenSize: 64, numHeads: 2, depth: 2, depthSingleBlocks: 2, axesDim: [8, 8, 8, 8], theta: 2000, mlpRatio: 3, useGuidanceEmbed: false };
/** |LoRA − merged| / max|merged| over the velocity; measured 2–5e-7 (fp32 rounding of (x·Aᵀ)·Bᵀ vs x·(W + BA)ᵀ). */
const MERGE_TOL = 1e-5;
const SCALE = 0.7;

let dir: string;
const cacheBefore = process.env.KLEIN_CACHE_DIR;
const base: Record<'bfl' | 'diffusers', string> = { bfl: '', diffusers: '' };
let inp: Flux2ForwardInput;

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-lora-apply-'));
  process.env.KLEIN_CACHE_DIR = path.join(dir, 'cache');
  for (const layout of ['bfl', 'diffusers'] as const) {
    base[layout] = path.join(dir, `base-${layout}.safetensors`);
    writeRandomFlux2Checkpoint(base[layout], CFG, { layout, seed: 5, dtype: 'BF16' });
  }
  let s = 1;
  const rnd = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
  const N = 16;
  const L = 8;
  const xIds = new BigInt64Array(N * 4);
  for (let i = 0; i < N; i++) xIds.set([0n, BigInt(i >> 2), BigInt(i & 3), 0n], i * 4);
  const ctxIds = new BigInt64Array(L * 4);
  for (let l = 0; l < L; l++) ctxIds[l * 4 + 3] = BigInt(l);
  inp = { x: Float32Array.from({ length: N * CFG.inChannels }, rnd), xIds, timesteps: Float32Array.of(0.7), ctx: Float32Array.from({ length: L * CFG.contextInDim }, rnd), ctxIds, batch: 1, nTokens: N, nCtx: L };
});

after(() => {
  if (cacheBefore === undefined) delete process.env.KLEIN_CACHE_DIR;
  else process.env.KLEIN_CACHE_DIR = cacheBefore;
  fs.rmSync(dir, { recursive: true, force: true });
});

function relErr(a: Float32Array, ref: Float32Array): number {
  assert.equal(a.length, ref.length);
  let d = 0;
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    d = Math.max(d, Math.abs(a[i] - ref[i]));
    m = Math.max(m, Math.abs(ref[i]));
  }
  return d / m;
}

function lora(format: (typeof TINY_LORA_FORMATS)[number], seed = 3): AppliedLora['lora'] {
  const file = path.join(dir, `${format}-${seed}.safetensors`);
  if (!fs.existsSync(file)) writeTinyLora(file, format, CFG, { seed });
  return loadLora(file, CFG);
}

/** The velocity of a checkpoint with `applied` merged into its weights (fp32). */
async function mergedForward(layout: 'bfl' | 'diffusers', applied: AppliedLora[], name: string): Promise<Float32Array> {
  const file = path.join(dir, `merged-${name}.safetensors`);
  mergeLorasIntoCheckpoint(base[layout], applied, file, { dtype: 'F32' });
  const m = await Flux2Transformer.load(file, { target: cpuTarget() });
  try {
    return await m.forward(inp);
  } finally {
    await m.close();
  }
}

test('every LoRA format at scale 0.7 equals its merged checkpoint; no LoRA and scale 0 reproduce the base bit for bit', async () => {
  const m = await Flux2Transformer.load(base.bfl, { target: cpuTarget() });
  try {
    const plain = await m.forward(inp);
    for (const format of TINY_LORA_FORMATS) {
      const applied = [{ lora: lora(format), scale: SCALE }];
      await m.setLoras(applied);
      assert.ok(m.lorasActive);
      const withLora = await m.forward(inp);
      const e = relErr(withLora, await mergedForward('bfl', applied, format));
      assert.ok(e < MERGE_TOL, `${format}: LoRA vs merged ${e}`);
      // the LoRA does something: far beyond rounding
      assert.ok(relErr(withLora, plain) > 0.05, `${format}: the LoRA changed nothing`);
      await m.setLoras([{ lora: lora(format), scale: 0 }]);
      assert.ok(!m.lorasActive);
      assert.deepEqual(await m.forward(inp), plain, `${format} at scale 0`);
    }
    await m.setLoras([]);
    assert.deepEqual(await m.forward(inp), plain);
  } finally {
    await m.close();
  }
});

test('switching sets changes only the feeds: A, B, A again and none give the same bits as before; three LoRAs stack like their merge', async () => {
  const m = await Flux2Transformer.load(base.bfl, { target: cpuTarget() });
  try {
    const plain = await m.forward(inp);
    const a = [{ lora: lora('kohya'), scale: 1 }];
    const b = [{ lora: lora('diffusers'), scale: -0.5 }];
    await m.setLoras(a);
    const outA = await m.forward(inp);
    await m.setLoras(b);
    const outB = await m.forward(inp);
    // a context prepared under a set keeps it, whatever is set afterwards
    await m.setLoras(a);
    const ctxA = await m.prepareContext(inp);
    await m.setLoras([]);
    const stepA = await m.step(inp, ctxA);
    ctxA.dispose();
    assert.deepEqual(stepA, outA);
    await m.setLoras(a);
    assert.deepEqual(await m.forward(inp), outA);
    await m.setLoras([]);
    assert.deepEqual(await m.forward(inp), plain);
    assert.ok(relErr(outA, outB) > 0.05);
    // three at once, one of them the same file twice at other scales: concatenated along the rank
    const three = [{ lora: lora('ai-toolkit'), scale: 0.8 }, { lora: lora('onetrainer'), scale: 0.6 }, { lora: lora('ai-toolkit'), scale: -0.3 }];
    await m.setLoras(three);
    const e = relErr(await m.forward(inp), await mergedForward('bfl', three, 'three'));
    assert.ok(e < MERGE_TOL, `three LoRAs vs merged ${e}`);
  } finally {
    await m.close();
  }
});

test('a diffusers-layout base checkpoint takes BFL- and diffusers-named LoRAs alike', async () => {
  const m = await Flux2Transformer.load(base.diffusers, { target: cpuTarget() });
  try {
    for (const format of ['peft', 'diffsynth'] as const) {
      const applied = [{ lora: lora(format), scale: SCALE }];
      await m.setLoras(applied);
      const e = relErr(await m.forward(inp), await mergedForward('diffusers', applied, `diffusers-${format}`));
      assert.ok(e < MERGE_TOL, `${format} on a diffusers checkpoint: ${e}`);
    }
  } finally {
    await m.close();
  }
});

test('fast mode: the side product stays fp32 beside the int8 products (error vs exact no worse than without LoRA)', async () => {
  const applied = [{ lora: lora('kohya'), scale: 1 }];
  const run = async (precision: 'exact' | 'fast', loras: AppliedLora[]) => {
    const m = await Flux2Transformer.load(base.bfl, { target: cpuTarget(precision) });
    try {
      assert.equal(m.computeDtype, precision === 'fast' ? 'int8' : 'fp32');
      await m.setLoras(loras);
      return await m.forward(inp);
    } finally {
      await m.close();
    }
  };
  const baseErr = relErr(await run('fast', []), await run('exact', []));
  const loraErr = relErr(await run('fast', applied), await run('exact', applied));
  assert.ok(baseErr > 0 && baseErr < 0.1, `fast vs exact without LoRA ${baseErr}`);
  assert.ok(loraErr < 2 * baseErr, `fast vs exact with a LoRA ${loraErr} (without: ${baseErr})`);
});

const noVulkan = process.env.VK_ICD_FILENAMES ? false : 'VK_ICD_FILENAMES is unset: run `eval "$(scripts/setup-webgpu.sh)"` first (CI does)';

test('WebGPU: LoRA steps match the CPU (fp32 within 1e-5, fp16 within 1e-2 of max|v|) and upload only x and t per step', { skip: noVulkan }, async () => {
  const full = [{ lora: lora('kohya'), scale: 0.7 }];
  // one block adapted: every other Linear gets a rank-1 pair of zeros (WebGPU takes no empty tensors)
  const partialLora = lora('kohya');
  const partial = [{ lora: { ...partialLora, targets: partialLora.targets.filter((t) => t.weight.startsWith('single_blocks.0.')) }, scale: 0.7 }];
  const outputs = async (target: ExecutionTarget) => {
    const m = await Flux2Transformer.load(base.bfl, { target });
    try {
      const out: Float32Array[] = [];
      for (const set of [full, partial]) {
        await m.setLoras(set);
        const ctx = await m.prepareContext(inp);
        out.push(await m.step(inp, ctx));
        ctx.dispose();
        if (target.device !== 'cpu') assert.deepEqual(m.lastTransfers, { uploads: 2, downloads: 1 });
      }
      return out;
    } finally {
      await m.close();
    }
  };
  const cpu = await outputs(cpuTarget());
  for (const [dtype, tol] of [['fp32', 1e-5], ['fp16', 1e-2]] as const) {
    const gpu = await outputs({ device: 'webgpu', precision: 'exact', gpuDtype: dtype });
    gpu.forEach((g, i) => assert.ok(relErr(g, cpu[i]) < tol, `${dtype} ${i ? 'partial' : 'full'}: ${relErr(g, cpu[i])}`));
  }
});
