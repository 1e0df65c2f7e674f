// `klein bench transformer`: one denoising step of the FLUX.2 transformer at the real klein 4B shapes with random
// bf16 weights (BFL key names), optionally with fewer blocks. The checkpoint is written once into the bench cache.
// Prints load time, seconds per step, GFLOP/s and peak RSS, one per line; the last line is `GFLOP/s: <number>`.
// `--precision fast` runs the int8 fast mode (FLOPs still counted as for fp32, so the figures compare);
// `--compare-exact` also runs the exact model on the same inputs first and prints the fast step's relative error;
// on a GPU in fp16 (KLEIN_DEVICE=webgpu or cuda, the default dtype there) `--compare-fp32` does the same with the
// fp32 model on the same device, which is what fp16 products cost in accuracy at real widths.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { Flux2Transformer, KLEIN_4B, headDim, mlpHidden, writeRandomFlux2Checkpoint, type Flux2Config, type Flux2ForwardInput } from '../src/models/flux2-transformer.ts';
import type { Precision } from '../src/pipeline/types.ts';
import { UsageError } from '../src/cli/errors.ts';
import { GiB, benchCacheDir, peakRssBytes, resetPeakRss, seconds } from './util.ts';
import { relativeError } from '../src/conform/compare.ts';
import { defaultDevice, resolveDevice } from '../src/graph/device.ts';
import { resolveComputeDtype } from '../src/graph/compute-dtype.ts';

