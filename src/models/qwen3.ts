// Qwen3 (HF `Qwen3ForCausalLM` weights) as an ONNX graph, used as the FLUX.2 [klein] text encoder: it runs only the
// decoder layers up to the deepest hidden state klein needs (27 of 36) and outputs the per-token concatenation of
// hidden_states[9] ‖ hidden_states[18] ‖ hidden_states[27] (spec §4; HF indexing: 0 = embeddings, k = raw output of
// decoder layer k, the last index = after the final norm).
import fs from 'node:fs';
import path from 'node:path';
import { elemTypeOf, Graph, ONNX_ELEM, type Value } from '../graph/onnx-graph.ts';
import { rmsNorm, silu, splitLast, concat } from '../graph/nn.ts';
import { compileGraph, i64, sessionOptions, type SessionConfig, ort } from '../graph/session.ts';
import { defaultDevice, resolveDevice, type Device } from '../graph/device.ts';
import { bf16ToF32, Checkpoint, DTYPE_SIZE, f16ToF32, readFloat32, type TensorInfo } from '../weights/safetensors.ts';
import type { Precision } from '../pipeline/types.ts';
import { quantizedLinear } from '../graph/quantize.ts';
import { int8ActivationsExperiment, sharedInt8Linear } from '../graph/int8-linear.ts';
import { Int8Cache, Int8CacheCorruptError, type Int8CacheOptions } from '../weights/quantized-cache.ts';
import { deviceWeightBytes, resolveComputeDtype, throwIfOverflowed, type ComputeDtype } from '../graph/compute-dtype.ts';
import { UsageError } from '../cli/errors.ts';

/** The hidden states FLUX.2 [klein] stacks into its text context. */
export const KLEIN_OUTPUT_LAYERS = [9, 18, 27] as const;

export interface Qwen3Config {
  hiddenSize: number;
  intermediateSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  numKeyValueHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  vocabSize: number;
  tieWordEmbeddings: boolean;
  attentionBias: boolean;
}

export class Qwen3ConfigError extends Error {
  override name = 'Qwen3ConfigError';
}

function num(raw: Record<string, unknown>, key: string, fallback?: number): number {
  const v = raw[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new Qwen3ConfigError(`config.json: ${key} must be a number, got ${JSON.stringify(raw[key])}`);
  return v;
}

/** Reads an HF `Qwen3Config` (config.json as a parsed object). */
export function parseQwen3Config(raw: Record<string, unknown>): Qwen3Config {
  if (raw.model_type !== undefined && raw.model_type !== 'qwen3') {
    throw new Qwen3ConfigError(`config.json: model_type is ${JSON.stringify(raw.model_type)}, expected "qwen3" (FLUX.2 [klein] uses Qwen3-4B / Qwen3-8B)`);
  }
  const hiddenSize = num(raw, 'hidden_size');
  const numAttentionHeads = num(raw, 'num_attention_heads');
  // newer transformers configs move rope settings into rope_parameters
  const ropeParams = (raw.rope_parameters ?? null) as Record<string, unknown> | null;
  const ropeScaling = (raw.rope_scaling ?? null) as Record<string, unknown> | null;
  const ropeType = ropeScaling?.rope_type ?? ropeScaling?.type ?? ropeParams?.rope_type ?? 'default';
  if (ropeType !== 'default') throw new Qwen3ConfigError(`config.json: rope scaling ${JSON.stringify(ropeType)} is not supported (Qwen3-4B/8B use plain RoPE)`);
  const ropeTheta = typeof raw.rope_theta === 'number' ? raw.rope_theta : num(ropeParams ?? {}, 'rope_theta', 1e6);
  if (raw.hidden_act !== undefined && raw.hidden_act !== 'silu') throw new Qwen3ConfigError(`config.json: hidden_act ${JSON.stringify(raw.hidden_act)} is not supported (Qwen3 uses silu)`);
  const cfg: Qwen3Config = {
    hiddenSize,
    intermediateSize: num(raw, 'intermediate_size'),
    numHiddenLayers: num(raw, 'num_hidden_layers'),
    numAttentionHeads,
    numKeyValueHeads: num(raw, 'num_key_value_heads', numAttentionHeads),
    headDim: num(raw, 'head_dim', hiddenSize / numAttentionHeads),
    rmsNormEps: num(raw, 'rms_norm_eps', 1e-6),
    ropeTheta,
    vocabSize: num(raw, 'vocab_size'),
    tieWordEmbeddings: raw.tie_word_embeddings !== false,
    attentionBias: raw.attention_bias === true,
  };
  for (const k of ['hiddenSize', 'intermediateSize', 'numHiddenLayers', 'numAttentionHeads', 'numKeyValueHeads', 'headDim', 'vocabSize'] as const) {
    if (!Number.isInteger(cfg[k]) || cfg[k] < 1) throw new Qwen3ConfigError(`config.json: ${k} must be a positive integer, got ${cfg[k]}`);
  }
  if (cfg.numAttentionHeads % cfg.numKeyValueHeads !== 0) {
    throw new Qwen3ConfigError(`config.json: num_attention_heads ${cfg.numAttentionHeads} is not a multiple of num_key_value_heads ${cfg.numKeyValueHeads}`);
  }
  if (cfg.headDim % 2 !== 0) throw new Qwen3ConfigError(`config.json: head_dim ${cfg.headDim} must be even for RoPE`);
  return cfg;
}

export function readQwen3Config(folder: string): Qwen3Config {
  const file = path.join(folder, 'config.json');
  let raw: Record<string, unknown>;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new Qwen3ConfigError(`cannot read ${file}: ${(e as Error).message}`);
  }
  return parseQwen3Config(raw);
}

