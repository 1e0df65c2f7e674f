// `klein bench int8-schemes --load`: what opening int8 weights costs. Eight [3072, 9216] int8 weights (226 M
// parameters), their scales and residuals (quantizeInt8Residual) lie in one file at 64 KiB-aligned offsets (ORT maps
// aligned external data) and again in one at unaligned offsets (as in a .safetensors cache, which ORT reads into
// memory); a graph multiplies one activation [1536, 3072] by all eight with the old scheme (DynamicQuantizeMatMul)
// or the new one (int8-linear.ts, one shared activation half), whose outlier rows Gather reads from `q` itself, from
// a second initializer of the same bytes, or from that plus the residual. Each configuration opens in a fresh process
// (RSS is per process): session create seconds, RssAnon / RssFile after create and after the first run, first run
// and best of 3.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Graph, type Value } from '../src/graph/onnx-graph.ts';
import { quantizeInt8, quantizeInt8Residual, quantizedLinear } from '../src/graph/quantize.ts';
import { int8Activation, int8Product } from '../src/graph/int8-linear.ts';
import { f32, ort, sessionOptions } from '../src/graph/session.ts';
import type { TensorInfo } from '../src/weights/safetensors.ts';
import { benchCacheDir } from './util.ts';

const [M, K, N, COUNT] = [1536, 3072, 9216, 8];
const ALIGN = 1 << 16;

interface ChildConfig {
  model: string;
  threads: number;
  prepack: boolean;
  /** Write the pre-packed weights into this file beside the optimized model (ORT's external pre-packed initializers). */
  savePrepacked?: string;
}

function rssKiB(): { anon: number; file: number } {
  const s = fs.readFileSync('/proc/self/status', 'utf8');
  const get = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(s)?.[1] ?? 0);
  return { anon: get('RssAnon'), file: get('RssFile') };
}

interface WeightInfos {
  q: TensorInfo;
  scale: TensorInfo;
  residual: { q: TensorInfo; scale: TensorInfo };
}

/**
 * The weights file: COUNT × (int8 [K, N], fp32 scale [N], residual int8 and scale), each at an ALIGN-aligned offset
 * plus `skew` bytes. Written once per skew.
 */
function weightsFile(dir: string, skew: number): WeightInfos[] {
  const file = path.join(dir, `weights-${skew}.bin`);
  const qBytes = Math.ceil((K * N + skew) / ALIGN) * ALIGN;
  const sBytes = Math.ceil((N * 4 + skew) / ALIGN) * ALIGN;
  const stride = 2 * (qBytes + sBytes);
  const at = (i: number, part: number) => i * stride + [0, qBytes, qBytes + sBytes, 2 * qBytes + sBytes][part] + skew;
  const t = (name: string, dtype: 'I8' | 'F32', shape: number[], dataOffset: number): TensorInfo => ({ name, dtype, shape, file, dataOffset, byteLength: shape.reduce((a, b) => a * b, 1) * (dtype === 'I8' ? 1 : 4) });
  const infos = Array.from({ length: COUNT }, (_, i) => ({
    q: t(`w${i}.int8`, 'I8', [K, N], at(i, 0)),
    scale: t(`w${i}.scale`, 'F32', [N], at(i, 1)),
    residual: { q: t(`w${i}.int8r`, 'I8', [K, N], at(i, 2)), scale: t(`w${i}.scaler`, 'F32', [N], at(i, 3)) },
  }));
  if (fs.existsSync(file) && fs.statSync(file).size === COUNT * stride) return infos;
  const fd = fs.openSync(`${file}.tmp`, 'w');
  let s = 99;
  const amp = Math.sqrt(3 / K);
  for (const { q, scale, residual } of infos) {
    const w = Float32Array.from({ length: N * K }, () => {
      s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
      return ((s / 2 ** 32) * 2 - 1) * amp;
    });
    const qw = quantizeInt8(w, N, K);
    const r = quantizeInt8Residual(w, qw);
    for (const [arr, info] of [[qw.q, q], [qw.scale, scale], [r.q, residual.q], [r.scale, residual.scale]] as const) {
      fs.writeSync(fd, new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength), 0, arr.byteLength, info.dataOffset);
    }
  }
  fs.ftruncateSync(fd, COUNT * stride);
  fs.closeSync(fd);
  fs.renameSync(`${file}.tmp`, file);
  return infos;
}

type Variant = 'old' | 'new' | 'new, rows from a 2nd initializer' | 'new, 2nd initializer + residual';

function buildModel(dir: string, variant: Variant, infos: WeightInfos[], tag: string): string {
  const g = new Graph('int8_load');
  const x = g.input('x', 'float32', [M, K]);
  const a = variant === 'old' ? undefined : int8Activation(g, x, { inFeatures: K });
  let sum: Value | undefined;
  infos.forEach((t, i) => {
    const w = { q: g.weight(t.q), scale: g.weight(t.scale), outFeatures: N };
    // a second initializer over the same bytes: its own name, so Graph.weight does not share it
    const rows = variant === 'new' || variant === 'old' ? undefined : { q: g.weight({ ...t.q, name: `${t.q.name}.rows` }), residual: variant === 'new, 2nd initializer + residual' ? { q: g.weight(t.residual.q), scale: g.weight(t.residual.scale) } : undefined };
    const y = a ? int8Product(g, a, { ...w, rows }) : quantizedLinear(g, x, { name: `w${i}`, inFeatures: K, outFeatures: N, location: '', initializers: w });
    sum = sum ? g.op('Add', [sum, y]) : y;
  });
  g.output(sum!, 'y', 'float32', [M, N]);
  const file = path.join(dir, `${tag}.onnx`);
  fs.writeFileSync(file, g.serialize(dir));
  return file;
}