export interface TransformerBenchOptions {
  doubleBlocks: number;
  singleBlocks: number;
  width: number;
  height: number;
  txtTokens: number;
  threads?: number;
  steps: number;
  /** Default exact. */
  precision?: Precision;
  /** Fast mode: also run exact mode on the same inputs and print the relative error of the fast step. */
  compareExact?: boolean;
  /** GPU in fp16: also run the model in fp32 on the same device and print the relative error of the fp16 step. */
  compareFp32?: boolean;
  /** Fast mode: quantize again even if the int8 cache is valid, to time the first load. */
  requantize?: boolean;
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

/** The random checkpoint for a block count, written once (bf16, BFL names, klein 4B shapes). */
export function benchCheckpoint(cfg: Flux2Config, log: (s: string) => void): string {
  const dir = benchCacheDir(`flux2-klein4b-d${cfg.depth}-s${cfg.depthSingleBlocks}-bf16`);
  const file = path.join(dir, 'model.safetensors');
  if (!fs.existsSync(file)) {
    log(`writing random bf16 checkpoint ${file} (once)…`);
    writeRandomFlux2Checkpoint(file, cfg, { dtype: 'BF16', layout: 'bfl', seed: 1 });
  }
  return file;
}

/** Synthetic step inputs: a W/16 × H/16 latent grid and `nTxt` text tokens with the real position ids. */
function inputs(cfg: Flux2Config, gw: number, gh: number, nTxt: number) {
  const nImg = gw * gh;
  let s = 12345;
  const rnd = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
  const x = Float32Array.from({ length: nImg * cfg.inChannels }, rnd);
  const ctx = Float32Array.from({ length: nTxt * cfg.contextInDim }, () => rnd() * 0.5);
  const xIds = new BigInt64Array(nImg * 4);
  for (let r = 0; r < gh; r++) for (let c = 0; c < gw; c++) { const i = (r * gw + c) * 4; xIds[i + 1] = BigInt(r); xIds[i + 2] = BigInt(c); }
  const ctxIds = new BigInt64Array(nTxt * 4);
  for (let l = 0; l < nTxt; l++) ctxIds[l * 4 + 3] = BigInt(l);
  return { x, xIds, ctx, ctxIds, timesteps: Float32Array.of(0.9), batch: 1, nTokens: nImg, nCtx: nTxt };
}


/**
 * The reference model's output for `inp`: exact mode for fast mode, fp32 on the same device for GPU fp16. Loaded,
 * run once and closed before the measured model loads, so the two never hold memory at once.
 */
async function referenceOutput(file: string, inp: Flux2ForwardInput, threads: number | undefined, kind: 'exact' | 'fp32', log: (s: string) => void): Promise<Float32Array> {
  const opts = kind === 'exact' ? { threads, precision: 'exact' as const } : { threads, gpuDtype: 'fp32' as const };
  const [loadS, ref] = await seconds(() => Flux2Transformer.load(file, opts));
  try {
    const [stepS, out] = await seconds(() => ref.forward(inp));
    log(`${kind} reference${kind === 'fp32' ? ` on ${ref.device}` : ''}: load ${loadS.toFixed(2)} s, step ${stepS.toFixed(3)} s`);
    return out;
  } finally {
    await ref.close();
  }
}

/** `--compare-fp32` needs an fp16 run to compare; checked before the checkpoint is written or anything loads. */
async function checkCompareFp32(precision: Precision): Promise<void> {
  if (precision === 'fast') throw new UsageError('--compare-fp32 compares fp16 with fp32 on a GPU; --precision fast runs on the CPU (use --compare-exact)');
  const device = await resolveDevice(defaultDevice());
  const dtype = resolveComputeDtype(device);
  if (dtype !== 'fp16') throw new UsageError(`--compare-fp32 compares a GPU's fp16 products with fp32 on the same device; this run computes in ${dtype} on ${device} (use KLEIN_DEVICE=webgpu or cuda with KLEIN_GPU_DTYPE unset or fp16)`);
}

export async function runTransformerBench(o: TransformerBenchOptions, log: (s: string) => void = console.log): Promise<number> {
  const cfg: Flux2Config = { ...KLEIN_4B, depth: o.doubleBlocks, depthSingleBlocks: o.singleBlocks };
  const precision = o.precision ?? 'exact';
  if (o.compareFp32) await checkCompareFp32(precision);
  const file = benchCheckpoint(cfg, log);
  const gw = o.width / 16;
  const gh = o.height / 16;
  const inp = inputs(cfg, gw, gh, o.txtTokens);
  const weightBytesF32 = (fs.statSync(file).size / 2) * 4;
  const threads = o.threads ?? Number(process.env.KLEIN_THREADS ?? os.availableParallelism());
  const compare = o.compareExact && precision === 'fast' ? ('exact' as const) : o.compareFp32 ? ('fp32' as const) : undefined;
  const reference = compare ? await referenceOutput(file, inp, o.threads, compare, log) : undefined;
  resetPeakRss();
  let lastReport = 0;
  const onProgress = (done: number, total: number, stage: string) => {
    if (performance.now() - lastReport > 5000 || done === total) {
      lastReport = performance.now();
      log(`  loaded ${done}/${total} stages (${stage})`);
    }
  };
  let lastQuant = 0;
  const onQuantizeProgress = (done: number, total: number, weight: string) => {
    if (performance.now() - lastQuant > 5000 || done === total) {
      lastQuant = performance.now();
      log(`  quantized ${done}/${total} weights to int8 (${weight})`);
    }
  };
  const [loadS, model] = await seconds(() => Flux2Transformer.load(file, { threads: o.threads, onProgress, precision, onQuantizeProgress, requantize: o.requantize }));
  const loadPeak = peakRssBytes();
  resetPeakRss();
  log(`config: klein 4B shapes, ${cfg.depth} double + ${cfg.depthSingleBlocks} single blocks, ${o.width}x${o.height} (${inp.nTokens} image tokens) + ${o.txtTokens} text tokens, heads ${cfg.numHeads}×${headDim(cfg)}, precision ${precision}`);
  const int8 = model.int8Cache ? (model.int8Cache.built ? ', int8 weights quantized and cached' : ', int8 weights from the cache') : '';
  log(`load seconds: ${loadS.toFixed(2)}${model.graphCached ? '' : ' (graph compiled)'}${int8}`);
  if (model.device !== 'cpu') log(`device: ${model.device}, Linears in ${model.computeDtype}${model.computeDtype === 'fp16' ? ` (${model.fp16Overflows} weights clamped to ±65504)` : ''}, stage I/O ${model.deviceIO ? 'in device memory' : 'through the host'}`);
  try {
    const [firstS, firstOut] = await seconds(() => model.forward(inp));
    log(`first step seconds: ${firstS.toFixed(3)}`);
    if (reference) {
      const e = relativeError(firstOut, reference);
      const [what, ref] = compare === 'exact' ? ['fast', 'exact'] : ['fp16', 'fp32'];
      log(`${what} vs ${ref}, same inputs: relative rms error ${(e.rms * 100).toFixed(3)} %, max |error| ${(e.max * 100).toFixed(3)} % of max |${ref}|`);
    }
    let best = Infinity;
    let bestCpu = Infinity;
    for (let i = 0; i < o.steps; i++) {
      const cpu0 = process.cpuUsage();
      best = Math.min(best, (await seconds(() => model.forward(inp)))[0]);
      const cpu = process.cpuUsage(cpu0);
      bestCpu = Math.min(bestCpu, (cpu.user + cpu.system) / 1e6);
    }
    const flops = flux2StepFlops(cfg, inp.nTokens, o.txtTokens);
    const stepPeak = peakRssBytes();
    const peak = Math.max(loadPeak, stepPeak);
    const gflops = flops / best / 1e9;
    // fast mode: bytes per parameter says how close the int8 weights come to 1 byte each (fp32 would be 4)
    const perParam = (b: number) => (precision === 'fast' ? `, ${(b / (weightBytesF32 / 4)).toFixed(2)} bytes per parameter` : '');
    const ratio = (b: number) => `${(b / GiB).toFixed(2)} GiB = ${(b / weightBytesF32).toFixed(2)}× the ${(weightBytesF32 / GiB).toFixed(2)} GiB of fp32 weights${perParam(b)}`;
    log(`GFLOP per step: ${(flops / 1e9).toFixed(1)}`);
    if (model.device !== 'cpu') log(`host transfers per step: ${model.lastTransfers.uploads} uploads, ${model.lastTransfers.downloads} downloads`);
    log(`seconds/step: ${best.toFixed(3)} (best of ${o.steps})`);
    // On a shared machine wall time includes other people's work; CPU time per step (all threads) does not.
    log(`CPU seconds/step: ${bestCpu.toFixed(3)} (${threads} threads: ${(flops / (bestCpu / threads) / 1e9).toFixed(1)} GFLOP/s if they had the cores to themselves)`);
    log(`peak RSS while stepping: ${ratio(stepPeak)}`);
    log(`peak RSS: ${ratio(peak)} (loading included)`);
    log(`GFLOP/s: ${gflops.toFixed(1)}`);
    return gflops;
  } finally {
    await model.close();
  }
}

function positiveInt(name: string, v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new UsageError(`--${name} must be a non-negative integer, got "${v}"`);
  return n;
}

function precisionOption(v: string): Precision {
  if (v !== 'exact' && v !== 'fast') throw new UsageError(`--precision must be exact or fast, got "${v}"`);
  return v;
}

export function registerTransformerBench(bench: Command): void {
  bench
    .command('transformer')
    .description('one FLUX.2 transformer step at klein 4B shapes (random bf16 weights): seconds/step, GFLOP/s, peak RSS')
    .option('--double-blocks <n>', 'double-stream blocks', '5')
    .option('--single-blocks <n>', 'single-stream blocks', '20')
    .option('--size <WxH>', 'image size in pixels (multiples of 16)', '512x512')
    .option('--txt-tokens <n>', 'text tokens', '512')
    .option('--threads <n>', 'intra-op threads (default: all cores)')
    .option('--steps <n>', 'timed steps after the first (best is reported)', '2')
    .option('--precision <p>', 'exact (fp32 products) or fast (int8 block Linears)', 'exact')
    .option('--compare-exact', 'fast mode: also run exact mode on the same inputs and print the relative error')
    .option('--compare-fp32', 'GPU in fp16 (KLEIN_DEVICE=webgpu or cuda): also run fp32 on the same device and print the relative error')
    .option('--requantize', 'fast mode: quantize again even if the int8 cache is valid (times the first load)')
    .action(async (opts: Record<string, string> & { compareExact?: boolean; compareFp32?: boolean; requantize?: boolean }) => {
      const m = /^(\d+)x(\d+)$/.exec(opts.size);
      if (!m || Number(m[1]) % 16 || Number(m[2]) % 16 || Number(m[1]) === 0 || Number(m[2]) === 0) throw new UsageError(`--size must be WxH with positive multiples of 16, got "${opts.size}"`);
      const o: TransformerBenchOptions = {
        doubleBlocks: positiveInt('double-blocks', opts.doubleBlocks),
        singleBlocks: positiveInt('single-blocks', opts.singleBlocks),
        width: Number(m[1]),
        height: Number(m[2]),
        txtTokens: positiveInt('txt-tokens', opts.txtTokens),
        threads: opts.threads === undefined ? undefined : positiveInt('threads', opts.threads),
        steps: Math.max(1, positiveInt('steps', opts.steps)),
        precision: precisionOption(opts.precision),
        compareExact: opts.compareExact === true,
        compareFp32: opts.compareFp32 === true,
        requantize: opts.requantize === true,
      };
      if ((o.compareExact || o.requantize) && o.precision !== 'fast') throw new UsageError('--compare-exact and --requantize go with --precision fast');
      if (o.txtTokens < 1) throw new UsageError('--txt-tokens must be at least 1');
      if (o.threads === 0) throw new UsageError('--threads must be at least 1');
      await runTransformerBench(o);
    });
}
