// `klein bench matting`: BiRefNet at its native 1024² input, for the full (Swin-L: BiRefNet, -matting, RMBG-2.0)
// and lite (Swin-T) geometries. With no real checkpoint at hand it benches random weights of the exact shapes, which
// cost the same compute; `--weights` benches a real file instead. Each variant runs in its own process so the peak
// RSS it reports is that variant's alone.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Command } from 'commander';
import { BIREFNET_CONFIGS } from '../src/models/birefnet/config.ts';
import { writeRandomBiRefNetCheckpoint } from '../src/fixtures/birefnet.ts';
import { estimateForeground } from '../src/pipeline/matting.ts';
import { MattingPredictor } from '../src/pipeline/matting-model.ts';
import { cpuTarget } from '../src/runtime/target.ts';
import { UsageError } from '../src/cli/errors.ts';
import { benchCacheDir, GiB, MemorySampler, resetPeakRss } from './util.ts';

type Variant = 'full' | 'lite';
const VARIANTS: Variant[] = ['full', 'lite'];

interface Options {
  variant: string;
  size: string;
  runs: string;
  weights?: string;
  threads?: string;
}

interface Result {
  variant: string;
  size: number;
  weights: string;
  threads: number;
  load_s: number;
  warmup_s: number;
  predict_s: number[];
  best_predict_s: number;
  foreground_s: number;
  peak_rss_gib: number;
  /** Peak resident memory split: anonymous (heap, ORT arena) and file-backed (mapped weights). */
  peak_anon_gib: number;
  peak_file_gib: number;
}

const here = path.dirname(fileURLToPath(import.meta.url));

function positiveInt(v: string | undefined, what: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new UsageError(`${what} must be a positive integer, got "${v}"`);
  return n;
}

/** A random checkpoint of the variant's geometry, written once into the klein cache and reused. */
function randomWeights(variant: Variant): string {
  const file = path.join(benchCacheDir(`birefnet-${variant}-random`), 'model.safetensors');
  if (!fs.existsSync(file)) {
    console.log(`writing random ${variant} weights to ${file} …`);
    const t = performance.now();
    writeRandomBiRefNetCheckpoint(file, BIREFNET_CONFIGS[variant], { seed: 1 });
    console.log(`  ${((performance.now() - t) / 1000).toFixed(1)} s, ${(fs.statSync(file).size / 2 ** 20).toFixed(0)} MiB`);
  }
  return file;
}

/** A test photo: a bright disc with a soft rim on a gradient. */
function testImage(size: number): Uint8Array {
  const img = new Uint8Array(size * size * 3);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const d = Math.hypot(x - size / 2, y - size / 2) / (size / 3);
      const a = Math.min(1, Math.max(0, (1.1 - d) * 5));
      const i = (y * size + x) * 3;
      img[i] = Math.round(a * 230 + (1 - a) * (60 + (x * 100) / size));
      img[i + 1] = Math.round(a * 170 + (1 - a) * 90);
      img[i + 2] = Math.round(a * 40 + (1 - a) * (80 + (y * 100) / size));
    }
  }
  return img;
}

