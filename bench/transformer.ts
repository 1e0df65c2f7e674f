// `klein bench transformer`: one denoising step of the FLUX.2 transformer at the real klein 4B shapes with random
// bf16 weights (BFL key names), optionally with fewer blocks. The checkpoint is written once into the bench cache.
// Prints load time, seconds per step, GFLOP/s and peak RSS (anonymous and file-backed), one per line; the last line
// is `GFLOP/s: <number>`. `--precision fast` runs the int8 fast mode (FLOPs still counted as for fp32, so the
// figures compare); `--compare-exact` also runs the exact model on the same inputs first and prints the fast step's
// relative error; on a GPU in fp16 `--compare-fp32` does the same with the fp32 model on the same device.
// `--lora FILE[:SCALE]` (repeatable) or `--random-loras N` also times the step with LoRAs (bench/transformer-lora.ts).
// `--outliers` runs the stress model of issue 21 (fixtures/stress-outliers.ts), its context with massive tokens.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { KLEIN_4B, headDim, mlpHidden, type Flux2Config } from '../src/models/flux2/config.ts';
import { Flux2Transformer, type Flux2ForwardInput } from '../src/models/flux2/runtime.ts';
import { writeRandomFlux2Checkpoint } from '../src/fixtures/flux2.ts';
import { openFlux2Checkpoint } from '../src/models/flux2/checkpoint.ts';
import type { ExecutionTarget } from '../src/runtime/target.ts';
import { DEFAULT_INT8_SCHEME } from '../src/graph/nn/weight-policy.ts';
import { UsageError } from '../src/cli/errors.ts';
import { addTargetOptions, targetFromFlags, type TargetFlags } from '../src/cli/target-options.ts';
import { GiB, MemorySampler, benchCacheDir, formatMemory, resetPeakRss, seconds } from './util.ts';
import { relativeError } from '../src/conform/compare.ts';
import { parseLoraSpec } from '../src/service/lora-fetch.ts';
import { benchLoras, randomLoraFiles, type LoraBenchSpec } from './transformer-lora.ts';
import { MASSIVE_CHANNELS, MASSIVE_FACTOR, MASSIVE_TOKENS, outlierChannels } from '../src/fixtures/stress-outliers.ts';

export interface TransformerBenchOptions {
  doubleBlocks: number;
  singleBlocks: number;
  width: number;
  height: number;
  txtTokens: number;
  steps: number;
  target: ExecutionTarget;
  /** Fast mode: also run exact mode on the same inputs and print the relative error of the fast step. */
  compareExact?: boolean;
  /** GPU in fp16: also run the model in fp32 on the same device and print the relative error of the fp16 step. */
  compareFp32?: boolean;
  /** Convert (or quantize) the weights again even if their store is valid, to time the first load. */
  rebuild?: boolean;
  /** LoRA files to time the step with (the first alone, then all). */
  loras?: LoraBenchSpec[];
  /** Random real-width LoRAs to write into the bench cache and time with: count and rank. */
  randomLoras?: { count: number; rank: number };
  /** The stress model of issue 21 and a context with massive-activation tokens. */
  outliers?: boolean;
  /** A transformer checkpoint (file or folder, BFL or diffusers layout) instead of the random one of the block counts. */
  checkpoint?: string;
}

/** An absolute path that exists, else a usage error. */
function existingPath(p: string): string {
  if (!fs.existsSync(p)) throw new UsageError(`--checkpoint: ${p} does not exist`);
  return path.resolve(p);
}

/** Bytes of a safetensors file, or of every one in a folder. */
function safetensorsBytes(fileOrFolder: string): number {
  if (!fs.statSync(fileOrFolder).isDirectory()) return fs.statSync(fileOrFolder).size;
  return fs.readdirSync(fileOrFolder).filter((f) => f.endsWith('.safetensors')).reduce((n, f) => n + fs.statSync(path.join(fileOrFolder, f)).size, 0);
}

/**
 * FLOPs of one forward: every token through the Linear weights it actually passes (2 per multiply-add: text tokens
 * through txt_in and the text half of the double blocks, image tokens through img_in, the image half and the final
 * projection, all through the single blocks) plus attention `4·T²·hidden` per block (QKᵀ and PV). The per-sample
 * modulation vectors (one row each) are negligible and left out.
 */