export interface Qwen3GraphOptions {
  /** Hidden-state indices concatenated (in this order) into the `context` output. */
  outputLayers: readonly number[];
  /** Extra hidden states to output as `hidden_states.k` (conformance, debugging). */
  hiddenStates?: readonly number[];
  /** Longest sequence the RoPE table covers. */
  maxPositions: number;
  /** How bf16/f16 projection weights become fp32, see `Qwen3WeightMode`. Default `runtime-cast`. */
  weights?: Qwen3WeightMode;
  /**
   * `fast`: every projection is an int8 DynamicQuantizeMatMul on the int8 cache's tensors (`int8Weights`), the norms
   * are embedded constants, and the embeddings come in as the `inputs_embeds` input (looked up in JS), so the graph
   * reads one file: the int8 cache. Default exact.
   */
  precision?: Precision;
  /**
   * Set on a GPU device only (the CPU graphs and their cache keys never carry it): every projection is
   * `MatMul(x, Wᵀ)` by a weight transposed to `[in, out]` at load and handed to ORT in memory (`Qwen3GpuWeight`),
   * in `dtype`; norms, RoPE, attention and the residual stream stay fp32, and the embeddings come in as
   * `inputs_embeds` like fast mode's. `weights` is then irrelevant.
   */
  gpu?: { dtype: ComputeDtype };
}

/**
 * A GPU graph's projection weight: ORT gets it from `location` in the session's `externalData`, converted once at
 * load (`gpuWeightBytes`): widened to fp32, transposed to `[in, out]`, narrowed to fp16 when `fp16`.
 */
export interface Qwen3GpuWeight {
  location: string;
  info: TensorInfo;
  fp16: boolean;
}

/** Bump when the GPU graph changes in a way its options do not capture (compiled-graph cache key). */
const QWEN3_GPU_GRAPH_VERSION = 2; // 2: down_proj prescaled in fp16

/**
 * The compiled-graph cache key. Exact CPU graphs keep the key they always had (`{cfg, graphOpts}`), so existing
 * compiled graphs stay valid; fast and GPU graphs embed the norms, so the checkpoint files' identity keys them too.
 */
export function qwen3GraphKey(cfg: Qwen3Config, graphOpts: Qwen3GraphOptions, checkpoint: string[]): unknown {
  if (graphOpts.precision === 'fast') return { cfg, graphOpts, fast: int8ActivationsExperiment() ? `${QWEN3_FAST_GRAPH_VERSION}${int8ActivationsExperiment()}` : QWEN3_FAST_GRAPH_VERSION, checkpoint };
  if (graphOpts.gpu) return { cfg, graphOpts, gpu: QWEN3_GPU_GRAPH_VERSION, checkpoint };
  return { cfg, graphOpts };
}

/** Fast mode: where each projection's int8 values and scales are (the int8 cache file). */
export type Int8Tensors = (tensor: string) => { q: TensorInfo; scale: TensorInfo; residual?: { q: TensorInfo; scale: TensorInfo } };

/**
 * How bf16 (or f16) projection weights become fp32 for ORT's CPU MatMul:
 * - `runtime-cast`: weights stay bf16, mmapped from the safetensors file, and each run casts them layer by layer:
 *   the session opens in about a second and holds ~1 GB beyond the page cache; every run pays the casts.
 * - `converted`: converted to fp32 once, in JS memory, at load (seconds) and fed to the graph as inputs on every
 *   run (no copy): fastest runs, 4 bytes per parameter held (10.9 GB for the 27 layers of Qwen3-4B).
 * - `prepacked`: ORT constant-folds the casts at load and keeps pre-packed fp32 matrices: same memory as
 *   `converted`, runs as fast, but its load takes minutes at real size (ORT's folding round-trips every tensor).
 */
export type Qwen3WeightMode = 'runtime-cast' | 'converted' | 'prepacked';

/** Graph input name of a projection weight fed at run time (`converted` mode). */
export const feedName = (tensor: string): string => `weight:${tensor}`;

/** fp16 on a GPU: down_proj's input is multiplied by this before its cast to fp16, its product by the inverse after. */
export const DOWN_PROJ_PRESCALE = 2 ** -6;

/** Bump when the fast-mode graph changes in a way its options do not capture (compiled-graph cache key). */
const QWEN3_FAST_GRAPH_VERSION = 2;


/** The projections fast mode quantizes: every Linear of the decoder layers (norms, RoPE, attention stay fp32). */
const PROJECTIONS = ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj'] as const;

/** Checkpoint tensors of the projections of the first `layers` decoder layers, in layer order. */
export function projectionTensors(ck: Checkpoint, layers: number): TensorInfo[] {
  const prefix = keyPrefix(ck);
  const out: TensorInfo[] = [];
  for (let i = 0; i < layers; i++) for (const p of PROJECTIONS) out.push(ck.info(`${prefix}layers.${i}.${p}.weight`));
  return out;
}

/**
 * RoPE cos/sin tables `[maxPositions, headDim]` as HF computes them in float32: `inv_freq = 1 / theta^(2i/d)`,
 * angle = `inv_freq * position` (both rounded to float32), halves duplicated (`cat(freqs, freqs)`).
 */