/** One configuration, in this (fresh) process: prints one JSON line. */
async function child(c: ChildConfig): Promise<void> {
  const opts = sessionOptions({ threads: c.threads, lowMemory: true });
  const session: Record<string, string> = {};
  if (!c.prepack) session.disable_prepacking = '1';
  if (c.savePrepacked) {
    opts.optimizedModelFilePath = c.savePrepacked;
    // keys under extra.session become `session.<key>` session config entries
    session.save_external_prepacked_constant_initializers = '1';
    session.optimized_model_external_initializers_file_name = `${path.basename(c.savePrepacked)}.data`;
    session.optimized_model_external_initializers_min_size_in_bytes = '1024';
  }
  opts.extra = { session };
  opts.logSeverityLevel = 3;
  const before = rssKiB();
  const t0 = performance.now();
  const sess = await ort.InferenceSession.create(c.model, opts);
  const createS = (performance.now() - t0) / 1000;
  const afterCreate = rssKiB();
  const x = f32(Float32Array.from({ length: M * K }, (_, i) => Math.sin(i)), [M, K]);
  let t = performance.now();
  await sess.run({ x });
  const firstS = (performance.now() - t) / 1000;
  const afterRun = rssKiB();
  let best = Infinity;
  for (let i = 0; i < 3; i++) {
    t = performance.now();
    await sess.run({ x });
    best = Math.min(best, (performance.now() - t) / 1000);
  }
  await sess.release();
  console.log(JSON.stringify({ createS, firstS, bestS: best, before, afterCreate, afterRun }));
}

export async function runLoadBench(o: { threads: number }, log: (s: string) => void = console.log): Promise<void> {
  const dir = benchCacheDir('int8-load');
  const params = COUNT * K * N;
  const gop = (2 * M * K * N * COUNT) / 1e9;
  log(`eight [${K}, ${N}] int8 weights (${(params / 1e6).toFixed(0)} M parameters) in ${dir}, x [${M}, ${K}], ${o.threads} threads`);
  log('| weights | scheme | pre-packing | create s | RssAnon / RssFile after create, GiB | after first run | bytes/param (anon, file) | first run s | GOP/s (best of 3) |');
  log('|---|---|---|---|---|---|---|---|---|');
  const me = fileURLToPath(import.meta.url);
  const GiB = 1024 * 1024;
  const runs: Array<[string, Variant, string, (model: string, tag: string) => ChildConfig]> = [];
  for (const [where, skew] of [['64 KiB-aligned', 0], ['unaligned', 32]] as const) {
    for (const v of ['old', 'new', 'new, rows from a 2nd initializer', 'new, 2nd initializer + residual'] as const) {
      if (skew && v !== 'old' && v !== 'new') continue;
      runs.push([where, v, 'on', (model) => ({ model, threads: o.threads, prepack: true })]);
      if (skew) continue;
      runs.push([where, v, 'off', (model) => ({ model, threads: o.threads, prepack: false })]);
      if (v !== 'old' && v !== 'new, 2nd initializer + residual') continue;
      runs.push([where, v, 'on, saving the pre-packed weights', (model, tag) => ({ model, threads: o.threads, prepack: true, savePrepacked: path.join(dir, `${tag}.prepacked.onnx`) })]);
      runs.push([where, v, 'from the saved pre-packed model', (_, tag) => ({ model: path.join(dir, `${tag}.prepacked.onnx`), threads: o.threads, prepack: true })]);
    }
  }
  for (const [where, variant, label, config] of runs) {
    const skew = where === 'unaligned' ? 32 : 0;
    const tag = `${variant.replace(/[^a-z0-9]+/g, '-')}-${skew}`;
    const model = buildModel(dir, variant, weightsFile(dir, skew), tag);
    const r = spawnSync(process.execPath, ['--import', 'tsx', me, JSON.stringify(config(model, tag))], { encoding: 'utf8', maxBuffer: 1 << 24 });
    const line = r.stdout.trim().split('\n').pop() ?? '';
    if (r.status !== 0 || !line.startsWith('{')) {
      log(`| ${where} | ${variant} | ${label} | failed: ${(r.stderr || r.stdout).trim().split('\n').slice(-2).join(' ')} |`);
      continue;
    }
    const m = JSON.parse(line) as { createS: number; firstS: number; bestS: number; before: { anon: number; file: number }; afterCreate: { anon: number; file: number }; afterRun: { anon: number; file: number } };
    const g = (v: { anon: number; file: number }) => `${(v.anon / GiB).toFixed(2)} / ${(v.file / GiB).toFixed(2)}`;
    const per = `${(((m.afterRun.anon - m.before.anon) * 1024) / params).toFixed(2)}, ${(((m.afterRun.file - m.before.file) * 1024) / params).toFixed(2)}`;
    log(`| ${where} | ${variant} | ${label} | ${m.createS.toFixed(2)} | ${g(m.afterCreate)} | ${g(m.afterRun)} | ${per} | ${m.firstS.toFixed(2)} | ${(gop / m.bestS).toFixed(0)} |`);
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1]) && process.argv[2]?.startsWith('{')) {
  await child(JSON.parse(process.argv[2]) as ChildConfig);
}
