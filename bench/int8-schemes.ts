// `klein bench int8-schemes`: the int8 activation schemes of issue 21 compared op by op at klein's real Linear
// shapes, on activations drawn like the random model's and like the stress model's (src/fixtures/stress-outliers.ts):
// relative rms and max error against the fp32 product, and GOP/s (2·M·K·N / s, best of --runs). One line per
// shape × scheme. The weights reach ORT in memory (its `externalData` option), not through a weight store: each
// scheme's tensors are made here, for one product at a time.
import os from 'node:os';
import type { Command } from 'commander';
import { Graph, MS_DOMAIN, type ElemType, type ExternalLocation, type Value } from '../src/graph/onnx-graph.ts';
import type { WeightRef } from '../src/weights/weight-ref.ts';
import type { Int8Quantizer, Int8Weight } from '../src/weights/quantize.ts';
import { createQuantizer } from '../src/runtime/int8-quantizer.ts';
import { ELEM_SIZE } from '../src/weights/dtypes.ts';
import { int8Activation, int8Product } from '../src/graph/int8-linear.ts';
import { f32, ort, sessionOptions } from '../src/runtime/session.ts';
import { relativeError } from '../src/conform/compare.ts';
import { OUTLIER_CHANNEL_FACTORS, drawLinearInput, outlierChannels, seededRandom } from '../src/fixtures/stress-outliers.ts';
import { UsageError } from '../src/cli/errors.ts';

/** The products of klein's Linears: FLUX.2 at 1024 image + 512 text tokens, Qwen3-4B at one 512-token prompt. */
export const INT8_SHAPES: Array<{ M: number; K: number; N: number; what: string; model: 'flux2' | 'qwen3' }> = [
  { M: 1536, K: 3072, N: 9216, what: 'flux2 linear1 gate|up, mlp.0', model: 'flux2' },
  { M: 1536, K: 3072, N: 3072, what: 'flux2 q, k, v, proj', model: 'flux2' },
  { M: 1536, K: 9216, N: 3072, what: 'flux2 mlp.2, linear2 (SwiGLU input)', model: 'flux2' },
  { M: 512, K: 2560, N: 9728, what: 'qwen3 gate, up', model: 'qwen3' },
  { M: 512, K: 9728, N: 2560, what: 'qwen3 down_proj (SwiGLU input)', model: 'qwen3' },
];

/** A Linear weight `[N, K]`, uniform with std 1/√K like the random checkpoints. */
function drawWeight(N: number, K: number): Float32Array {
  const r = seededRandom(11);
  const a = Math.sqrt(3 / K);
  return Float32Array.from({ length: N * K }, () => (r.uniform() * 2 - 1) * a);
}

/** Per-input-channel max |x| over rows. */
function channelAbsMax(x: Float32Array, K: number): Float32Array {
  const m = new Float32Array(K);
  for (let i = 0; i < x.length; i++) m[i % K] = Math.max(m[i % K], Math.abs(x[i]));
  return m;
}

interface Product {
  M: number;
  K: number;
  N: number;
  w: Float32Array;
  /** Activations the product is measured on. */
  x: Float32Array;
  /** Drawn like the stress model's. */
  stress: boolean;
}

/** One scheme: the graph of `x Wᵀ` and the bytes of its initializers. */
interface Scheme {
  name: string;
  build(g: Graph, x: Value, p: Product, data: Array<{ path: string; data: Uint8Array }>): Value | Promise<Value>;
  /** The activations the graph is fed (default x; SmoothQuant feeds x / s, the division folded into the norm before it). */
  feed?(p: Product): Float32Array;
}