export function ropeTables(headDim: number, theta: number, maxPositions: number): { cos: Float32Array; sin: Float32Array } {
  const half = headDim / 2;
  const inv = new Float32Array(half);
  for (let i = 0; i < half; i++) inv[i] = 1 / Math.fround(theta ** Math.fround((2 * i) / headDim));
  const cos = new Float32Array(maxPositions * headDim);
  const sin = new Float32Array(maxPositions * headDim);
  for (let p = 0; p < maxPositions; p++) {
    for (let i = 0; i < half; i++) {
      const a = Math.fround(inv[i] * p);
      const c = Math.cos(a);
      const s = Math.sin(a);
      cos[p * headDim + i] = c;
      cos[p * headDim + half + i] = c;
      sin[p * headDim + i] = s;
      sin[p * headDim + half + i] = s;
    }
  }
  return { cos, sin };
}

/** HF key prefix of the decoder: `model.` for Qwen3ForCausalLM checkpoints, none for bare Qwen3Model ones. */
function keyPrefix(ck: Checkpoint): string {
  if (ck.has('model.embed_tokens.weight')) return 'model.';
  if (ck.has('embed_tokens.weight')) return '';
  throw new Qwen3ConfigError('checkpoint has no embed_tokens.weight (expected HF Qwen3 key names such as model.embed_tokens.weight)');
}

/** Every tensor (name, shape implied by the config) the first `layers` decoder layers need. */
function requiredTensors(cfg: Qwen3Config, prefix: string, layers: number): Array<[string, number[]]> {
  const H = cfg.hiddenSize;
  const q = cfg.numAttentionHeads * cfg.headDim;
  const kv = cfg.numKeyValueHeads * cfg.headDim;
  const want: Array<[string, number[]]> = [[`${prefix}embed_tokens.weight`, [cfg.vocabSize, H]]];
  for (let i = 0; i < layers; i++) {
    const p = `${prefix}layers.${i}.`;
    want.push(
      [`${p}input_layernorm.weight`, [H]], [`${p}post_attention_layernorm.weight`, [H]],
      [`${p}self_attn.q_proj.weight`, [q, H]], [`${p}self_attn.k_proj.weight`, [kv, H]], [`${p}self_attn.v_proj.weight`, [kv, H]],
      [`${p}self_attn.o_proj.weight`, [H, q]], [`${p}self_attn.q_norm.weight`, [cfg.headDim]], [`${p}self_attn.k_norm.weight`, [cfg.headDim]],
      [`${p}mlp.gate_proj.weight`, [cfg.intermediateSize, H]], [`${p}mlp.up_proj.weight`, [cfg.intermediateSize, H]], [`${p}mlp.down_proj.weight`, [H, cfg.intermediateSize]],
    );
  }
  if (layers === cfg.numHiddenLayers) want.push([`${prefix}norm.weight`, [H]]);
  return want;
}

/** The tensors the graph needs, checked against the config so a wrong checkpoint fails before ORT does. */
function checkShapes(ck: Checkpoint, cfg: Qwen3Config, prefix: string, layers: number): void {
  for (const [name, shape] of requiredTensors(cfg, prefix, layers)) {
    if (!ck.has(name)) throw new Qwen3ConfigError(`checkpoint is missing ${name}`);
    const got = ck.info(name).shape;
    if (got.join(',') !== shape.join(',')) throw new Qwen3ConfigError(`${name} has shape [${got}], config.json implies [${shape}]`);
  }
}

/** Deepest decoder layer (1-based count) the requested hidden states need. */
export function layersNeeded(opts: Pick<Qwen3GraphOptions, 'outputLayers' | 'hiddenStates'>): number {
  return Math.max(0, ...opts.outputLayers, ...(opts.hiddenStates ?? []));
}

/**
 * Builds the encoder graph. Inputs `input_ids`, `attention_mask` (int64 `[batch, seq]`), in fast mode and on a GPU
 * also `inputs_embeds` (fp32 `[batch, seq, hidden]`, see `embeddingRows`); output `context`
 * `[batch, seq, outputLayers.length · hidden]` and `hidden_states.k` `[batch, seq, hidden]` per extra state.
 * A GPU graph (`opts.gpu`) appends the projection weights it expects in memory to `gpuWeights`.
 */
