// `klein bench transformer --lora FILE[:SCALE] … | --random-loras N`: the transformer step with LoRAs applied as
// side products (models/flux2/lora/apply.ts) beside the base step the bench already timed: seconds per step with
// the first LoRA and with all of them, the time to open the LoRA sessions, to load the files and to switch between
// sets (feeds only), and the memory of the LoRA sessions beside the base ones.
import fs from 'node:fs';
import path from 'node:path';
import type { Flux2Config } from '../src/models/flux2/config.ts';
import type { Flux2ForwardInput, Flux2Transformer } from '../src/models/flux2/runtime.ts';
import { loadLora, type AppliedLora, type LoadedLora } from '../src/models/flux2/lora/load.ts';
import { writeRandomLora } from '../src/fixtures/lora.ts';
import { GiB, MemorySampler, benchCacheDir, formatMemory, memoryNow, seconds } from './util.ts';

export interface LoraBenchSpec {
  file: string;
  scale: number;
}

/** `n` random LoRAs of rank `rank` at the config's width, written once into the bench cache. */
export function randomLoraFiles(cfg: Flux2Config, n: number, rank: number, log: (s: string) => void): LoraBenchSpec[] {
  const dir = benchCacheDir(`lora-h${cfg.hiddenSize}-d${cfg.depth}-s${cfg.depthSingleBlocks}-r${rank}`);
  return Array.from({ length: n }, (_, i) => {
    const file = path.join(dir, `random-${i}.safetensors`);
    if (!fs.existsSync(file)) {
      log(`writing random rank-${rank} LoRA ${file} (once)…`);
      writeRandomLora(file, cfg, { rank, seed: 100 + i });
    }
    return { file, scale: 1 };
  });
}

/** Best wall and CPU seconds per step over `steps` steps on a context prepared with the current LoRA set. */
async function stepSeconds(model: Flux2Transformer, inp: Flux2ForwardInput, steps: number): Promise<{ wall: number; cpu: number }> {
  const context = await model.prepareContext(inp);
  const best = { wall: Infinity, cpu: Infinity };
  try {
    for (let i = 0; i < steps; i++) {
      const cpu0 = process.cpuUsage();
      best.wall = Math.min(best.wall, (await seconds(() => model.step(inp, context)))[0]);
      const cpu = process.cpuUsage(cpu0);
      best.cpu = Math.min(best.cpu, (cpu.user + cpu.system) / 1e6);
    }
  } finally {
    context.dispose();
  }
  return best;
}

/** `wall s (±x % vs base), CPU s (±y %)`: on a shared machine the CPU time is the steadier figure. */
function versus(t: { wall: number; cpu: number }, base: { wall: number; cpu: number }): string {
  return `${t.wall.toFixed(3)} s (${pct(t.wall, base.wall)}), CPU ${t.cpu.toFixed(3)} s (${pct(t.cpu, base.cpu)})`;
}

/** A one-Linear rank-1 zero LoRA: the LoRA sessions with (almost) every Linear at rank 0. */
function nearlyEmptyLora(cfg: Flux2Config): AppliedLora {
  const H = cfg.hiddenSize;
  const lora: LoadedLora = {
    file: '(in memory)',
    format: 'rank-1 img_in only',
    metadata: {},
    targets: [{ weight: 'img_in.weight', rank: 1, inFeatures: cfg.inChannels, outFeatures: H, down: new Float32Array(cfg.inChannels), up: new Float32Array(H), alpha: 1, module: 'img_in' }],
  };
  return { lora, scale: 1 };
}

