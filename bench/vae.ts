// `klein bench vae`: the FLUX.2 VAE at its real shapes (ch 128, mult [1,2,4,4], z 32; 84 M parameters) with random
// weights. Decode (and encode) seconds and peak RSS per size; tiled vs untiled error where both run. The device comes
// from KLEIN_DEVICE, the GPU dtype from KLEIN_GPU_DTYPE (fp16 by default on a GPU); both are printed, and on a GPU
// in fp16 `--compare-fp32` also decodes each size in fp32 on the same device and prints the difference. The last
// line is `seconds: <decode 1024² seconds>`.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { UsageError } from '../src/cli/errors.ts';
import { AUTO_TILE_ABOVE_PIXELS, Flux2VAE, FLUX2_VAE_CONFIG, planTiles, VAE_SCALE, writeRandomVaeCheckpoint, DEFAULT_MAX_TILE, DEFAULT_TILE_OVERLAP } from '../src/models/flux2-vae.ts';

/**
 * Peak RSS since the last `resetPeakRss()`, in GiB. Linux lets a process reset its own high-water mark by writing
 * 5 to /proc/self/clear_refs, so each size gets its own peak; elsewhere this is the process-lifetime peak.
 */
function peakRssGiB(): number {
  try {
    const m = fs.readFileSync('/proc/self/status', 'utf8').match(/VmHWM:\s+(\d+) kB/);
    if (m) return Number(m[1]) / 1024 / 1024;
  } catch {
    /* not Linux */
  }
  return process.resourceUsage().maxRSS / 1024 / 1024;
}

function resetPeakRss(): void {
  try {
    fs.writeFileSync('/proc/self/clear_refs', '5');
  } catch {
    /* not Linux: peaks are cumulative */
  }
}

/** Seeded smooth-ish random input in [-1, 1] (an image or a normalised latent). */
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
function diffStats(a: Float32Array, b: Float32Array): { max: number; mean: number; rmsRel: number } {
  let max = 0;
  let sum = 0;
  let sq = 0;
  let ref = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (d > max) max = d;
    sum += d;
    sq += d * d;
    ref += b[i] * b[i];
  }
  return { max, mean: sum / a.length, rmsRel: Math.sqrt(sq / ref) };
}

interface VaeBenchOptions {
  sizes: string;
  encode: boolean;
  dir?: string;
  threads?: string;
  tiling: string;
  compareTiled: boolean;
  compareFp32?: boolean;
}