export function buildQwen3Graph(ck: Checkpoint, cfg: Qwen3Config, opts: Qwen3GraphOptions, int8Weights?: Int8Tensors, gpuWeights: Qwen3GpuWeight[] = []): Graph {
  const prefix = keyPrefix(ck);
  const depth = layersNeeded(opts);
  const wanted = [...opts.outputLayers, ...(opts.hiddenStates ?? [])];
  for (const k of wanted) {
    if (!Number.isInteger(k) || k < 0 || k > cfg.numHiddenLayers) throw new Qwen3ConfigError(`hidden state ${k} does not exist (0..${cfg.numHiddenLayers})`);
  }
  if (opts.outputLayers.length === 0) throw new Qwen3ConfigError('at least one output layer is needed');
  checkShapes(ck, cfg, prefix, depth);

  const H = cfg.hiddenSize;
  const hd = cfg.headDim;
  const nh = cfg.numAttentionHeads;
  const nkv = cfg.numKeyValueHeads;
  const groups = nh / nkv;
  const W = (name: string): TensorInfo => ck.info(prefix + name);
  const g = new Graph('qwen3');
  const fast = opts.precision === 'fast';
  if (fast && !int8Weights) throw new Error('buildQwen3Graph: fast mode needs the int8 tensors');
  const gpu = opts.gpu;
  if (fast && gpu) throw new Error('buildQwen3Graph: fast mode (int8) has no GPU graph');
  // Fast mode's graph reads one file, the int8 cache (ORT maps external data files quickly but copies in-memory
  // external data slowly, ~40 s per GB on this machine, and it cannot mix both in one session): the small fp32
  // tensors (norms, biases) are embedded as constants, and the embedding rows come in as an input. A GPU graph
  // gets its projections in memory, so the same holds for it: nothing is read from the checkpoint files by ORT.
  const embedded = fast || gpu !== undefined;
  const stored = (info: TensorInfo): Value => (embedded ? g.constF32(readFloat32(info), info.shape, info.name) : g.weight(info, 'float32'));
  const ids = g.input('input_ids', 'int64', ['batch', 'seq']);
  const am = g.input('attention_mask', 'int64', ['batch', 'seq']);

  // Activations stay 2-D [batch·seq, features] so every projection is one Gemm with transB on the PyTorch
  // [out, in] weight: no Transpose node to fold or run, whichever weight mode is used.
  const mode = opts.weights ?? 'runtime-cast';
  const matrix = (info: TensorInfo): Value => {
    if (mode === 'converted') return g.input(feedName(info.name), 'float32', info.shape);
    if (mode === 'prepacked' || info.dtype === 'F32') return g.weight(info, 'float32');
    // An initializer that is also a graph input may be overridden by a feed, so ORT does not constant-fold
    // the Cast behind it: the weight stays bf16 in memory and is cast when the layer runs.
    const raw = g.weight(info);
    g.input(raw.name, elemTypeOf(info.dtype), info.shape);
    return g.op('Cast', [raw], { to: ONNX_ELEM.float32 }, { hint: `${raw.name}_f32` });
  };
  // GPU: the fp16 copy of each activation a projection read (q, k and v share one Cast, as do gate and up)
  const half = new Map<string, Value>();
  const gpuProj = (x: Value, info: TensorInfo, hint: string, prescale?: number): Value => {
    const fp16 = gpu!.dtype === 'fp16';
    const [out, inF] = info.shape;
    const location = `qwen3-mem/${info.name}.T`;
    gpuWeights.push({ location, info, fp16 });
    const wt = g.inMemoryWeight(`${info.name}.T`, fp16 ? 'float16' : 'float32', [inF, out], location);
    if (!fp16) return g.op('MatMul', [x, wt], {}, { hint });
    let x16 = half.get(x.name);
    if (!x16) {
      const scaled = prescale ? g.op('Mul', [x, g.scalarF32(prescale)], {}, { hint: 'prescale' }) : x;
      x16 = g.op('Cast', [scaled], { to: ONNX_ELEM.float16 }, { hint: 'to_fp16' });
      half.set(x.name, x16);
    }
    const y = g.op('Cast', [g.op('MatMul', [x16, wt], {}, { hint })], { to: ONNX_ELEM.float32 }, { hint: 'to_fp32' });
    return prescale ? g.op('Mul', [y, g.scalarF32(1 / prescale)], {}, { hint: 'unscale' }) : y;
  };
  const proj = (x: Value, name: string, biasName?: string): Value => {
    const hint = name.split('.').slice(-2, -1)[0];
    const bias = biasName && ck.has(prefix + biasName) ? stored(W(biasName)) : undefined;
    if (gpu) {
      // MatMul by Wᵀ, not Gemm(transB) on the stored [out, in] weight: Gemm runs on WebGPU too, but only a plain
      // [in, out] weight can be converted once at load and handed over as fp16; the bias is added in fp32.
      // down_proj is the one projection whose input is not RMS-normalised (SwiGLU's product) and whose output
      // feeds LLMs' "massive activation" channels (10³–10⁴ in the residual stream): in fp16 its input and product
      // are computed 2⁻⁶ smaller (64× more headroom below ±65504) and scaled back in fp32. Exact in binary
      // floating point except for values that fall into fp16's subnormals, < 3.9e-3 after scaling (abs. error ≤ 4e-6).
      const y = gpuProj(x, W(name), hint, name.endsWith('down_proj.weight') ? DOWN_PROJ_PRESCALE : undefined);
      return bias ? g.op('Add', [y, bias], {}, { hint: `${hint}_bias` }) : y;
    }
    if (fast) {
      const info = W(name);
      const t = int8Weights!(info.name);
      if (int8ActivationsExperiment()) {
        const residual = t.residual && { q: g.weight(t.residual.q), scale: g.weight(t.residual.scale) };
        return sharedInt8Linear(g, x, { q: g.weight(t.q), scale: g.weight(t.scale), inFeatures: info.shape[1], outFeatures: info.shape[0], bias, rows: { residual } }, { hint });
      }
      return quantizedLinear(g, x, { name: info.name, outFeatures: info.shape[0], inFeatures: info.shape[1], location: '', initializers: { q: g.weight(t.q), scale: g.weight(t.scale) }, bias, hint });
    }
    const inputs: Value[] = [x, matrix(W(name))];
    if (bias) inputs.push(bias);
    return g.op('Gemm', inputs, { transB: 1 }, { hint });
  };
  const normW = (name: string): Value => stored(W(name));

  const shapeBL = g.op('Shape', [ids], {}, { hint: 'shape_bl' });
  const seqLen = g.op('Slice', [shapeBL, g.constI64([1]), g.constI64([2])], {}, { hint: 'seq_len' });
  const shapeOf = (tail: number[]): Value => concat(g, [shapeBL, g.constI64(tail)], 0);
  const qShape = shapeOf([nh, hd]);
  const kvShape = shapeOf([nkv, hd]);
  const groupedShape = shapeOf([nkv, groups, hd]);

  // Embedding lookup on the stored table (bf16 in real checkpoints): gather rows first, then cast, so the
  // 151936×2560 table is never converted as a whole.
  let x = g.within('embed_tokens', () => {
    // fast and GPU: rows read on the host per prompt, so the 151936-row table is never handed to ORT
    if (embedded) return g.op('Reshape', [g.input('inputs_embeds', 'float32', ['batch', 'seq', H]), g.constI64([-1, H])]);
    const table = g.weight(W('embed_tokens.weight'));
    let e = g.op('Gather', [table, ids], { axis: 0 });
    if (ck.info(prefix + 'embed_tokens.weight').dtype !== 'F32') e = g.op('Cast', [e], { to: ONNX_ELEM.float32 });
    return g.op('Reshape', [e, g.constI64([-1, H])]);
  });

  // Additive mask [batch, 1, 1, seq, seq]: key j is visible to query i when j ≤ i and j is a real token. Masked
  // entries get float32's lowest value like HF's eager path, so a row with every key masked (never the case with
  // right padding, where pad queries still see the prompt) becomes a uniform average, not NaN.
  const bias = g.within('mask', () => {
    const pos = g.op('Range', [g.constI64([0], [], 'zero'), g.op('Squeeze', [seqLen, g.constI64([0])]), g.constI64([1], [], 'one')]);
    const causal = g.op('LessOrEqual', [g.op('Unsqueeze', [pos, g.constI64([0])]), g.op('Unsqueeze', [pos, g.constI64([1])])]);
    const keyOk = g.op('Unsqueeze', [g.op('Cast', [am], { to: ONNX_ELEM.bool }), g.constI64([1, 2])]);
    const allowed = g.op('And', [causal, keyOk]);
    const b = g.op('Where', [allowed, g.scalarF32(0), g.scalarF32(-3.4028234663852886e38)]);
    return g.op('Unsqueeze', [b, g.constI64([2])]);
  });

  const maxPos = opts.maxPositions;
  const rope = ropeTables(hd, cfg.ropeTheta, maxPos);
  const sliceSeq = (t: Value): Value => g.op('Slice', [t, g.constI64([0]), seqLen, g.constI64([0])]);
  const cos = sliceSeq(g.constF32(rope.cos, [maxPos, 1, hd], 'rope_cos'));
  const sin = sliceSeq(g.constF32(rope.sin, [maxPos, 1, hd], 'rope_sin'));
  const applyRope = (t: Value): Value => {
    const [a, b] = splitLast(g, t, [hd / 2, hd / 2]);
    const rot = concat(g, [g.op('Neg', [b]), a], -1);
    return g.op('Add', [g.op('Mul', [t, cos]), g.op('Mul', [rot, sin])], {}, { hint: 'rope' });
  };
  const scale = g.scalarF32(1 / Math.sqrt(hd));

  const hidden = new Map<number, Value>([[0, x]]);
  for (let i = 0; i < depth; i++) {
    const p = `layers.${i}.`;
    x = g.within(`layers.${i}`, () => {
      const attnOut = g.within('self_attn', () => {
        const h = rmsNorm(g, x, normW(`${p}input_layernorm.weight`), cfg.rmsNormEps);
        let q = g.op('Reshape', [proj(h, `${p}self_attn.q_proj.weight`, `${p}self_attn.q_proj.bias`), qShape]);
        let k = g.op('Reshape', [proj(h, `${p}self_attn.k_proj.weight`, `${p}self_attn.k_proj.bias`), kvShape]);
        const v = g.op('Reshape', [proj(h, `${p}self_attn.v_proj.weight`, `${p}self_attn.v_proj.bias`), kvShape]);
        q = applyRope(rmsNorm(g, q, normW(`${p}self_attn.q_norm.weight`), cfg.rmsNormEps)); // [B, L, nh, hd]
        k = applyRope(rmsNorm(g, k, normW(`${p}self_attn.k_norm.weight`), cfg.rmsNormEps)); // [B, L, nkv, hd]
        // GQA without repeating K/V: query head h = kv·groups + r, so group the queries under their KV head
        // and let MatMul broadcast K/V over the group axis.
        const qg = g.op('Transpose', [g.op('Reshape', [q, groupedShape])], { perm: [0, 2, 3, 1, 4] }); // [B, nkv, g, L, hd]
        const kt = g.op('Unsqueeze', [g.op('Transpose', [k], { perm: [0, 2, 3, 1] }), g.constI64([2])]); // [B, nkv, 1, hd, L]
        const vv = g.op('Unsqueeze', [g.op('Transpose', [v], { perm: [0, 2, 1, 3] }), g.constI64([2])]); // [B, nkv, 1, L, hd]
        const scores = g.op('Add', [g.op('Mul', [g.op('MatMul', [qg, kt]), scale]), bias]);
        const probs = g.op('Softmax', [scores], { axis: -1 });
        const ctx = g.op('Transpose', [g.op('MatMul', [probs, vv])], { perm: [0, 3, 1, 2, 4] }); // [B, L, nkv, g, hd]
        return proj(g.op('Reshape', [ctx, g.constI64([-1, nh * hd])]), `${p}self_attn.o_proj.weight`, `${p}self_attn.o_proj.bias`);
      });
      const x1 = g.op('Add', [x, attnOut], {}, { hint: 'residual' });
      const mlpOut = g.within('mlp', () => {
        const h = rmsNorm(g, x1, normW(`${p}post_attention_layernorm.weight`), cfg.rmsNormEps);
        const act = g.op('Mul', [silu(g, proj(h, `${p}mlp.gate_proj.weight`)), proj(h, `${p}mlp.up_proj.weight`)]);
        return proj(act, `${p}mlp.down_proj.weight`);
      });
      return g.op('Add', [x1, mlpOut], {}, { hint: 'residual' });
    });
    // HF's last hidden state is the final-normed one; every earlier index is the raw residual stream
    hidden.set(i + 1, i + 1 === cfg.numHiddenLayers ? rmsNorm(g, x, normW('norm.weight'), cfg.rmsNormEps) : x);
  }

  const toBLD = (v: Value, d: number): Value => g.op('Reshape', [v, shapeOf([d])]);
  const ctx = concat(g, opts.outputLayers.map((k) => hidden.get(k)!), -1);
  g.output(toBLD(ctx, opts.outputLayers.length * H), 'context', 'float32', ['batch', 'seq', opts.outputLayers.length * H]);
  for (const k of new Set(opts.hiddenStates ?? [])) g.output(toBLD(hidden.get(k)!, H), `hidden_states.${k}`, 'float32', ['batch', 'seq', H]);
  return g;
}