export function flux2StepFlops(c: Flux2Config, nImg: number, nTxt: number): number {
  const H = c.hiddenSize;
  const mlp = mlpHidden(c);
  const stream = 3 * H * H + H * H + 2 * mlp * H + mlp * H; // qkv, proj, mlp in, mlp out
  const single = (3 * H + 2 * mlp) * H + H * (H + mlp);
  const perTxt = c.contextInDim * H + c.depth * stream + c.depthSingleBlocks * single;
  const perImg = c.inChannels * H + c.depth * stream + c.depthSingleBlocks * single + H * c.inChannels;
  const T = nImg + nTxt;
  return 2 * (perTxt * nTxt + perImg * nImg) + 4 * T * T * H * (c.depth + c.depthSingleBlocks);
}

/** The random checkpoint for a block count, written once (bf16, BFL names, klein 4B shapes); `outliers`: the stress model. */
export function benchCheckpoint(cfg: Flux2Config, log: (s: string) => void, outliers = false): string {
  const dir = benchCacheDir(`flux2-klein4b-d${cfg.depth}-s${cfg.depthSingleBlocks}-bf16${outliers ? '-outliers' : ''}`);
  const file = path.join(dir, 'model.safetensors');
  if (!fs.existsSync(file)) {
    log(`writing random bf16 ${outliers ? 'stress (outliers) ' : ''}checkpoint ${file} (once)…`);
    writeRandomFlux2Checkpoint(file, cfg, { dtype: 'BF16', layout: 'bfl', seed: 1, outliers });
  }
  return file;
}

/** The stress text encoder's massive-activation channels on the first context tokens, in each stacked state. */
function massiveContextTokens(ctx: Float32Array, dim: number, nTxt: number): void {
  const state = dim / 3; // three stacked hidden states of the text encoder
  const channels = outlierChannels(state, MASSIVE_CHANNELS, 1);
  for (let t = 0; t < Math.min(nTxt, MASSIVE_TOKENS.length); t++) {
    for (let s = 0; s < 3; s++) for (const c of channels) ctx[t * dim + s * state + c] *= MASSIVE_FACTOR;
  }
}

/** Synthetic step inputs: a W/16 × H/16 latent grid and `nTxt` text tokens with the real position ids. */
function inputs(cfg: Flux2Config, gw: number, gh: number, nTxt: number, outliers = false) {
  const nImg = gw * gh;
  let s = 12345;
  const rnd = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
  const x = Float32Array.from({ length: nImg * cfg.inChannels }, rnd);
  const ctx = Float32Array.from({ length: nTxt * cfg.contextInDim }, () => rnd() * 0.5);
  const xIds = new BigInt64Array(nImg * 4);
  for (let r = 0; r < gh; r++) for (let c = 0; c < gw; c++) { const i = (r * gw + c) * 4; xIds[i + 1] = BigInt(r); xIds[i + 2] = BigInt(c); }
  const ctxIds = new BigInt64Array(nTxt * 4);
  for (let l = 0; l < nTxt; l++) ctxIds[l * 4 + 3] = BigInt(l);
  if (outliers) massiveContextTokens(ctx, cfg.contextInDim, nTxt);
  return { x, xIds, ctx, ctxIds, timesteps: Float32Array.of(0.9), batch: 1, nTokens: nImg, nCtx: nTxt };
}


/**
 * The reference model's output for `inp`: exact mode for fast mode, fp32 on the same device for GPU fp16. Loaded,
 * run once and closed before the measured model loads, so the two never hold memory at once.
 */
async function referenceOutput(file: string, inp: Flux2ForwardInput, target: ExecutionTarget, log: (s: string) => void): Promise<Float32Array> {
  const [loadS, ref] = await seconds(() => Flux2Transformer.load(file, { target }));
  try {
    const [stepS, out] = await seconds(() => ref.forward(inp));
    log(`reference (${ref.computeDtype} on ${target.device}): load ${loadS.toFixed(2)} s, step ${stepS.toFixed(3)} s`);
    return out;
  } finally {
    await ref.close();
  }
}

/** A throttled progress line for the weight store's first build. */
function weightProgress(log: (s: string) => void): (done: number, total: number, key: string) => void {
  let last = 0;
  return (done, total, key) => {
    if (performance.now() - last > 5000 || done === total) {
      last = performance.now();
      log(`  weights ${done}/${total} converted (${key})`);
    }
  };
}