export async function runVaeBench(opts: VaeBenchOptions): Promise<void> {
  const sizes = opts.sizes.split(',').map((s) => Number(s.trim()));
  if (sizes.some((s) => !Number.isInteger(s) || s < 16 || s % VAE_SCALE)) throw new UsageError(`--sizes must be multiples of ${VAE_SCALE}, e.g. 512,1024,2048; got "${opts.sizes}"`);
  if (!['auto', 'always', 'never'].includes(opts.tiling)) throw new UsageError(`--tiling must be auto, always or never; got "${opts.tiling}"`);
  const threads = opts.threads ? Number(opts.threads) : undefined;
  if (threads !== undefined && !(Number.isInteger(threads) && threads > 0)) throw new UsageError(`--threads must be a positive integer; got "${opts.threads}"`);
  const dir = opts.dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'klein-bench-vae-'));
  const file = path.join(dir, 'ae.safetensors');
  const cleanup = !opts.dir;
  try {
    if (!fs.existsSync(file)) {
      console.log(`writing a random FLUX.2 VAE (real shapes, fp32) to ${file} …`);
      writeRandomVaeCheckpoint(file, FLUX2_VAE_CONFIG, { layout: 'bfl', seed: 1 });
    }
    let t = performance.now();
    const vae = await Flux2VAE.load(file, { threads });
    console.log(`load (graphs + sessions): ${((performance.now() - t) / 1000).toFixed(2)} s, ${ort_threads(threads)}`);
    console.log(`device: ${vae.device}, convs in ${vae.computeDtype}${vae.computeDtype === 'fp16' ? ` (${vae.fp16Overflows} weights clamped to ±65504)` : ''}`);
    if (opts.compareFp32 && vae.computeDtype !== 'fp16') throw new UsageError(`--compare-fp32 compares the fp16 GPU path with fp32; this run computes in ${vae.computeDtype} on ${vae.device} (use KLEIN_DEVICE=webgpu or cuda)`);
    const fp32 = opts.compareFp32 ? await Flux2VAE.load(file, { threads, only: 'decoder', gpuDtype: 'fp32' }) : undefined;
    let decode1024: number | undefined;
    for (const size of sizes) {
      const n = size / VAE_SCALE;
      if (opts.encode) {
        const img = randomInput(3 * size * size, size, 1);
        resetPeakRss();
        t = performance.now();
        const enc = await vae.encode(img, [1, 3, size, size]);
        const s = (performance.now() - t) / 1000;
        console.log(`encode ${size}×${size}: ${s.toFixed(2)} s, peak RSS ${peakRssGiB().toFixed(2)} GiB → latent [${enc.dims.join(', ')}]`);
      }
      const latent = randomInput(128 * n * n, size + 7, 1.5);
      resetPeakRss();
      const tiled = opts.tiling === 'always' || (opts.tiling === 'auto' && size * size > AUTO_TILE_ABOVE_PIXELS);
      const plan = planTiles(n, DEFAULT_MAX_TILE, DEFAULT_TILE_OVERLAP);
      t = performance.now();
      const dec = await vae.decode(latent, [1, 128, n, n], { tiling: opts.tiling as 'auto' | 'always' | 'never' });
      const s = (performance.now() - t) / 1000;
      const how = tiled && plan.starts.length > 1 ? `tiled ${plan.starts.length}×${plan.starts.length} tiles of ${plan.size * VAE_SCALE} px` : 'untiled';
      console.log(`decode ${size}×${size} (${how}): ${s.toFixed(2)} s, peak RSS ${peakRssGiB().toFixed(2)} GiB → image [${dec.dims.join(', ')}]`);
      if (size === 1024) decode1024 = s;
      if (fp32) {
        t = performance.now();
        const ref = await fp32.decode(latent, [1, 128, n, n], { tiling: opts.tiling as 'auto' | 'always' | 'never' });
        const s32 = (performance.now() - t) / 1000;
        const d = diffStats(dec.image, ref.image);
        console.log(`decode ${size}×${size} in fp32 on ${vae.device}: ${s32.toFixed(2)} s; fp16 vs fp32 max |Δ| ${d.max.toFixed(4)}, mean |Δ| ${d.mean.toFixed(5)}, rms rel ${d.rmsRel.toExponential(2)}`);
      }
      if (opts.compareTiled && !tiled && n > 16) {
        // the same latent through 2×2 tiles (the smallest tiling), to measure what tiling costs in accuracy
        const maxTile = Math.ceil((n + DEFAULT_TILE_OVERLAP) / 2);
        resetPeakRss();
        t = performance.now();
        const tl = await vae.decode(latent, [1, 128, n, n], { tiling: 'always', maxTile, overlap: DEFAULT_TILE_OVERLAP });
        const st = (performance.now() - t) / 1000;
        const d = diffStats(tl.image, dec.image);
        console.log(`decode ${size}×${size} tiled 2×2 (tiles of ${maxTile * VAE_SCALE} px, overlap ≥ ${DEFAULT_TILE_OVERLAP * VAE_SCALE} px): ${st.toFixed(2)} s, peak RSS ${peakRssGiB().toFixed(2)} GiB; vs untiled max |Δ| ${d.max.toFixed(4)}, mean |Δ| ${d.mean.toFixed(5)} (image range [-1, 1])`);
      }
    }
    await vae.close();
    await fp32?.close();
    if (decode1024 === undefined) console.log('seconds: n/a (1024 not in --sizes)');
    else console.log(`seconds: ${decode1024.toFixed(2)}`);
  } finally {
    if (cleanup) fs.rmSync(dir, { recursive: true, force: true });
  }
}

function ort_threads(threads?: number): string {
  return `${threads ?? Number(process.env.KLEIN_THREADS ?? os.availableParallelism())} threads`;
}

export function registerVaeBench(bench: Command): void {
  bench
    .command('vae')
    .description('FLUX.2 VAE decode/encode at real shapes with random weights: seconds and peak RSS per size; last line "seconds: <decode 1024² s>"')
    .option('--sizes <list>', 'square image sizes in pixels', '512,1024,2048')
    .option('--no-encode', 'skip the encoder')
    .option('--tiling <mode>', 'decoder tiling: auto (above 1536²), always, never', 'auto')
    .option('--compare-tiled', 'also decode each untiled size in 2×2 tiles and print the difference')
    .option('--compare-fp32', 'GPU in fp16: also decode each size in fp32 on the same device and print the difference')
    .option('--dir <dir>', 'keep the random checkpoint (and compiled graphs) in this folder')
    .option('--threads <n>', 'ORT intra-op threads (default: all cores)')
    .action(async (o: VaeBenchOptions) => runVaeBench(o));
}