/**
 * The checkpoint inside an HF model folder: the sharded index or `model.safetensors` when present (the folder may
 * hold other .safetensors files, e.g. golden cases), else whatever `Checkpoint.open` finds.
 */
export function weightsPath(dir: string): string {
  for (const f of ['model.safetensors.index.json', 'model.safetensors']) {
    if (fs.existsSync(path.join(dir, f))) return path.join(dir, f);
  }
  return dir;
}

export interface Qwen3LoadOptions {
  session?: SessionConfig;
  outputLayers?: readonly number[];
  hiddenStates?: readonly number[];
  /** Longest sequence accepted (RoPE table size); klein uses 512. */
  maxPositions?: number;
  /**
   * CPU only. Default `runtime-cast`: least memory and an instant load; `converted` for fast runs of a resident
   * encoder. A GPU device always converts the projections at load (`session.gpuDtype`, see Qwen3GraphOptions.gpu).
   */
  weights?: Qwen3WeightMode;
  /**
   * `exact` (default): fp32 projections as `weights` says. `fast`: the q/k/v/o/gate/up/down projections as int8
   * products (int8 weights with per-output scales, see graph/quantize.ts), ≈ 1 byte per parameter resident;
   * `weights` is then irrelevant (no fp32 projection exists). CPU only: refused on a GPU device.
   */
  precision?: Precision;
  /** Fast mode: called after each projection is quantized (or read from the cache), for load progress. */
  onProgress?: (done: number, total: number) => void;
}