export async function runTransformerBench(o: TransformerBenchOptions, log: (s: string) => void = console.log): Promise<number> {
  const cfg: Flux2Config = o.checkpoint ? openFlux2Checkpoint(o.checkpoint).config : { ...KLEIN_4B, depth: o.doubleBlocks, depthSingleBlocks: o.singleBlocks };
  const t = o.target;
  if (o.compareFp32 && (t.device === 'cpu' || t.gpuDtype !== 'fp16')) {
    const why = t.precision === 'fast' ? '--precision fast runs on the CPU (use --compare-exact)' : `this run computes in ${t.device === 'cpu' ? 'fp32' : t.gpuDtype} on ${t.device} (use --device webgpu or cuda with fp16)`;
    throw new UsageError(`--compare-fp32 compares a GPU's fp16 products with fp32 on the same device; ${why}`);
  }
  const file = o.checkpoint ?? benchCheckpoint(cfg, log, o.outliers);
  const inp = inputs(cfg, o.width / 16, o.height / 16, o.txtTokens, o.outliers);
  const weightBytesF32 = (safetensorsBytes(file) / 2) * 4;
  const threads = t.threads ?? os.availableParallelism();
  const refTarget = o.compareExact ? { ...t, precision: 'exact' as const } : o.compareFp32 ? { ...t, gpuDtype: 'fp32' as const } : undefined;
  const reference = refTarget ? await referenceOutput(file, inp, refTarget, log) : undefined;
  resetPeakRss();
  const loadMem = new MemorySampler();
  const [loadS, model] = await seconds(() => Flux2Transformer.load(file, { target: t, onWeights: weightProgress(log), rebuild: o.rebuild }));
  const loadPeak = loadMem.stop();
  resetPeakRss();
  log(`config: klein 4B shapes${o.outliers ? ' (stress model: outliers)' : ''}, ${cfg.depth} double + ${cfg.depthSingleBlocks} single blocks, ${o.width}x${o.height} (${inp.nTokens} image tokens) + ${o.txtTokens} text tokens, heads ${cfg.numHeads}×${headDim(cfg)}, products in ${model.computeDtype}${t.precision === 'fast' ? ` (int8 scheme ${t.int8Scheme ?? DEFAULT_INT8_SCHEME})` : ''} on ${t.device}`);
  log(`load seconds: ${loadS.toFixed(2)}${model.weightsBuilt ? ' (weights converted into the store)' : ' (weights from the store)'}${model.graphCached ? '' : ' (graphs compiled)'}`);
  if (model.computeDtype === 'fp16') log(`fp16: ${model.fp16Overflows} weights clamped to ±65504`);
  const stepMem = new MemorySampler();
  try {
    const [firstS, firstOut] = await seconds(() => model.forward(inp));
    log(`first step seconds: ${firstS.toFixed(3)}`);
    if (reference) {
      const e = relativeError(firstOut, reference);
      const [what, ref] = o.compareExact ? ['fast', 'exact'] : ['fp16', 'fp32'];
      // this line's format is read by test/models/flux2-transformer-fast and scripts/gpu-check.sh
      log(`${what} vs ${ref}, same inputs: relative rms error ${(e.rms * 100).toFixed(3)} %, max |error| ${(e.max * 100).toFixed(3)} % of max |${ref}|`);
      log(`relative rms error: ${(e.rms * 100).toFixed(3)} %`);
      log(`max error: ${(e.max * 100).toFixed(3)} % of max |${ref}|`);
    }
    // the sampler's steps: context once, then steps on it
    const context = await model.prepareContext(inp);
    let best = Infinity;
    let bestCpu = Infinity;
    try {
      for (let i = 0; i < o.steps; i++) {
        const cpu0 = process.cpuUsage();
        best = Math.min(best, (await seconds(() => model.step(inp, context)))[0]);
        const cpu = process.cpuUsage(cpu0);
        bestCpu = Math.min(bestCpu, (cpu.user + cpu.system) / 1e6);
      }
    } finally {
      context.dispose();
    }
    const flops = flux2StepFlops(cfg, inp.nTokens, o.txtTokens);
    const stepPeak = stepMem.stop();
    const gflops = flops / best / 1e9;
    log(`GFLOP per step: ${(flops / 1e9).toFixed(1)}`);
    if (t.device !== 'cpu') log(`host transfers per step: ${model.lastTransfers.uploads} uploads, ${model.lastTransfers.downloads} downloads`);
    log(`seconds/step: ${best.toFixed(3)} (best of ${o.steps})`);
    // On a shared machine wall time includes other people's work; CPU time per step (all threads) does not.
    log(`CPU seconds/step: ${bestCpu.toFixed(3)} (${threads} threads: ${(flops / (bestCpu / threads) / 1e9).toFixed(1)} GFLOP/s if they had the cores to themselves)`);
    log(`peak RSS while loading: ${formatMemory(loadPeak)}`);
    log(`peak RSS while stepping: ${formatMemory(stepPeak)}; fp32 weights would be ${(weightBytesF32 / GiB).toFixed(2)} GiB`);
    const loras = [...(o.loras ?? []), ...(o.randomLoras ? randomLoraFiles(cfg, o.randomLoras.count, o.randomLoras.rank, log) : [])];
    if (loras.length) await benchLoras(model, inp, loras, o.steps, flops, log);
    log(`GFLOP/s: ${gflops.toFixed(1)}`);
    return gflops;
  } finally {
    stepMem.stop();
    await model.close();
  }
}

