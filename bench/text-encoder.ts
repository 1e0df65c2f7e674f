// `klein bench text-encoder`: the Qwen3 text encoder at real Qwen3-4B shapes with random weights (only the layers
// klein runs: 27 of 36), one 512-token batch. Prints seconds, GFLOP/s and peak RSS; the last line is
// `GFLOP/s: <number>`. With KLEIN_DEVICE=webgpu|cuda it runs the GPU graph and prints device and dtype
// (KLEIN_GPU_DTYPE picks fp16 or fp32). Also home of `writeRandomQwen3Checkpoint`, which the tiny-model maker and
// tests reuse.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { writeSafetensors, type TensorToWrite } from '../src/weights/safetensors.ts';
import { KLEIN_OUTPUT_LAYERS, layersNeeded, parseQwen3Config, Qwen3TextEncoder, type Qwen3Config, type Qwen3WeightMode } from '../src/models/qwen3.ts';
import { UsageError } from '../src/cli/errors.ts';
import { parsePrecision } from '../src/cli/precision.ts';
import { GiB, peakRssBytes, resetPeakRss } from './util.ts';
import { relativeError } from '../src/conform/compare.ts';
import { applyOutlierEdits, applyOutlierEditsBf16, qwen3OutlierEdits } from '../src/weights/stress-outliers.ts';

/** HF config.json of Qwen/Qwen3-4B (the klein 4B text encoder). */
export const QWEN3_4B_CONFIG = {
  architectures: ['Qwen3ForCausalLM'],
  model_type: 'qwen3',
  hidden_size: 2560,
  intermediate_size: 9728,
  num_hidden_layers: 36,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  head_dim: 128,
  hidden_act: 'silu',
  rms_norm_eps: 1e-6,
  rope_theta: 1000000,
  rope_scaling: null,
  max_position_embeddings: 40960,
  vocab_size: 151936,
  tie_word_embeddings: true,
  attention_bias: false,
  torch_dtype: 'bfloat16',
};

export interface RandomCheckpointOptions {
  seed?: number;
  dtype?: 'BF16' | 'F32';
  /** Decoder layers to write (default: all); the file set then only covers what a klein encoder runs. */
  layers?: number;
  /** Called after each shard is written. */
  onShard?: (done: number, total: number) => void;
  /** The stress model of issue 21: outlier channels, massive-activation tokens, heavy-tailed SwiGLU (src/weights/stress-outliers.ts). */
  outliers?: boolean;
}

/** xorshift32: a seeded stream of 32-bit words, fast enough to fill gigabytes. */
function xorshift(seed: number): () => number {
  let s = (seed >>> 0) || 0x9e3779b9;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
}

/**
 * bf16 bit patterns with random sign and mantissa and a fixed exponent: |x| ∈ [2^e, 2^(e+1)). One random word
 * gives four values, so writing 2.7 billion weights takes seconds, not minutes. Positive-only for norm scales.
 */
function randomBf16(n: number, next: () => number, exp: number, signed: boolean): Uint16Array {
  const out = new Uint16Array(n);
  const e = (127 + exp) << 7;
  for (let i = 0; i < n; i += 4) {
    let r = next();
    for (let j = 0; j < 4 && i + j < n; j++, r >>>= 8) out[i + j] = ((signed ? r & 0x80 : 0) << 8) | e | (r & 0x7f);
  }
  return out;
}

function tensor(shape: number[], next: () => number, dtype: 'BF16' | 'F32', exp: number, signed = true): TensorToWrite {
  const n = shape.reduce((a, b) => a * b, 1);
  const bits = randomBf16(n, next, exp, signed);
  if (dtype === 'BF16') return { dtype, shape, data: bits };
  const f = new Float32Array(n);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < n; i++) u[i] = bits[i] << 16;
  return { dtype, shape, data: f };
}

/**
 * Writes an HF-layout Qwen3 folder: config.json, one shard per decoder layer plus one for the embeddings (and the
 * final norm when every layer is written), and model.safetensors.index.json — the same layout as a sharded HF
 * checkpoint. Weights are random with a scale like a trained model's (|w| ≈ 1/√hidden); norm scales are in [0.5, 1).
 */