export interface Qwen3Output {
  /** `[batch, seq, outputLayers.length · hidden]` */
  context: Float32Array;
  hiddenStates: Map<number, Float32Array>;
}

/**
 * The int8 cache of every projection of the first `layers` layers (weights/quantized-cache.ts; ~2.7 GB for
 * Qwen3-4B's 27 layers): the first load quantizes them into it, later loads check every tensor's crc32 (which also
 * warms the page cache ORT then maps); a cache found corrupt is rebuilt once.
 */
function int8Projections(ck: Checkpoint, layers: number, onProgress?: (done: number, total: number) => void): Int8Cache {
  const infos = projectionTensors(ck, layers);
  const opts: Int8CacheOptions = {
    model: 'qwen3-text-encoder',
    sourceFiles: [...new Set(infos.map((i) => i.file))],
    entries: infos.map((info) => ({ key: info.name, outFeatures: info.shape[0], inFeatures: info.shape[1], read: () => readFloat32(info) })),
    onProgress: (done, total) => onProgress?.(done, total),
    residual: int8ActivationsExperiment() !== '',
  };
  const verified = (cache: Int8Cache) => {
    if (!cache.built) cache.verifyAll(); // just written: its bytes came from this process
    return cache;
  };
  try {
    return verified(Int8Cache.open(opts));
  } catch (e) {
    if (!(e instanceof Int8CacheCorruptError)) throw e;
    return verified(Int8Cache.open(opts)); // the corrupt cache was removed: this open rebuilds it
  }
}

/**
 * The embedding rows of `ids` as fp32 `[ids.length, hidden]`, read from the checkpoint (fast mode): a prompt needs
 * 512 rows (2.6 MB of bf16) of the 778 MB table, so the table is never loaded.
 */
export function embeddingRows(table: TensorInfo, ids: BigInt64Array): Float32Array {
  const [vocab, H] = table.shape;
  const rowBytes = H * DTYPE_SIZE[table.dtype];
  const out = new Float32Array(ids.length * H);
  const buf = Buffer.allocUnsafe(rowBytes);
  const fd = fs.openSync(table.file, 'r');
  try {
    ids.forEach((id, i) => {
      if (id < 0n || id >= BigInt(vocab)) throw new Error(`token id ${id} is outside the vocabulary (0..${vocab - 1})`);
      const at = table.dataOffset + Number(id) * rowBytes;
      if (fs.readSync(fd, buf, 0, rowBytes, at) !== rowBytes) throw new Error(`${table.file}: embedding row ${id} is cut off`);
      out.set(toF32(buf, table.dtype), i * H);
    });
  } finally {
    fs.closeSync(fd);
  }
  return out;
}