function positiveInt(name: string, v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new UsageError(`--${name} must be a non-negative integer, got "${v}"`);
  return n;
}

/** `FILE[:SCALE]` of an existing local file (the bench reads no URLs or Hub references). */
function benchLoraSpec(v: string): LoraBenchSpec {
  const { ref, scale } = parseLoraSpec(v);
  if (!fs.existsSync(ref)) throw new UsageError(`--lora ${v}: no such file (the bench takes local files; klein generate takes Hub references and URLs too)`);
  return { file: ref, scale };
}

export function registerTransformerBench(bench: Command): void {
  const cmd = bench.command('transformer');
  addTargetOptions(cmd);
  cmd
    .description('one FLUX.2 transformer step at klein 4B shapes (random bf16 weights): seconds/step, GFLOP/s, peak RSS')
    .option('--double-blocks <n>', 'double-stream blocks', '5')
    .option('--single-blocks <n>', 'single-stream blocks', '20')
    .option('--size <WxH>', 'image size in pixels (multiples of 16)', '512x512')
    .option('--txt-tokens <n>', 'text tokens', '512')
    .option('--threads <n>', 'intra-op threads (default: $KLEIN_THREADS, else all cores)')
    .option('--steps <n>', 'timed steps after the first (best is reported)', '2')
    .option('--compare-exact', 'fast mode: also run exact mode on the same inputs and print the relative error')
    .option('--compare-fp32', 'GPU in fp16: also run fp32 on the same device and print the relative error')
    .option('--rebuild', 'convert (or quantize) the weights again even if their store is valid (times the first load)')
    .option('--lora <FILE[:SCALE]>', 'also time the step with this LoRA (repeatable: the first alone, then all together) and switching between them', (v: string, prev: string[] = []) => [...prev, v])
    .option('--random-loras <n>', 'also time the step with n random real-width LoRAs (written once into the bench cache)')
    .option('--lora-rank <r>', 'rank of the --random-loras', '32')
    .option('--outliers', 'the stress model: random weights with realistic activation outliers (issue 21), written once beside the plain one')
    .option('--checkpoint <path>', "a klein transformer (safetensors file or a model folder's transformer/) instead of the random one; its config sets the blocks")
    .action(async (opts: Record<string, string> & TargetFlags & { compareExact?: boolean; compareFp32?: boolean; rebuild?: boolean; lora?: string[]; outliers?: boolean; checkpoint?: string }) => {
      const m = /^(\d+)x(\d+)$/.exec(opts.size);
      if (!m || Number(m[1]) % 16 || Number(m[2]) % 16 || Number(m[1]) === 0 || Number(m[2]) === 0) throw new UsageError(`--size must be WxH with positive multiples of 16, got "${opts.size}"`);
      const o: TransformerBenchOptions = {
        doubleBlocks: positiveInt('double-blocks', opts.doubleBlocks),
        singleBlocks: positiveInt('single-blocks', opts.singleBlocks),
        width: Number(m[1]),
        height: Number(m[2]),
        txtTokens: positiveInt('txt-tokens', opts.txtTokens),
        steps: Math.max(1, positiveInt('steps', opts.steps)),
        target: await targetFromFlags(opts),
        compareExact: opts.compareExact === true,
        compareFp32: opts.compareFp32 === true,
        rebuild: opts.rebuild === true,
        outliers: opts.outliers === true,
        checkpoint: opts.checkpoint === undefined ? undefined : existingPath(opts.checkpoint),
        loras: (opts.lora ?? []).map(benchLoraSpec),
        randomLoras: opts.randomLoras ? { count: positiveInt('random-loras', opts.randomLoras), rank: Math.max(1, positiveInt('lora-rank', opts.loraRank)) } : undefined,
      };
      if (o.compareExact && o.target.precision !== 'fast') throw new UsageError('--compare-exact goes with --precision fast');
      if (o.txtTokens < 1) throw new UsageError('--txt-tokens must be at least 1');
      if (o.checkpoint && o.outliers) throw new UsageError('--checkpoint and --outliers: the stress model is a random checkpoint of its own');
      await runTransformerBench(o);
    });
}