const bytes = (a: Float32Array | Int16Array | Int8Array | Uint8Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** A weight whose bytes the session gets in memory as `mem/<key>` (no stored source: never in a weight store). */
function inMemoryWeight(g: Graph, key: string, type: ElemType, dims: number[]): Value {
  return g.weight({ key, type, dims, source: { parts: [] }, transform: { kind: 'convert' } });
}

/** Where `inMemoryWeight`'s bytes are: all of `mem/<key>`. */
function inMemoryLocation(ref: WeightRef): ExternalLocation {
  return { location: `mem/${ref.key}`, offset: 0, length: ref.dims.reduce((a, b) => a * b, 1) * ELEM_SIZE[ref.type] };
}

/** `quantizeInt8`'s tensors as in-memory external data: `<prefix>.int8` and `<prefix>.scale`. */
function int8ExternalData(prefix: string, qw: Int8Weight): Array<{ path: string; data: Uint8Array }> {
  return [{ path: `${prefix}.int8`, data: bytes(qw.q) }, { path: `${prefix}.scale`, data: bytes(qw.scale) }];
}

let quantizer: Promise<Int8Quantizer> | undefined;

/** The int8 scheme's tensors of `w` (the weight stores' quantizer, on every core). */
async function quantizeInt8(w: Float32Array, N: number, K: number, rows = false) {
  quantizer ??= createQuantizer(os.availableParallelism());
  return (await quantizer).quantize(w, N, K, { rows });
}

async function int8Weights(g: Graph, w: Float32Array, N: number, K: number, data: Array<{ path: string; data: Uint8Array }>, tag = 'w') {
  const qw = await quantizeInt8(w, N, K);
  data.push(...int8ExternalData(`mem/${tag}`, qw));
  return { q: inMemoryWeight(g, `${tag}.int8`, 'int8', [K, N]), scale: inMemoryWeight(g, `${tag}.scale`, 'float32', [N]), outFeatures: N };
}

/** SmoothQuant's factor, α = 0.5, from the activations themselves (calibration on the measured data: its best case). */
function smoothFactor(p: Product): Float32Array {
  const ax = channelAbsMax(p.x, p.K);
  const aw = new Float32Array(p.K);
  for (let i = 0; i < p.w.length; i++) aw[i % p.K] = Math.max(aw[i % p.K], Math.abs(p.w[i]));
  return Float32Array.from(ax, (a, k) => Math.max(1e-5, Math.sqrt(a / Math.max(aw[k], 1e-8))));
}

const perRow = (topK: number): Scheme['build'] => async (g, x, p, data) => int8Product(g, int8Activation(g, x, { inFeatures: p.K, outlierChannels: topK }), await int8Weights(g, p.w, p.N, p.K, data));

export const SCHEMES: Scheme[] = [
  {
    name: 'fp32 MatMul',
    build: (g, x, p, data) => {
      const wt = new Float32Array(p.K * p.N);
      for (let n = 0; n < p.N; n++) for (let k = 0; k < p.K; k++) wt[k * p.N + n] = p.w[n * p.K + k];
      data.push({ path: 'mem/wt', data: bytes(wt) });
      return g.op('MatMul', [x, inMemoryWeight(g, 'wt', 'float32', [p.K, p.N])]);
    },
  },
  {
    name: 'old: DynamicQuantizeMatMul (per tensor)',
    build: async (g, x, p, data) => {
      const w = await int8Weights(g, p.w, p.N, p.K, data);
      return g.op('DynamicQuantizeMatMul', [x, w.q, w.scale], {}, { domain: MS_DOMAIN });
    },
  },
  {
    name: 'per row: x/rowmax → DynamicQuantizeMatMul → ×rowmax',
    build: async (g, x, p, data) => {
      const w = await int8Weights(g, p.w, p.N, p.K, data);
      const ax = g.constI64([-1]);
      const r = g.op('Max', [g.op('Max', [g.op('ReduceMax', [x, ax], { keepdims: 1 }), g.op('Neg', [g.op('ReduceMin', [x, ax], { keepdims: 1 })])]), g.scalarF32(1e-30)]);
      return g.op('Mul', [g.op('DynamicQuantizeMatMul', [g.op('Div', [x, r]), w.q, w.scale], {}, { domain: MS_DOMAIN }), r]);
    },
  },
  { name: 'per row: QuantizeLinear → MatMulIntegerToFloat', build: perRow(0) },
  { name: 'per row + norm weights folded into W (SwiGLU inputs: nothing to fold)', build: (g, x, p, data) => perRowSmoothed(g, x, p, data, normFactor(p)), feed: (p) => divideChannels(p.x, normFactor(p)) },
  { name: 'per row + SmoothQuant α=0.5 (calibrated on this x)', build: (g, x, p, data) => perRowSmoothed(g, x, p, data), feed: (p) => divideChannels(p.x, smoothFactor(p)) },
  { name: 'per row + 16 outlier channels fp32', build: perRow(16) },
  { name: 'per row + 32 outlier channels fp32', build: perRow(32) },
  {
    name: 'per row + 16 outlier channels fp32, rows exact (int16 rows)',
    build: async (g, x, p, data) => {
      const w = await int8Weights(g, p.w, p.N, p.K, data);
      const rows = (await quantizeInt8(p.w, p.N, p.K, true)).rows!;
      data.push({ path: 'mem/rows.int16', data: bytes(rows.values) }, { path: 'mem/rows.scale', data: bytes(rows.scale) });
      const exact = { values: inMemoryWeight(g, 'rows.int16', 'int16', [p.K, p.N]), scale: inMemoryWeight(g, 'rows.scale', 'float32', [p.N]) };
      return int8Product(g, int8Activation(g, x, { inFeatures: p.K, outlierChannels: 16 }), { ...w, rows: exact });
    },
  },
  {
    name: 'per tensor + 16 outlier channels fp32',
    build: async (g, x, p, data) => perTensorTop(g, x, p, await int8Weights(g, p.w, p.N, p.K, data), 16),
  },
  { name: 'MatMulNBits 8 bit, block 32, accuracy 4', build: (g, x, p, data) => matMulNBits(g, x, p, data, 32) },
  { name: 'MatMulNBits 8 bit, block 128, accuracy 4', build: (g, x, p, data) => matMulNBits(g, x, p, data, 128) },
];

function divideChannels(x: Float32Array, s: Float32Array): Float32Array {
  const K = s.length;
  return Float32Array.from(x, (v, i) => v / s[i % K]);
}

/**
 * The stress model's RMSNorm / adaLN channel factors (what folding the norm weights into W moves there), 1 for the
 * random draws and for SwiGLU inputs (no norm before them).
 */
function normFactor(p: Product): Float32Array {
  const s = new Float32Array(p.K).fill(1);
  if (p.K < 4000 && p.stress) outlierChannels(p.K, OUTLIER_CHANNEL_FACTORS.length).forEach((c, i) => (s[c] = OUTLIER_CHANNEL_FACTORS[i]));
  return s;
}

async function perRowSmoothed(g: Graph, x: Value, p: Product, data: Array<{ path: string; data: Uint8Array }>, s = smoothFactor(p)): Promise<Value> {
  const ws = Float32Array.from(p.w, (v, i) => v * s[i % p.K]);
  return int8Product(g, int8Activation(g, x, { inFeatures: p.K, outlierChannels: 0 }), await int8Weights(g, ws, p.N, p.K, data));
}

/** Outlier channels in fp32 and DynamicQuantizeMatMul's per-tensor scale for the rest. */
function perTensorTop(g: Graph, x: Value, p: Product, w: { q: Value; scale: Value }, k: number): Value {
  const ax0 = g.constI64([0]);
  const cmax = g.op('Max', [g.op('ReduceMax', [x, ax0], { keepdims: 0 }), g.op('Neg', [g.op('ReduceMin', [x, ax0], { keepdims: 0 })])]);
  const [, idx] = g.opN('TopK', [cmax, g.constI64([k])], 2, { sorted: 0 });
  const mask = g.op('ScatterElements', [g.constF32(new Float32Array(p.K).fill(1), [p.K]), idx, g.constF32(new Float32Array(k), [k])], { axis: 0 });
  const rows = g.op('Mul', [g.op('Cast', [g.op('Gather', [w.q, idx], { axis: 0 })], { to: 1 }), w.scale]);
  const y = g.op('DynamicQuantizeMatMul', [g.op('Mul', [x, mask]), w.q, w.scale], {}, { domain: MS_DOMAIN });
  return g.op('Gemm', [g.op('Gather', [x, idx], { axis: 1 }), rows, y]);
}

/** MatMulNBits with 8-bit weights, symmetric per (column, K block), int8 activations per block (accuracy level 4). */
function matMulNBits(g: Graph, x: Value, p: Product, data: Array<{ path: string; data: Uint8Array }>, block: number): Value {
  const { K, N, w } = p;
  const nb = Math.ceil(K / block);
  const B = new Uint8Array(N * nb * block).fill(128);
  const S = new Float32Array(N * nb);
  for (let n = 0; n < N; n++) {
    for (let b = 0; b < nb; b++) {
      let mx = 0;
      for (let k = b * block; k < Math.min(K, (b + 1) * block); k++) mx = Math.max(mx, Math.abs(w[n * K + k]));
      const s = mx / 127 || 1;
      S[n * nb + b] = s;
      for (let k = b * block; k < Math.min(K, (b + 1) * block); k++) B[(n * nb + b) * block + k - b * block] = Math.round(w[n * K + k] / s) + 128;
    }
  }
  data.push({ path: 'mem/nbits', data: B }, { path: 'mem/nbits.scale', data: bytes(S) });
  const Bv = inMemoryWeight(g, 'nbits', 'uint8', [N, nb, block]);
  const Sv = inMemoryWeight(g, 'nbits.scale', 'float32', [N * nb]);
  return g.op('MatMulNBits', [x, Bv, Sv], { K, N, bits: 8, block_size: block, accuracy_level: 4 }, { domain: MS_DOMAIN });
}

interface Row {
  shape: string;
  scheme: string;
  random: { rms: number; max: number };
  stress: { rms: number; max: number };
  /** 2·M·K·N over the best wall time, and over the best CPU time per thread (what the cores did, whatever the load). */
  gops: number;
  gopsCpu: number;
}

/**
 * Opens `scheme` at shape p, runs it on both draws (errors against `refs`) and times it on the random draw (best
 * of `runs`). Timed runs fetch only the product's sum, so the output is not copied out to JS (a fresh 57 MB buffer
 * costs ~0.3 s in page faults here); ORT's threads do not spin, so CPU time counts work.
 */
async function measure(scheme: Scheme, shape: (typeof INT8_SHAPES)[number], draws: { random: Product; stress: Product }, refs: { random?: Float32Array; stress?: Float32Array }, runs: number, threads: number): Promise<Row & { out: { random: Float32Array; stress: Float32Array } }> {
  const { M, K, N } = shape;
  const outs: Record<string, Float32Array> = {};
  let best = Infinity;
  let bestCpu = Infinity;
  for (const which of ['random', 'stress'] as const) {
    const p = draws[which];
    const g = new Graph('int8_scheme');
    const data: Array<{ path: string; data: Uint8Array }> = [];
    const y = await scheme.build(g, g.input('x', 'float32', [M, K]), p, data);
    g.output(y, 'y', [M, N]);
    g.output(g.op('ReduceSum', [y], { keepdims: 0 }), 'sum', []);
    const opts = { ...sessionOptions({ device: 'cpu', threads, prepack: true }), externalData: data, logSeverityLevel: 3 as const, extra: { session: { 'intra_op.allow_spinning': '0' } } };
    const sess = await ort.InferenceSession.create(g.serialize(inMemoryLocation), opts);
    try {
      const x = f32(scheme.feed ? scheme.feed(p) : p.x, [M, K]);
      outs[which] = (await sess.run({ x }, ['y'])).y.data as Float32Array;
      if (which === 'random') {
        await sess.run({ x }, ['sum']); // a first run with other fetches plans and allocates anew: not timed
        for (let i = 0; i < runs; i++) {
          const c0 = process.cpuUsage();
          const t0 = performance.now();
          await sess.run({ x }, ['sum']);
          best = Math.min(best, (performance.now() - t0) / 1000);
          const c = process.cpuUsage(c0);
          bestCpu = Math.min(bestCpu, (c.user + c.system) / 1e6);
        }
      }
    } finally {
      await sess.release();
    }
  }
  const err = (which: 'random' | 'stress') => (refs[which] ? relativeError(outs[which], refs[which]!) : { rms: 0, max: 0 });
  const ops = 2 * M * K * N;
  return { shape: `[${M}, ${K}] × [${K}, ${N}]`, scheme: scheme.name, random: err('random'), stress: err('stress'), gops: ops / best / 1e9, gopsCpu: ops / (bestCpu / threads) / 1e9, out: { random: outs.random, stress: outs.stress } };
}

const pct = (v: number) => `${(v * 100).toFixed(2)} %`;

export async function runInt8SchemesBench(o: { shapes: typeof INT8_SHAPES; schemes: Scheme[]; runs: number; threads: number }, log: (s: string) => void = console.log): Promise<Row[]> {
  log(`load average at start: ${os.loadavg().map((v) => v.toFixed(2)).join(' ')} (${os.cpus().length} CPUs; ${o.threads} threads, best of ${o.runs} runs)`);
  log('| product | scheme | random: rms / max error | stress: rms / max error | GOP/s (wall) | GOP/s (CPU time) |');
  log('|---|---|---|---|---|---|');
  const rows: Row[] = [];
  for (const shape of o.shapes) {
    const { M, K, N } = shape;
    const swiglu = K > 4000;
    const w = drawWeight(N, K);
    const draws = {
      random: { M, K, N, w, stress: false, x: drawLinearInput(M, K, { swiglu, stress: false }) },
      stress: { M, K, N, w, stress: true, x: drawLinearInput(M, K, { swiglu, stress: true, massiveTokens: shape.model === 'qwen3' }) },
    };
    // the fp32 product is the reference: run first, whatever the scheme list
    const ref = await measure(SCHEMES[0], shape, draws, {}, o.runs, o.threads);
    for (const scheme of o.schemes) {
      const r = scheme === SCHEMES[0] ? { ...ref, random: { rms: 0, max: 0 }, stress: { rms: 0, max: 0 } } : await measure(scheme, shape, draws, ref.out, o.runs, o.threads);
      rows.push(r);
      log(`| ${r.shape} ${shape.what} | ${r.scheme} | ${pct(r.random.rms)} / ${pct(r.random.max)} | ${pct(r.stress.rms)} / ${pct(r.stress.max)} | ${r.gops.toFixed(0)} | ${r.gopsCpu.toFixed(0)} |`);
    }
  }
  if (quantizer) await (await quantizer).release();
  quantizer = undefined;
  log(`load average at end: ${os.loadavg().map((v) => v.toFixed(2)).join(' ')}`);
  return rows;
}

export function registerInt8SchemesBench(bench: Command): void {
  bench
    .command('int8-schemes')
    .description('int8 activation schemes at klein\'s Linear shapes: error vs fp32 on random and stress activations, GOP/s (issue 21)')
    .option('--shapes <list>', 'all, flux2, qwen3, or indices into the shape list (0-4, comma-separated)', 'all')
    .option('--schemes <list>', 'indices into the scheme list (comma-separated; default all)')
    .option('--runs <n>', 'timed runs per product (best is reported)', '5')
    .option('--threads <n>', 'intra-op threads', '2')
    .action(async (opts: { shapes: string; schemes?: string; runs: string; threads: string }) => {
      const runs = Number(opts.runs);
      const threads = Number(opts.threads);
      if (!Number.isInteger(runs) || runs < 1) throw new UsageError('--runs must be a positive integer');
      if (!Number.isInteger(threads) || threads < 1) throw new UsageError('--threads must be a positive integer');
      const pick = <T>(list: T[], spec: string, what: string): T[] =>
        spec.split(',').map((s) => {
          const i = Number(s);
          if (!Number.isInteger(i) || !list[i]) throw new UsageError(`--${what}: no entry ${s} (0–${list.length - 1})`);
          return list[i];
        });
      const shapes = opts.shapes === 'all' ? INT8_SHAPES : opts.shapes === 'flux2' || opts.shapes === 'qwen3' ? INT8_SHAPES.filter((s) => s.model === opts.shapes) : pick(INT8_SHAPES, opts.shapes, 'shapes');
      const schemes = opts.schemes ? pick(SCHEMES, opts.schemes, 'schemes') : SCHEMES;
      await runInt8SchemesBench({ shapes, schemes, runs, threads });
    });
}
