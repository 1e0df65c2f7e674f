// `klein bench transformer --lora FILE[:SCALE] … | --random-loras N`: the transformer step with LoRAs applied as
// side products (models/flux2/lora/apply.ts) beside the base step the bench already timed: seconds per step with
// the first LoRA and with all of them, the time to open the LoRA sessions, to load the files and to switch between
// sets (feeds only), and the memory of the LoRA sessions beside the base ones.
import fs from 'node:fs';
import path from 'node:path';
import type { Flux2Config } from '../src/models/flux2/config.ts';
import type { Flux2Context, Flux2ForwardInput, Flux2Transformer } from '../src/models/flux2/runtime.ts';
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

type Times = { wall: number; cpu: number };

/**
 * Best wall and CPU seconds per step of each context, their steps interleaved round by round (base, LoRA, base, …):
 * on the shared machine load and the page cache of the mapped weights change within minutes, so a comparison of
 * timings taken one after the other says more about the machine than about the LoRA.
 */
async function interleavedSteps(model: Flux2Transformer, inp: Flux2ForwardInput, contexts: Flux2Context[], rounds: number): Promise<Times[]> {
  const best = contexts.map(() => ({ wall: Infinity, cpu: Infinity }));
  for (let r = 0; r < rounds; r++) {
    for (const [i, context] of contexts.entries()) {
      const cpu0 = process.cpuUsage();
      const [wall] = await seconds(() => model.step(inp, context));
      const cpu = process.cpuUsage(cpu0);
      best[i] = { wall: Math.min(best[i].wall, wall), cpu: Math.min(best[i].cpu, (cpu.user + cpu.system) / 1e6) };
    }
  }
  return best;
}

/** `wall s (±x % vs base), CPU s (±y %)`: on a shared machine the CPU time is the steadier figure. */
function versus(t: Times, base: Times): string {
  return `${t.wall.toFixed(3)} s (${pct(t.wall, base.wall)}), CPU ${t.cpu.toFixed(3)} s (${pct(t.cpu, base.cpu)})`;
}

/**
 * Multiply-adds of a set's side products in one step, ×2: each module's x·Aᵀ and (x·Aᵀ)·Bᵀ for the tokens its Linear
 * sees (text-stream Linears the text tokens, image-stream ones the image tokens, single blocks both, modulations one
 * row). The graph computes a little more where modules of a fused weight have their own ranks (their up products
 * share the set's rank).
 */
function loraStepFlops(set: readonly AppliedLora[], inp: Flux2ForwardInput): number {
  const tokens = (w: string) => (/^(txt_in|double_blocks\.\d+\.txt_)/.test(w) ? inp.nCtx : /^(img_in|final_layer\.linear|double_blocks\.\d+\.img_)/.test(w) ? inp.nTokens : /^single_blocks/.test(w) ? inp.nCtx + inp.nTokens : 1);
  return set.reduce((n, a) => n + a.lora.targets.reduce((m, t) => m + 2 * tokens(t.weight) * t.rank * (t.inFeatures + t.outFeatures), 0), 0) * inp.batch;
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

/** Runs the LoRA part of the bench on a loaded model: `steps` rounds of interleaved steps. */
export async function benchLoras(model: Flux2Transformer, inp: Flux2ForwardInput, specs: LoraBenchSpec[], steps: number, stepFlops: number, log: (s: string) => void): Promise<void> {
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
  // a context per set, each prepared under its set (switch time measured), then their steps interleaved
  const sets: Array<{ label: string; set: AppliedLora[] }> = [
    { label: 'without LoRA (base sessions)', set: [] },
    { label: 'LoRA sessions, every Linear at rank 0 but one at rank 1', set: [nearlyEmptyLora(cfg)] },
    ...[...new Set([1, loaded.length])].map((k) => ({ label: `with ${k} LoRA${k > 1 ? 's' : ''}`, set: loaded.slice(0, k) })),
  ];
  const contexts: Flux2Context[] = [];
  try {
    for (const { label, set } of sets) {
      const [switchS] = await seconds(() => model.setLoras(set));
      if (set.length && set !== sets[1].set) log(`switch to the set ${label}: ${switchS.toFixed(2)} s`);
      contexts.push(await model.prepareContext(inp));
    }
    const times = await interleavedSteps(model, inp, contexts, steps);
    for (const k of [1, loaded.length]) {
      const gflop = loraStepFlops(loaded.slice(0, k), inp) / 1e9;
      log(`LoRA FLOPs per step with ${k} LoRA${k > 1 ? 's' : ''}: ${gflop.toFixed(1)} GFLOP (+${((100 * gflop * 1e9) / stepFlops).toFixed(2)} % of the step's)`);
    }
    log(`seconds/step ${sets[0].label}: ${times[0].wall.toFixed(3)} s, CPU ${times[0].cpu.toFixed(3)} s (best of ${steps}, interleaved with the LoRA steps)`);
    for (let i = 1; i < sets.length; i++) log(`seconds/step ${sets[i].label}: ${versus(times[i], times[0])}`);
    if (model.target.device !== 'cpu') log(`host transfers per LoRA step: ${model.lastTransfers.uploads} uploads, ${model.lastTransfers.downloads} downloads`);
  } finally {
    for (const c of contexts) c.dispose();
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