async function benchOne(variant: string, opts: Options): Promise<Result> {
  const size = positiveInt(opts.size, '--size')!;
  if (size % 32) throw new UsageError(`--size must be a multiple of 32, got ${size}`);
  const runs = positiveInt(opts.runs, '--runs')!;
  const threads = positiveInt(opts.threads, '--threads') ?? os.availableParallelism();
  const weights = opts.weights ?? randomWeights(variant as Variant);
  if (!fs.existsSync(weights)) throw new UsageError(`weights not found: ${weights}`);

  console.log(`birefnet ${variant} at ${size}², ${threads} threads`);
  resetPeakRss(); // the random checkpoint written just before is not the model's memory
  const memory = new MemorySampler(50);
  let t = performance.now();
  const model = await MattingPredictor.load(weights, { target: cpuTarget('exact', threads), inputSize: size });
  const load = (performance.now() - t) / 1000;
  console.log(`load (weight store, compile or reuse the graph, open the session): ${load.toFixed(2)} s`);
  const c = model.net.config;
  console.log(`  geometry: embed ${c.embedDim}, depths ${c.depths.join('/')}, window ${c.windowSize}`);
  const img = testImage(size);
  try {
    t = performance.now();
    let alpha = await model.predict(img, size, size);
    const warmup = (performance.now() - t) / 1000;
    console.log(`warm-up predict: ${warmup.toFixed(2)} s`);
    const times: number[] = [];
    for (let i = 0; i < runs; i++) {
      t = performance.now();
      alpha = await model.predict(img, size, size);
      times.push((performance.now() - t) / 1000);
      console.log(`predict ${i + 1}/${runs}: ${times[i].toFixed(2)} s`);
    }
    t = performance.now();
    estimateForeground(img, alpha, size, size);
    const fgTime = (performance.now() - t) / 1000;
    console.log(`foreground estimate (blur fusion r=90, 6): ${fgTime.toFixed(3)} s`);
    const peak = memory.stop();
    console.log(`peak RSS: ${(peak.rss / GiB).toFixed(2)} GiB (RssAnon ${(peak.anon / GiB).toFixed(2)} GiB, RssFile ${(peak.file / GiB).toFixed(2)} GiB, sampled)`);
    return { variant, size, weights, threads, load_s: load, warmup_s: warmup, predict_s: times, best_predict_s: Math.min(...times), foreground_s: fgTime, peak_rss_gib: peak.rss / GiB, peak_anon_gib: peak.anon / GiB, peak_file_gib: peak.file / GiB };
  } finally {
    await model.close();
  }
}

/** Runs one variant in a child process, echoing its progress live; its last line is the JSON result. */
function runChild(args: string[], variant: string): Promise<Result> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    let pending = '';
    let last = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk: string) => {
      const lines = (pending + chunk).split('\n');
      pending = lines.pop() ?? '';
      for (const l of lines) {
        if (last) console.log(last);
        last = l;
      }
    });
    child.on('error', reject);
    child.on('close', (code) => {
      if (pending) {
        if (last) console.log(last);
        last = pending;
      }
      if (code !== 0) return reject(new Error(`bench matting --variant ${variant} failed (exit ${code})`));
      try {
        resolve(JSON.parse(last) as Result);
      } catch {
        reject(new Error(`bench matting --variant ${variant} printed no result line`));
      }
    });
  });
}

export function registerMattingBench(bench: Command): void {
  bench
    .command('matting')
    .description('BiRefNet matting at 1024²: seconds per image and peak RSS, full (Swin-L) and lite (Swin-T) random-weight variants')
    .option('--variant <name>', `${VARIANTS.join(', ')} or all (each in its own process)`, 'all')
    .option('--size <n>', 'model input size (multiple of 32)', '1024')
    .option('--runs <n>', 'timed runs after one warm-up', '2')
    .option('--weights <path>', 'a real BiRefNet checkpoint instead of random weights (one variant)')
    .option('--threads <n>', 'intra-op threads (default: all cores)')
    .action(async (opts: Options) => {
      const variants = opts.variant === 'all' ? (opts.weights ? ['checkpoint'] : VARIANTS) : [opts.variant];
      for (const v of variants) if (!opts.weights && !VARIANTS.includes(v as Variant)) throw new UsageError(`unknown --variant "${v}"; use ${VARIANTS.join(', ')} or all`);
      if (variants.length === 1) {
        const r = await benchOne(opts.weights ? path.basename(opts.weights) : variants[0], opts);
        console.log(JSON.stringify(r));
        return;
      }
      const results: Result[] = [];
      for (const v of variants) {
        const args = [path.join(here, '..', 'bin', 'klein.js'), 'bench', 'matting', '--variant', v, '--size', opts.size, '--runs', opts.runs];
        if (opts.threads) args.push('--threads', opts.threads);
        results.push(await runChild(args, v));
      }
      console.log(JSON.stringify(results));
    });
}
