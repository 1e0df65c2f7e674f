// `klein bench text-encoder`: the Qwen3 text encoder at real Qwen3-4B shapes with random weights (only the layers
// klein runs: 27 of 36), one 512-token batch. Prints the load (the first one builds the weight store), seconds per
// prompt, GFLOP/s and peak RSS with its anonymous and file-backed parts; the last line is `GFLOP/s: <number>`.
// `--device`, `--precision`, `--gpu-dtype` and `--threads` pick the target as on every command. `--outliers` runs
// the stress model of issue 21 (fixtures/stress-outliers.ts) on prompts that start with its massive-activation tokens.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { KLEIN_OUTPUT_LAYERS, layersNeeded, parseQwen3Config, qwen3Flops } from '../src/models/qwen3/config.ts';
import { Qwen3TextEncoder, type Qwen3LoadOptions } from '../src/models/qwen3/runtime.ts';
import { QWEN3_4B_CONFIG, writeRandomQwen3Checkpoint, xorshift } from '../src/fixtures/qwen3.ts';
import { MASSIVE_TOKENS } from '../src/fixtures/stress-outliers.ts';
import { UsageError } from '../src/cli/errors.ts';
import { addTargetOptions, describeTarget, targetFromFlags, type TargetFlags } from '../src/cli/target-options.ts';
import { formatMemory, GiB, MemorySampler, resetPeakRss } from './util.ts';
import { relativeError } from '../src/conform/compare.ts';

interface BenchOptions extends TargetFlags {
  dir?: string;
  runs: string;
  batch: string;
  seq: string;
  compareExact?: boolean;
  layers?: string;
  rebuild?: boolean;
  outliers?: boolean;
}

/** Relative error of a context over its real (unmasked) tokens: pad rows carry no information the transformer uses. */
function contextError(got: Float32Array, ref: Float32Array, mask: BigInt64Array, dim: number): { rms: number; max: number } {
  const real = (x: Float32Array) => {
    const rows: Float32Array[] = [];
    for (let tok = 0; tok < mask.length; tok++) if (mask[tok] !== 0n) rows.push(x.subarray(tok * dim, (tok + 1) * dim));
    const out = new Float32Array(rows.length * dim);
    rows.forEach((r, i) => out.set(r, i * dim));
    return out;
  };
  return relativeError(real(got), real(ref));
}

/**
 * The random Qwen3-4B folder (bf16), written once: klein's 27 layers, or in a default folder of its own only the
 * `layers` a `--layers` run needs; `outliers`: the stress model.
 */
function benchFolder(dir: string | undefined, o: { layers: number; outliers: boolean }): string {
  const all = layersNeeded({ outputLayers: KLEIN_OUTPUT_LAYERS });
  const layers = dir === undefined ? o.layers : all;
  const name = `klein-bench-qwen3-4b-${o.outliers ? 'outliers' : 'random'}${layers < all ? `-L${layers}` : ''}`;
  const folder = path.resolve(dir ?? path.join(os.tmpdir(), name));
  const marker = path.join(folder, '.complete');
  if (!fs.existsSync(marker)) {
    console.log(`writing random Qwen3-4B weights (${layers} layers, bf16${o.outliers ? ', stress model: outliers' : ''}) to ${folder} …`);
    const t = performance.now();
    writeRandomQwen3Checkpoint(folder, QWEN3_4B_CONFIG, { seed: 4, layers, outliers: o.outliers, onShard: (d, n) => process.stdout.write(`\r  shard ${d}/${n}`) });
    fs.writeFileSync(marker, '');
    console.log(`\n  written in ${((performance.now() - t) / 1000).toFixed(1)} s`);
  }
  return folder;
}

/**
 * `batch` prompts of `seq` tokens: 75 % random real tokens, then padding, like a real klein prompt; `outliers`: the
 * first tokens are the ones whose embedding rows carry the stress model's massive activations.
 */
function promptBatch(batch: number, seq: number, vocab: number, outliers = false): { ids: BigInt64Array; mask: BigInt64Array } {
  const ids = new BigInt64Array(batch * seq);
  const mask = new BigInt64Array(batch * seq);
  const next = xorshift(7);
  const real = Math.max(1, Math.floor(seq * 0.75));
  for (let b = 0; b < batch; b++) {
    for (let i = 0; i < seq; i++) {
      ids[b * seq + i] = i < real ? BigInt(next() % vocab) : 151643n;
      if (outliers && i < Math.min(real, MASSIVE_TOKENS.length)) ids[b * seq + i] = BigInt(MASSIVE_TOKENS[i]);
      mask[b * seq + i] = i < real ? 1n : 0n;
    }
  }
  return { ids, mask };
}

/** Loads the encoder and prints how long it took and whether the weight store was built or read. */
async function timedLoad(folder: string, opts: Qwen3LoadOptions, label: string): Promise<Qwen3TextEncoder> {
  let lastPct = -1;
  const onWeights = (done: number, total: number) => {
    const pct = Math.floor((100 * done) / total);
    if (pct !== lastPct && pct % 10 === 0) process.stdout.write(`\r  weight store: ${pct} % (${done}/${total} weights)${done === total ? '\n' : ''}`);
    lastPct = pct;
  };
  const t = performance.now();
  const enc = await Qwen3TextEncoder.load(folder, { ...opts, onWeights });
  const how = enc.weightStore.built ? 'weight store built' : 'weight store read';
  console.log(`${label} (${enc.computeDtype} products, ${how}, graph ${enc.graphCached ? 'cached' : 'compiled'}): ${((performance.now() - t) / 1000).toFixed(2)} s, RSS ${(process.memoryUsage().rss / GiB).toFixed(2)} GiB`);
  return enc;
}