/**
 * The bytes ORT gets for a GPU projection: the weight widened to fp32, transposed to `[in, out]` and, for fp16,
 * narrowed with values beyond ±65504 clamped (counted into `stats.fp16Overflows`). Nothing in bf16 reaches ORT:
 * its WebGPU provider has no bf16 Cast, so the CPU graph's bf16 weights + Cast ran every cast on the CPU provider.
 */
export function gpuWeightBytes(w: Qwen3GpuWeight, stats: { fp16Overflows: number }): Uint8Array {
  const [out, inF] = w.info.shape;
  return deviceWeightBytes(readFloat32(w.info), { fp16: w.fp16, transpose: [out, inF] }, stats);
}

/** One row of stored values widened to fp32. */
function toF32(b: Buffer, dtype: TensorInfo['dtype']): Float32Array {
  const a = new Uint8Array(b).buffer; // aligned copy
  if (dtype === 'F32') return new Float32Array(a);
  if (dtype === 'BF16') return bf16ToF32(new Uint16Array(a));
  if (dtype === 'F16') return f16ToF32(new Uint16Array(a));
  throw new Qwen3ConfigError(`embed_tokens.weight has dtype ${dtype}; expected F32, BF16 or F16`);
}

export interface Int8CacheInfo {
  folder: string;
  /** True when this load quantized the weights (no valid cache existed). */
  built: boolean;
}

/** The text encoder at run time: one ORT session over the graph above. */
export class Qwen3TextEncoder {
  private constructor(
    readonly folder: string,
    readonly config: Qwen3Config,
    readonly outputLayers: readonly number[],
    readonly hiddenStates: readonly number[],
    readonly maxPositions: number,
    private readonly session: ort.InferenceSession,
    /** fp32 weights fed on every run (`converted` mode), else empty. */
    private readonly feeds: Record<string, ort.Tensor>,
    /** Every checkpoint file the encoder reads (the prompt cache keys on their identity). */
    readonly weightFiles: string[],
    /** `fast`: int8 projections (part of the prompt cache key, see PromptEncoder). */
    readonly precision: Precision,
    /** Fast mode: where the int8 weights are cached and whether this load quantized them (first load). */
    readonly int8Cache: Int8CacheInfo | undefined,
    /** Fast mode and GPU devices: the embedding table the rows of `inputs_embeds` are read from. */
    private readonly embeddings: TensorInfo | undefined,
  ) {}

  /** The device the session runs on. */
  device: Device = 'cpu';
  /**
   * What the projections compute in: fp32 on the CPU, the GPU dtype on a GPU device (part of the prompt cache key:
   * an fp16 context differs from an fp32 one).
   */
  computeDtype: ComputeDtype = 'fp32';
  /** fp16 only: projection weights beyond ±65504, clamped at load. */
  fp16Overflows = 0;
  /** True when the compiled graph came from the on-disk cache (not rebuilt). */
  graphCached = false;

  /** Width of one context token: `outputLayers.length · hidden` (7680 for Qwen3-4B). */
  get contextDim(): number {
    return this.outputLayers.length * this.config.hiddenSize;
  }