/** Runs the LoRA part of the bench on a loaded model whose base step took `baseStep` seconds. */
export async function benchLoras(model: Flux2Transformer, inp: Flux2ForwardInput, specs: LoraBenchSpec[], steps: number, log: (s: string) => void): Promise<void> {
  const cfg = model.config;
  const bytes = specs.reduce((n, s) => n + fs.statSync(s.file).size, 0);
  const [loadS, loaded] = await seconds(() => specs.map((s): AppliedLora => ({ lora: loadLora(s.file, cfg), scale: s.scale })));
  const ranks = loaded.map((l) => Math.max(...l.lora.targets.map((t) => t.rank)));
  log(`LoRA files: ${loaded.length} (${(bytes / 2 ** 20).toFixed(0)} MiB, ranks ${ranks.join(', ')}, ${loaded[0].lora.targets.length} modules in the first) read and checked in ${loadS.toFixed(2)} s`);
  const before = memoryNow();
  const pssBefore = pss();
  const [openS] = await seconds(() => model.setLoras([nearlyEmptyLora(cfg)]));
  log(`LoRA sessions opened in ${openS.toFixed(2)} s (once per process; the base sessions stay open)`);
  const mem = new MemorySampler();
  const emptyStep = await stepSeconds(model, inp, steps);
  await model.setLoras([]);
  // the base step again, now, so both sides of every comparison saw the same machine load
  const baseStep = await stepSeconds(model, inp, steps);
  log(`seconds/step without LoRA (base sessions, timed again): ${baseStep.wall.toFixed(3)} s, CPU ${baseStep.cpu.toFixed(3)} s`);
  log(`seconds/step, LoRA sessions with every Linear at rank 0 but one (rank 1): ${versus(emptyStep, baseStep)}`);
  const counts = [...new Set([1, loaded.length])];
  for (const k of counts) {
    const [switchS] = await seconds(() => model.setLoras(loaded.slice(0, k)));
    const step = await stepSeconds(model, inp, steps);
    log(`seconds/step with ${k} LoRA${k > 1 ? 's' : ''}: ${versus(step, baseStep)}; switch to this set ${switchS.toFixed(2)} s`);
    if (model.target.device !== 'cpu') log(`host transfers per step with ${k} LoRA${k > 1 ? 's' : ''}: ${model.lastTransfers.uploads} uploads, ${model.lastTransfers.downloads} downloads`);
  }
  const [backS] = await seconds(() => model.setLoras(loaded.slice(0, 1)));
  const [offS] = await seconds(() => model.setLoras([]));
  const [againS] = await seconds(() => model.setLoras(loaded.slice(0, 1)));
  log(`switch ${loaded.length} → 1 LoRA: ${backS.toFixed(2)} s; → no LoRA: ${(offS * 1000).toFixed(1)} ms; → the same LoRA again: ${(againS * 1000).toFixed(1)} ms (feeds kept); a file not read before adds ${(loadS / loaded.length).toFixed(2)} s`);
  const peak = mem.stop();
  const after = memoryNow();
  const pssAfter = pss();
  const gib = (b: number) => (b / GiB).toFixed(2);
  log(`peak RSS while stepping with LoRAs: ${formatMemory(peak)}; the LoRA sessions and feeds added ${gib(after.anon - before.anon)} GiB anonymous, ${gib(after.file - before.file)} GiB file-backed RSS`);
  log(`proportional set size (a page mapped by both sessions counted once): anonymous ${gib(pssBefore.anon)} → ${gib(pssAfter.anon)} GiB, file-backed ${gib(pssBefore.file)} → ${gib(pssAfter.file)} GiB`);
}

/**
 * Proportional set size, anonymous and file-backed (bytes): two sessions mapping one weights file count its pages
 * twice in RSS but once here, as the machine holds them.
 */
function pss(): { anon: number; file: number } {
  try {
    const s = fs.readFileSync('/proc/self/smaps_rollup', 'utf8');
    const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(s)?.[1] ?? 0) * 1024;
    return { anon: kb('Pss_Anon'), file: kb('Pss_File') };
  } catch {
    return { anon: NaN, file: NaN };
  }
}

function pct(x: number, base: number): string {
  const p = (x / base - 1) * 100;
  return `${p >= 0 ? '+' : ''}${p.toFixed(1)} %`;
}