export async function benchTextEncoder(opts: BenchOptions): Promise<void> {
  const [runs, batch, seq] = [Number(opts.runs), Number(opts.batch), Number(opts.seq)];
  for (const [k, v] of [['--runs', runs], ['--batch', batch], ['--seq', seq]] as const) {
    if (!Number.isInteger(v) || v < 1) throw new UsageError(`${k} must be a positive integer`);
  }
  if (seq > 512) throw new UsageError('--seq must be at most 512 (the klein context length)');
  const writeLayers = layersNeeded({ outputLayers: KLEIN_OUTPUT_LAYERS });
  // --layers N runs only the first N layers of the same folder (states N/3, 2N/3, N stacked): a cheap "mini" run
  const runLayers = opts.layers === undefined ? writeLayers : Number(opts.layers);
  if (!Number.isInteger(runLayers) || runLayers < 1 || runLayers > writeLayers) throw new UsageError(`--layers must be 1–${writeLayers}`);
  const outputLayers = runLayers === writeLayers ? KLEIN_OUTPUT_LAYERS : [...new Set([Math.ceil(runLayers / 3), Math.ceil((2 * runLayers) / 3), runLayers])];
  const target = await targetFromFlags(opts);
  if (opts.compareExact && target.precision !== 'fast') throw new UsageError('--compare-exact needs --precision fast');
  const folder = benchFolder(opts.dir, { layers: runLayers, outliers: opts.outliers === true });
  const cfg = parseQwen3Config(QWEN3_4B_CONFIG);
  // the peaks cover loads and runs, not the writing of the random checkpoint above
  resetPeakRss();
  const memory = new MemorySampler(50);
  let enc = await timedLoad(folder, { target, outputLayers, rebuild: opts.rebuild }, 'load');
  if (enc.weightStore.built) {
    // the figure a restart sees: the same load from the weight store just written
    await enc.close();
    enc = await timedLoad(folder, { target, outputLayers }, 'load again');
  }
  if (enc.fp16Overflows) console.log(`fp16: ${enc.fp16Overflows} weights clamped to ±65504`);
  const { ids, mask } = promptBatch(batch, seq, cfg.vocabSize, opts.outliers);
  const flops = qwen3Flops(cfg, runLayers, batch, seq);
  let best = Infinity;
  let out: Float32Array = new Float32Array(0);
  for (let r = 0; r < runs; r++) {
    const t = performance.now();
    out = await enc.embed(ids, mask, batch);
    const s = (performance.now() - t) / 1000;
    if (!out.every(Number.isFinite)) throw new Error('the encoder produced non-finite values');
    best = Math.min(best, s);
    console.log(`run ${r + 1}: ${s.toFixed(2)} s, ${(flops / s / 1e9).toFixed(1)} GFLOP/s`);
  }
  await enc.close();
  const peak = memory.stop();
  console.log(`shape: Qwen3-4B${opts.outliers ? ' (stress model: outliers)' : ''}, ${runLayers} of ${cfg.numHiddenLayers} layers, batch ${batch} × ${seq} tokens, ${(flops / 1e12).toFixed(2)} TFLOP per run (counted as fp32), ${enc.computeDtype} products, ${describeTarget(target)}`);
  if (opts.compareExact) {
    // after the fast encoder is released, so the two never share the memory; its peak is not the fast mode's
    const exact = await timedLoad(folder, { target: { ...target, precision: 'exact' }, outputLayers }, 'exact load');
    const ref = await exact.embed(ids, mask, batch);
    await exact.close();
    const e = contextError(out, ref, mask, outputLayers.length * cfg.hiddenSize);
    console.log(`fast vs exact, real tokens of the context: rms(fast − exact)/rms(exact) ${e.rms.toExponential(3)}, max |fast − exact|/max |exact| ${e.max.toExponential(3)}`);
    console.log(`relative rms error: ${(e.rms * 100).toFixed(3)} %`);
    console.log(`max error: ${(e.max * 100).toFixed(3)} % of max |exact|`);
  }
  console.log(`seconds per prompt (best of ${runs}, batch ${batch}): ${(best / batch).toFixed(2)}`);
  console.log(`peak RSS (loads and runs): ${formatMemory(peak)}`);
  console.log(`GFLOP/s: ${(flops / best / 1e9).toFixed(1)}`);
}

export function registerTextEncoderBench(bench: Command): void {
  const cmd = bench.command('text-encoder');
  addTargetOptions(cmd);
  cmd
    .description('Qwen3-4B text encoder (random weights, 27 layers) on one 512-token prompt: load, seconds, GFLOP/s, peak RSS')
    .option('--dir <folder>', 'where the random checkpoint is written and reused (default: a folder in the temp dir)')
    .option('--runs <n>', 'timed runs; the best is reported', '2')
    .option('--batch <n>', 'prompts per run', '1')
    .option('--seq <n>', 'tokens per prompt', '512')
    .option('--threads <n>', 'intra-op threads (default: $KLEIN_THREADS, else all cores)')
    .option('--layers <n>', 'run only the first N of the 27 layers (a cheaper run of the same weights)')
    .option('--rebuild', 'build the weight store again even if it is valid (times the first load)')
    .option('--compare-exact', 'fast only: also run the exact encoder on the same tokens and print the relative error of the context')
    .option('--outliers', 'the stress model: random weights with realistic activation outliers (issue 21), in a folder of its own')
    .action((o: BenchOptions) => benchTextEncoder(o));
}
