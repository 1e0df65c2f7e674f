// `klein bench vae`: the FLUX.2 VAE at its real shapes (ch 128, mult [1,2,4,4], z 32; 84 M parameters) with random
// fp32 weights, written once into the bench cache. Decode (and encode) seconds and peak RSS, anonymous and
// file-backed separately, per size; tiled vs untiled error where both run. The target comes from --device and
// --gpu-dtype (or their variables); on a GPU in fp16 `--compare-fp32` also decodes each size in fp32 on the same
// device and prints the difference. The last line is `seconds: <decode 1024² seconds>`.
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { UsageError } from '../src/cli/errors.ts';
import { addTargetOptions, describeTarget, targetFromFlags, type TargetFlags } from '../src/cli/target-options.ts';
import { FLUX2_VAE_CONFIG, VAE_SCALE } from '../src/models/vae/config.ts';
import { Flux2VAE } from '../src/models/vae/runtime.ts';
import { AUTO_TILE_ABOVE_PIXELS, DEFAULT_MAX_TILE, DEFAULT_TILE_OVERLAP, planTiles } from '../src/models/vae/tiling.ts';
import { writeRandomVaeCheckpoint } from '../src/fixtures/vae.ts';
import type { ExecutionTarget } from '../src/runtime/target.ts';
import { benchCacheDir, formatMemory, GiB, memoryNow, MemorySampler, resetPeakRss, seconds, type MemoryFigures } from './util.ts';

type Tiling = 'auto' | 'always' | 'never';

interface VaeBenchOptions {
  sizes: number[];
  encode: boolean;
  /** Folder holding (or to hold) the random `ae.safetensors`; default the bench cache. */
  dir: string;
  tiling: Tiling;
  compareTiled: boolean;
  compareFp32: boolean;
  target: ExecutionTarget;
}

/** Seeded random input in [-scale, scale] (an image or a normalised latent). */
function randomInput(n: number, seed: number, scale: number): Float32Array {
  let s = seed >>> 0 || 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    out[i] = ((s / 4294967296) * 2 - 1) * scale;
  }
  return out;
}

/** Differences of `a` from the reference `b`: max and mean |Δ|, and rms(Δ) / rms(b). */
function diffStats(a: Float32Array, b: Float32Array): string {
  let [max, sum, sq, ref] = [0, 0, 0, 0];
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    max = Math.max(max, d);
    sum += d;
    sq += d * d;
    ref += b[i] * b[i];
  }
  return `max |Δ| ${max.toFixed(4)}, mean |Δ| ${(sum / a.length).toFixed(5)}, rms rel ${Math.sqrt(sq / ref).toExponential(2)}`;
}

/** Runs `fn` with its own peak-memory window: seconds, result and the peak (anonymous and file-backed). */
async function measured<T>(fn: () => Promise<T>): Promise<[number, T, MemoryFigures]> {
  resetPeakRss();
  const mem = new MemorySampler(50);
  try {
    const [s, r] = await seconds(fn);
    return [s, r, mem.stop()];
  } catch (e) {
    mem.stop();
    throw e;
  }
}

/** Peak bytes per output pixel above the process's resident memory before the run (what a memory plan adds). */
function perPixel(peak: MemoryFigures, base: MemoryFigures, size: number): string {
  return `${((peak.anon - base.anon) / (size * size)).toFixed(0)} anonymous bytes/px above the loaded model`;
}

async function benchSize(vae: Flux2VAE, fp32: Flux2VAE | undefined, size: number, o: VaeBenchOptions, base: MemoryFigures): Promise<number> {
  const n = size / VAE_SCALE;
  if (o.encode) {
    const img = randomInput(3 * size * size, size, 1);
    const [s, enc, peak] = await measured(() => vae.encode(img, [1, 3, size, size]));
    console.log(`encode ${size}×${size}: ${s.toFixed(2)} s, peak RSS ${formatMemory(peak)}, ${perPixel(peak, base, size)} → latent [${enc.dims.join(', ')}]`);
  }
  const latent = randomInput(128 * n * n, size + 7, 1.5);
  const tiled = o.tiling === 'always' || (o.tiling === 'auto' && size * size > AUTO_TILE_ABOVE_PIXELS);
  const plan = planTiles(n, DEFAULT_MAX_TILE, DEFAULT_TILE_OVERLAP);
  const [s, dec, peak] = await measured(() => vae.decode(latent, [1, 128, n, n], { tiling: o.tiling }));
  const how = tiled && plan.starts.length > 1 ? `tiled ${plan.starts.length}×${plan.starts.length} tiles of ${plan.size * VAE_SCALE} px` : 'untiled';
  console.log(`decode ${size}×${size} (${how}): ${s.toFixed(2)} s, peak RSS ${formatMemory(peak)}, ${perPixel(peak, base, size)} → image [${dec.dims.join(', ')}]`);
  if (fp32) {
    const [s32, ref] = await seconds(() => fp32.decode(latent, [1, 128, n, n], { tiling: o.tiling }));
    console.log(`decode ${size}×${size} in fp32 on ${vae.device}: ${s32.toFixed(2)} s; fp16 vs fp32 ${diffStats(dec.image, ref.image)}`);
  }
  if (o.compareTiled && !tiled && n > 16) {
    // the same latent through 2×2 tiles (the smallest tiling), to measure what tiling costs in accuracy
    const maxTile = Math.ceil((n + DEFAULT_TILE_OVERLAP) / 2);
    const [st, tl, tpeak] = await measured(() => vae.decode(latent, [1, 128, n, n], { tiling: 'always', maxTile, overlap: DEFAULT_TILE_OVERLAP }));
    console.log(`decode ${size}×${size} tiled 2×2 (tiles of ${maxTile * VAE_SCALE} px, overlap ≥ ${DEFAULT_TILE_OVERLAP * VAE_SCALE} px): ${st.toFixed(2)} s, peak RSS ${formatMemory(tpeak)}; vs untiled ${diffStats(tl.image, dec.image)}`);
  }
  return s;
}