export function writeRandomQwen3Checkpoint(folder: string, config: Record<string, unknown>, opts: RandomCheckpointOptions = {}): Qwen3Config {
  const cfg = parseQwen3Config(config);
  const dtype = opts.dtype ?? 'BF16';
  const layers = opts.layers ?? cfg.numHiddenLayers;
  if (!Number.isInteger(layers) || layers < 0 || layers > cfg.numHiddenLayers) throw new Error(`layers must be 0..${cfg.numHiddenLayers}, got ${layers}`);
  const next = xorshift(opts.seed ?? 1);
  const H = cfg.hiddenSize;
  const q = cfg.numAttentionHeads * cfg.headDim;
  const kv = cfg.numKeyValueHeads * cfg.headDim;
  const wExp = -Math.ceil(Math.log2(Math.sqrt(H))) - 1; // ≈ 1/(2√hidden)
  fs.mkdirSync(folder, { recursive: true });
  const total = layers + 1;
  const shardName = (i: number) => `model-${String(i + 1).padStart(5, '0')}-of-${String(total).padStart(5, '0')}.safetensors`;
  const weightMap: Record<string, string> = {};
  const write = (i: number, tensors: Record<string, TensorToWrite>) => {
    if (opts.outliers) for (const [name, t] of Object.entries(tensors)) stressTensor(name, t);
    writeSafetensors(path.join(folder, shardName(i)), tensors);
    for (const k of Object.keys(tensors)) weightMap[k] = shardName(i);
    opts.onShard?.(i + 1, total);
  };
  const head: Record<string, TensorToWrite> = { 'model.embed_tokens.weight': tensor([cfg.vocabSize, H], next, dtype, -2) };
  if (layers === cfg.numHiddenLayers) head['model.norm.weight'] = tensor([H], next, dtype, -1, false);
  write(0, head);
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}.`;
    write(l + 1, {
      [`${p}input_layernorm.weight`]: tensor([H], next, dtype, -1, false),
      [`${p}self_attn.q_proj.weight`]: tensor([q, H], next, dtype, wExp),
      [`${p}self_attn.k_proj.weight`]: tensor([kv, H], next, dtype, wExp),
      [`${p}self_attn.v_proj.weight`]: tensor([kv, H], next, dtype, wExp),
      [`${p}self_attn.o_proj.weight`]: tensor([H, q], next, dtype, wExp),
      [`${p}self_attn.q_norm.weight`]: tensor([cfg.headDim], next, dtype, -1, false),
      [`${p}self_attn.k_norm.weight`]: tensor([cfg.headDim], next, dtype, -1, false),
      [`${p}post_attention_layernorm.weight`]: tensor([H], next, dtype, -1, false),
      [`${p}mlp.gate_proj.weight`]: tensor([cfg.intermediateSize, H], next, dtype, wExp),
      [`${p}mlp.up_proj.weight`]: tensor([cfg.intermediateSize, H], next, dtype, wExp),
      [`${p}mlp.down_proj.weight`]: tensor([H, cfg.intermediateSize], next, dtype, wExp),
    });
  }
  fs.writeFileSync(path.join(folder, 'model.safetensors.index.json'), JSON.stringify({ metadata: { random_seed: opts.seed ?? 1, ...(opts.outliers ? { outliers: 'issue-21' } : {}) }, weight_map: weightMap }, null, 1));
  fs.writeFileSync(path.join(folder, 'config.json'), JSON.stringify({ ...config, torch_dtype: dtype === 'BF16' ? 'bfloat16' : 'float32' }, null, 2));
  return cfg;
}

/** Applies the stress model's edits to one generated tensor in place (bf16 bits or fp32 values). */
function stressTensor(name: string, t: TensorToWrite): void {
  const edits = qwen3OutlierEdits(name, t.shape);
  if (edits.length === 0) return;
  if (t.data instanceof Uint16Array) applyOutlierEditsBf16(t.data, t.shape, edits);
  else if (t.data instanceof Float32Array) applyOutlierEdits(t.data, t.shape, edits);
  else throw new Error(`stress model: ${name} is not generated in memory`);
}

/** Multiply-adds ×2 of one forward over `batch × seq` tokens through `layers` decoder layers (full attention matrix). */
export function qwen3Flops(cfg: Qwen3Config, layers: number, batch: number, seq: number): number {
  const H = cfg.hiddenSize;
  const q = cfg.numAttentionHeads * cfg.headDim;
  const kv = cfg.numKeyValueHeads * cfg.headDim;
  const tokens = batch * seq;
  const proj = H * (q + 2 * kv) + q * H + 3 * H * cfg.intermediateSize;
  const attn = 2 * cfg.numAttentionHeads * seq * cfg.headDim; // QKᵀ and PV per query token
  return 2 * layers * tokens * (proj + attn);
}

interface BenchOptions {
  dir?: string;
  runs: string;
  batch: string;
  seq: string;
  threads?: string;
  weights: string;
  precision?: string;
  compareExact?: boolean;
  layers?: string;
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

export async function benchTextEncoder(opts: BenchOptions): Promise<void> {
  const runs = Number(opts.runs);
  const batch = Number(opts.batch);
  const seq = Number(opts.seq);
  for (const [k, v] of [['--runs', runs], ['--batch', batch], ['--seq', seq]] as const) {
    if (!Number.isInteger(v) || v < 1) throw new UsageError(`${k} must be a positive integer`);
  }
  if (seq > 512) throw new UsageError('--seq must be at most 512 (the klein context length)');
  const writeLayers = layersNeeded({ outputLayers: KLEIN_OUTPUT_LAYERS });
  // --layers N runs only the first N layers of the same folder (states N/3, 2N/3, N stacked): a cheap "mini" run
  const runLayers = opts.layers === undefined ? writeLayers : Number(opts.layers);
  if (!Number.isInteger(runLayers) || runLayers < 1 || runLayers > writeLayers) throw new UsageError(`--layers must be 1–${writeLayers}`);
  const outputLayers = runLayers === writeLayers ? KLEIN_OUTPUT_LAYERS : [...new Set([Math.ceil(runLayers / 3), Math.ceil((2 * runLayers) / 3), runLayers])];
  const layers = writeLayers;
  const dir = path.resolve(opts.dir ?? path.join(os.tmpdir(), 'klein-bench-qwen3-4b-random'));
  const marker = path.join(dir, '.complete');
  const cfg = parseQwen3Config(QWEN3_4B_CONFIG);
  if (!fs.existsSync(marker)) {
    console.log(`writing random Qwen3-4B weights (${layers} layers, bf16) to ${dir} …`);
    const t = performance.now();
    writeRandomQwen3Checkpoint(dir, QWEN3_4B_CONFIG, { seed: 4, layers, onShard: (d, n) => process.stdout.write(`\r  shard ${d}/${n}`) });
    fs.writeFileSync(marker, '');
    console.log(`\n  written in ${((performance.now() - t) / 1000).toFixed(1)} s`);
  }
  if (!['runtime-cast', 'converted', 'prepacked'].includes(opts.weights)) throw new UsageError('--weights must be runtime-cast, converted or prepacked');
  const weights = opts.weights as Qwen3WeightMode;
  const precision = parsePrecision(opts.precision ?? 'exact');
  if (opts.compareExact && precision !== 'fast') throw new UsageError('--compare-exact needs --precision fast');
  const session = opts.threads ? { threads: Number(opts.threads) } : {};
  // the peak covers load and runs, not the writing of the random checkpoint above
  resetPeakRss();
  let t = performance.now();
  let lastPct = -1;
  const onProgress = (done: number, total: number) => {
    const pct = Math.floor((100 * done) / total);
    if (pct !== lastPct && pct % 10 === 0) process.stdout.write(`\r  quantizing to int8: ${pct} % (${done}/${total} projections)${done === total ? '\n' : ''}`);
    lastPct = pct;
  };
  let enc = await Qwen3TextEncoder.load(dir, { session, weights, precision, onProgress, outputLayers });
  // on a GPU device (KLEIN_DEVICE, dtype from KLEIN_GPU_DTYPE) the projections are converted at load; --weights is CPU-only
  const gpu = enc.device !== 'cpu';
  const mode = gpu ? `${enc.computeDtype} projections converted at load` : `weights ${weights}`;
  const what = precision === 'fast' ? `fast: int8 projections, cache ${enc.int8Cache?.built ? 'built (first load: quantized)' : 'read'}` : mode;
  if (gpu) console.log(`device: ${enc.device}, projections in ${enc.computeDtype}${enc.computeDtype === 'fp16' ? ` (${enc.fp16Overflows} weights clamped to ±65504)` : ''}; norms, RoPE, attention in fp32`);
  console.log(`load (graph + session, ${what}): ${((performance.now() - t) / 1000).toFixed(2)} s, RSS ${(process.memoryUsage().rss / GiB).toFixed(2)} GiB`);
  if (enc.int8Cache?.built) {
    // the figure a restart sees: the same load from the int8 cache just written
    await enc.close();
    t = performance.now();
    enc = await Qwen3TextEncoder.load(dir, { session, weights, precision, outputLayers });
    console.log(`load again (fast: int8 cache read): ${((performance.now() - t) / 1000).toFixed(2)} s, RSS ${(process.memoryUsage().rss / GiB).toFixed(2)} GiB`);
  }
  const ids = new BigInt64Array(batch * seq);
  const mask = new BigInt64Array(batch * seq);
  const next = xorshift(7);
  // a long prompt followed by padding, like a real klein prompt
  for (let b = 0; b < batch; b++) {
    const real = Math.max(1, Math.floor(seq * 0.75));
    for (let i = 0; i < seq; i++) {
      ids[b * seq + i] = i < real ? BigInt(next() % cfg.vocabSize) : 151643n;
      mask[b * seq + i] = i < real ? 1n : 0n;
    }
  }
  const flops = qwen3Flops(cfg, runLayers, batch, seq);
  let best = Infinity;
  let out: Float32Array = new Float32Array(0);
  for (let r = 0; r < runs; r++) {
    t = performance.now();
    out = await enc.embed(ids, mask, batch);
    const s = (performance.now() - t) / 1000;
    if (!out.every(Number.isFinite)) throw new Error('the encoder produced non-finite values');
    best = Math.min(best, s);
    console.log(`run ${r + 1}: ${s.toFixed(2)} s, ${(flops / s / 1e9).toFixed(1)} GFLOP/s`);
  }
  await enc.close();
  const peak = peakRssBytes();
  console.log(`shape: Qwen3-4B, ${runLayers} of ${cfg.numHiddenLayers} layers, batch ${batch} × ${seq} tokens, ${(flops / 1e12).toFixed(2)} TFLOP per run (counted as fp32), ${precision === 'fast' ? 'precision fast (int8 projections)' : mode}, device ${enc.device}`);
  if (opts.compareExact) {
    // after the fast encoder is released, so the two never share the memory; its peak is not the fast mode's
    const exact = await Qwen3TextEncoder.load(dir, { session, weights, outputLayers });
    const ref = await exact.embed(ids, mask, batch);
    await exact.close();
    const e = contextError(out, ref, mask, outputLayers.length * cfg.hiddenSize);
    console.log(`fast vs exact (weights ${weights}), real tokens of the context: rms(fast − exact)/rms(exact) ${e.rms.toExponential(3)}, max |fast − exact|/max |exact| ${e.max.toExponential(3)}`);
  }
  console.log(`seconds (best of ${runs}): ${best.toFixed(2)}`);
  console.log(`peak RSS: ${(peak / GiB).toFixed(2)} GiB`);
  console.log(`GFLOP/s: ${(flops / best / 1e9).toFixed(1)}`);
}

export function registerTextEncoderBench(bench: Command): void {
  bench
    .command('text-encoder')
    .description('Qwen3-4B text encoder (random weights, 27 layers) on one 512-token prompt: seconds, GFLOP/s, peak RSS')
    .option('--dir <folder>', 'where the random checkpoint is written and reused (default: a folder in the temp dir)')
    .option('--runs <n>', 'timed runs; the best is reported', '2')
    .option('--batch <n>', 'prompts per run', '1')
    .option('--seq <n>', 'tokens per prompt', '512')
    .option('--threads <n>', 'intra-op threads (default: all cores)')
    .option('--weights <mode>', 'runtime-cast (bf16 kept, cast per run), converted (fp32 in memory, fed per run) or prepacked (folded by ORT at load)', 'runtime-cast')
    .option('--layers <n>', 'run only the first N of the 27 layers (a cheaper run of the same weights)')
    .option('--precision <mode>', 'exact (fp32 products, --weights applies) or fast (int8 projections, quantized once into the int8 cache)', 'exact')
    .option('--compare-exact', 'fast only: also run the exact encoder (--weights) on the same tokens and print the relative error of the context')
    .action((o: BenchOptions) => benchTextEncoder(o));
}