  /** Opens an HF Qwen3 folder (`config.json` + `model.safetensors` or a sharded index). */
  static async load(folder: string, opts: Qwen3LoadOptions = {}): Promise<Qwen3TextEncoder> {
    const dir = path.resolve(folder);
    const cfg = readQwen3Config(dir);
    const ck = Checkpoint.open(weightsPath(dir));
    const outputLayers = opts.outputLayers ?? KLEIN_OUTPUT_LAYERS;
    const hiddenStates = opts.hiddenStates ?? [];
    const maxPositions = opts.maxPositions ?? 512;
    const precision = opts.precision ?? 'exact';
    if (precision !== 'exact' && precision !== 'fast') throw new Qwen3ConfigError(`precision must be "exact" or "fast", got ${JSON.stringify(precision)}`);
    const sessionCfg: SessionConfig = { lowMemory: true, ...opts.session };
    const requested = sessionCfg.device ?? defaultDevice(); // KLEIN_DEVICE, as openSession does
    // fast on a named GPU is refused before the device is probed: the answer does not depend on the machine
    const refuseFast = (d: string) => {
      if (precision === 'fast' && d !== 'cpu') throw new UsageError(`qwen3: precision fast (int8 products) runs on the CPU only; use precision exact on ${d}`);
    };
    if (requested !== 'auto') refuseFast(requested);
    const device = await resolveDevice(requested);
    refuseFast(device);
    const computeDtype = resolveComputeDtype(device, sessionCfg.gpuDtype); // refuses fp16 on the CPU
    // A GPU device gets its own graph (see Qwen3GraphOptions.gpu); the CPU options, hence graphs and keys, are as before.
    const graphOpts: Qwen3GraphOptions =
      device !== 'cpu'
        ? { outputLayers, hiddenStates, maxPositions, gpu: { dtype: computeDtype } }
        : { outputLayers, hiddenStates, maxPositions, weights: opts.weights ?? 'runtime-cast', ...(precision === 'fast' ? { precision } : {}) };
    // fast mode: the int8 cache first (built on the first load), since the graph references its tensors
    const int8 = precision === 'fast' ? int8Projections(ck, layersNeeded(graphOpts), opts.onProgress) : undefined;
    const gpuWeights: Qwen3GpuWeight[] = [];
    const probe = buildQwen3Graph(ck, cfg, graphOpts, int8 && ((t) => int8.tensors(t)), gpuWeights);
    // only the files holding tensors of the layers we run count (a 36-layer checkpoint may put the unused tail in
    // a shard of its own); in `converted` mode the graph references just the embeddings and norms, but the model's
    // identity (prompt cache key) is every file we read
    const used = requiredTensors(cfg, keyPrefix(ck), layersNeeded(graphOpts)).map(([n]) => fs.realpathSync(ck.info(n).file));
    const files = [...new Set([...probe.weightFiles, ...used])].sort();
    // fast mode's graph references the int8 cache file only (so it is compiled into the cache's folder) and embeds
    // the norms: the checkpoint files key it too
    const identity = (f: string) => `${f}:${fs.statSync(f).size}:${Math.floor(fs.statSync(f).mtimeMs)}`;
    const key = qwen3GraphKey(cfg, graphOpts, files.map(identity));
    // a GPU graph references no checkpoint file (norms embedded, projections in memory): the checkpoint files
    // place it (their folder) and key it (compileGraph hashes their identity)
    const { file, cached } = compileGraph('qwen3', key, graphOpts.gpu ? files : probe.weightFiles, () => probe);
    // GPU: the projections converted now; ORT copies them while the session is created, then they can go
    const stats = { fp16Overflows: 0 };
    const externalData = gpuWeights.map((w) => ({ path: w.location, data: gpuWeightBytes(w, stats) }));
    // ORT warns once per weight that is also a graph input (the runtime-cast trick above): silence warnings,
    // unless KLEIN_ORT_LOG_LEVEL asks for ORT's log (0 lists which provider got each node)
    const session = await ort.InferenceSession.create(file, {
      logSeverityLevel: 3,
      ...sessionOptions({ ...sessionCfg, device, ...(externalData.length > 0 ? { externalData } : {}) }),
    });
    externalData.length = 0;
    const feeds: Record<string, ort.Tensor> = {};
    if (graphOpts.weights === 'converted') {
      for (const name of session.inputNames) {
        if (!name.startsWith('weight:')) continue;
        const info = ck.info(name.slice('weight:'.length));
        feeds[name] = new ort.Tensor('float32', readFloat32(info), info.shape);
      }
    }
    const int8Cache = int8 ? { folder: int8.folder, built: int8.built } : undefined;
    const embeddings = int8 || graphOpts.gpu ? ck.info(`${keyPrefix(ck)}embed_tokens.weight`) : undefined;
    const enc = new Qwen3TextEncoder(dir, cfg, outputLayers, hiddenStates, maxPositions, session, feeds, files, precision, int8Cache, embeddings);
    return Object.assign(enc, { device, computeDtype, fp16Overflows: stats.fp16Overflows, graphCached: cached });
  }

  /** Runs the encoder; ids and mask are `[batch, seq]` row-major. */
  async run(inputIds: BigInt64Array, attentionMask: BigInt64Array, batch: number): Promise<Qwen3Output> {
    if (!Number.isInteger(batch) || batch < 1) throw new Error(`batch must be a positive integer, got ${batch}`);
    if (inputIds.length % batch !== 0 || attentionMask.length !== inputIds.length) {
      throw new Error(`input_ids (${inputIds.length}) and attention_mask (${attentionMask.length}) must both hold batch × seq = ${batch} × seq values`);
    }
    const seq = inputIds.length / batch;
    if (seq > this.maxPositions) throw new Error(`sequence length ${seq} exceeds the encoder's ${this.maxPositions} positions`);
    for (const id of inputIds) {
      if (id < 0n || id >= BigInt(this.config.vocabSize)) throw new Error(`token id ${id} is outside the vocabulary (0..${this.config.vocabSize - 1})`);
    }
    const feeds: Record<string, ort.Tensor> = { ...this.feeds, input_ids: i64(inputIds, [batch, seq]), attention_mask: i64(attentionMask, [batch, seq]) };
    if (this.embeddings) feeds.inputs_embeds = new ort.Tensor('float32', embeddingRows(this.embeddings, inputIds), [batch, seq, this.config.hiddenSize]);
    const out = await this.session.run(feeds);
    // real Qwen3 checkpoints have a few huge activation channels: an fp16 overflow is a live risk, and the scan
    // of the context costs microseconds per prompt
    if (this.computeDtype === 'fp16') throwIfOverflowed(out.context.data as Float32Array, 'qwen3: the fp16 text encoder');
    const hiddenStates = new Map<number, Float32Array>();
    for (const k of this.hiddenStates) hiddenStates.set(k, out[`hidden_states.${k}`].data as Float32Array);
    return { context: out.context.data as Float32Array, hiddenStates };
  }

  /** The stacked text context `[batch, seq, contextDim]` the transformer consumes. */
  async embed(inputIds: BigInt64Array, attentionMask: BigInt64Array, batch: number): Promise<Float32Array> {
    return (await this.run(inputIds, attentionMask, batch)).context;
  }

  async close(): Promise<void> {
    for (const k of Object.keys(this.feeds)) delete this.feeds[k]; // let the fp32 copies be collected
    await this.session.release();
  }
}