export async function runVaeBench(o: VaeBenchOptions): Promise<void> {
  const t = o.target;
  if (o.compareFp32 && (t.device === 'cpu' || t.gpuDtype !== 'fp16')) throw new UsageError(`--compare-fp32 compares the fp16 GPU path with fp32; this run computes in ${t.device === 'cpu' ? 'fp32' : t.gpuDtype} on ${t.device} (use --device webgpu or cuda with fp16)`);
  const file = path.join(o.dir, 'ae.safetensors');
  if (!fs.existsSync(file)) {
    console.log(`writing a random FLUX.2 VAE (real shapes, fp32) to ${file} (once)…`);
    writeRandomVaeCheckpoint(file, FLUX2_VAE_CONFIG, { layout: 'bfl', seed: 1 });
  }
  const [loadS, vae, loadPeak] = await measured(() => Flux2VAE.load(file, { target: t }));
  console.log(`load (weight store + graphs + sessions): ${loadS.toFixed(2)} s, peak RSS ${formatMemory(loadPeak)}; ${describeTarget(t)}, ${t.threads ?? 'all'} threads`);
  console.log(`device: ${vae.device}, convs in ${vae.computeDtype}${vae.computeDtype === 'fp16' ? ` (${vae.fp16Overflows} weights clamped to ±65504)` : ''}`);
  const fp32 = o.compareFp32 ? await Flux2VAE.load(file, { target: t, only: 'decoder', gpuDtype: 'fp32' }) : undefined;
  let decode1024: number | undefined;
  try {
    const base = memoryNow();
    console.log(`resident before the first run: ${formatMemory(base)} (${(base.file / GiB).toFixed(2)} GiB mapped)`);
    for (const size of o.sizes) {
      const s = await benchSize(vae, fp32, size, o, base);
      if (size === 1024) decode1024 = s;
    }
  } finally {
    await vae.close();
    await fp32?.close();
  }
  console.log(decode1024 === undefined ? 'seconds: n/a (1024 not in --sizes)' : `seconds: ${decode1024.toFixed(2)}`);
}

export function registerVaeBench(bench: Command): void {
  const cmd = bench.command('vae');
  addTargetOptions(cmd);
  cmd
    .description('FLUX.2 VAE decode/encode at real shapes with random weights: seconds and peak RSS per size; last line "seconds: <decode 1024² s>"')
    .option('--sizes <list>', 'square image sizes in pixels', '512,1024,2048')
    .option('--no-encode', 'skip the encoder')
    .option('--tiling <mode>', 'decoder tiling: auto (above 1536²), always, never', 'auto')
    .option('--compare-tiled', 'also decode each untiled size in 2×2 tiles and print the difference')
    .option('--compare-fp32', 'GPU in fp16: also decode each size in fp32 on the same device and print the difference')
    .option('--dir <dir>', 'folder of the random checkpoint (default: the bench cache)')
    .option('--threads <n>', 'ORT intra-op threads (default: $KLEIN_THREADS, else all cores)')
    .action(async (opts: TargetFlags & { sizes: string; encode: boolean; tiling: string; compareTiled?: boolean; compareFp32?: boolean; dir?: string }) => {
      const sizes = opts.sizes.split(',').map((s) => Number(s.trim()));
      if (sizes.some((s) => !Number.isInteger(s) || s < 16 || s % VAE_SCALE)) throw new UsageError(`--sizes must be multiples of ${VAE_SCALE}, e.g. 512,1024,2048; got "${opts.sizes}"`);
      if (!['auto', 'always', 'never'].includes(opts.tiling)) throw new UsageError(`--tiling must be auto, always or never; got "${opts.tiling}"`);
      const target = await targetFromFlags(opts);
      if (target.precision === 'fast') console.log('precision fast: the VAE has no int8 path, it runs exact');
      const dir = opts.dir ?? benchCacheDir('flux2-vae-fp32');
      await runVaeBench({ sizes, encode: opts.encode, dir, tiling: opts.tiling as Tiling, compareTiled: opts.compareTiled === true, compareFp32: opts.compareFp32 === true, target });
    });
}
