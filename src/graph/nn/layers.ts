// The layer library: what model code calls, the way a PyTorch module calls its submodules. `nn.at('img_attn')`
// is the submodule, `nn.linear(x, 'qkv')` its Linear (weight `img_attn.qkv.weight`): model files read like BFL's
// model.py. How a weight is read and which precision a product computes in is the WeightPolicy's business, chosen
// once per build by the runtime; a LoRA side product (adapter) is added beside any Linear it names.
import type { Graph, Value } from '../onnx-graph.ts';
import { MS_DOMAIN } from '../onnx-graph.ts';
import type { TensorInfo } from '../../weights/safetensors.ts';
import { sliceRows, sourceShape, type WeightSource } from '../../weights/weight-ref.ts';
import type { LinearOptions, LinearWeight, WeightPolicy } from './weight-policy.ts';

/** A model's weights by its own names (the checkpoint layout mapped away). */
export interface ModelWeights {
  /** The stored tensors whose rows, concatenated, make weight `name`; throws when it is missing. */
  parts(name: string): TensorInfo[];
  has(name: string): boolean;
}

/** A side product to add to a Linear's output (LoRA), or undefined; built by the runtime (models/flux2/lora/apply.ts). */
export type LinearAdapter = (g: Graph, x: Value, w: LinearWeight) => Value | undefined;

export interface LinearCall extends LinearOptions {
  /** Output rows `[start, end)` of the weight (one part of a fused q|k|v projection). */
  rows?: [number, number];
  /** Input columns `[start, end)` (one part of a Linear over a concatenation). */
  cols?: [number, number];
  /** The bias to add: a name, none (`false`), or by default `<name>.bias` when the checkpoint has it. */
  bias?: false | string;
}

export interface ConvCall {
  stride?: number;
  /** [top, left, bottom, right]; default `(k − 1) / 2` on every side. */
  pads?: number[];
  dilation?: number;
  group?: number;
}

export interface Context {
  g: Graph;
  weights: ModelWeights;
  policy: WeightPolicy;
  adapter?: LinearAdapter;
}

const onesCache = new WeakMap<Graph, Map<number, Value>>();

export class Layers {
  constructor(
    private readonly cx: Context,
    /** Name prefix of this module's weights (`double_blocks.0.`). */
    readonly prefix = '',
  ) {}

  get g(): Graph {
    return this.cx.g;
  }

  get policy(): WeightPolicy {
    return this.cx.policy;
  }

  /** The submodule `name` (weights `prefix + name + '.'…`); graph names are scoped alike. */
  at(name: string): Layers {
    return new Layers(this.cx, `${this.prefix}${name}.`);
  }

  /** Runs `fn` inside submodule `name`, its graph nodes scoped and marked as a place the planner may cut. */
  block<T>(name: string, fn: (nn: Layers) => T): T {
    return this.g.within(name, () => this.g.mark(`${this.prefix}${name}`, () => fn(this.at(name))));
  }

  has(name: string): boolean {
    return this.cx.weights.has(this.prefix + name);
  }

  /** Shape of weight `name` (rows of its parts concatenated). */
  shape(name: string): number[] {
    return sourceShape({ parts: this.cx.weights.parts(this.prefix + name) });
  }

  private source(name: string, rows?: [number, number], cols?: [number, number]): WeightSource {
    const parts = this.cx.weights.parts(name);
    return { parts: rows ? sliceRows(parts, rows[0], rows[1]) : parts, cols };
  }

  /** PyTorch `Linear`: `x Wᵀ (+ b)` with W `<name>.weight` `[out, in]`. */
  linear(x: Value, name: string, o: LinearCall = {}): Value {
    const full = `${this.prefix}${name}.weight`;
    const tag = `${o.rows ? `.rows_${o.rows[0]}_${o.rows[1]}` : ''}${o.cols ? `.cols_${o.cols[0]}_${o.cols[1]}` : ''}`;
    const w: LinearWeight = { name: full, key: `${full}${tag}`, source: this.source(full, o.rows, o.cols), rows: o.rows };
    let y = this.cx.policy.linear(this.g, x, w, { headroom: o.headroom });
    const side = this.cx.adapter?.(this.g, x, w);
    if (side) y = this.g.op('Add', [y, side], {}, { hint: 'lora' });
    const biasName = o.bias === false ? undefined : (o.bias ?? `${name}.bias`);
    if (biasName && (o.bias !== undefined || this.has(biasName))) {
      const full = `${this.prefix}${biasName}`;
      y = this.g.op('Add', [y, this.cx.policy.param(this.g, o.rows ? `${full}${tag}` : full, this.source(full, o.rows))], {}, { hint: 'bias' });
    }
    return y;
  }

  /** PyTorch `Conv2d` (NCHW) with weight `<name>.weight` and, when present, `<name>.bias`. */
  conv(x: Value, name: string, o: ConvCall = {}): Value {
    const wName = `${this.prefix}${name}.weight`;
    const [, , kh, kw] = this.shape(`${name}.weight`);
    const bName = `${this.prefix}${name}.bias`;
    const bias = this.cx.weights.has(bName) ? { key: bName, source: this.source(bName) } : undefined;
    const d = o.dilation ?? 1;
    const pads = o.pads ?? [(d * (kh - 1)) >> 1, (d * (kw - 1)) >> 1, (d * (kh - 1)) >> 1, (d * (kw - 1)) >> 1];
    const s = o.stride ?? 1;
    return this.cx.policy.conv(this.g, x, { key: wName, source: this.source(wName) }, bias, {
      kernel_shape: [kh, kw],
      strides: [s, s],
      pads,
      ...(d !== 1 ? { dilations: [d, d] } : {}),
      ...(o.group ? { group: o.group } : {}),
    });
  }

  /** A small weight as a value: fp32 for floats (norm scales, biases, statistics), integer tables as stored. */
  param(name: string): Value {
    const full = this.prefix + name;
    return this.cx.policy.param(this.g, full, this.source(full));
  }

  /** LayerNorm over the last axis; with `affine`, `<affine>.weight` and `<affine>.bias`, else no affine. */
  layerNorm(x: Value, eps: number, affine?: string, dim?: number): Value {
    const g = this.g;
    if (affine) return g.op('LayerNormalization', [x, this.param(`${affine}.weight`), this.param(`${affine}.bias`)], { axis: -1, epsilon: { float: eps } }, { hint: affine });
    if (!dim) throw new Error('layerNorm without affine weights needs the normalised dim');
    return g.op('LayerNormalization', [x, this.ones(dim)], { axis: -1, epsilon: { float: eps } }, { hint: 'layernorm' });
  }

  /** RMSNorm over the last axis, `x · rsqrt(mean(x²) + eps) · <scale>` in fp32. */
  rmsNorm(x: Value, scale: string, eps: number): Value {
    return this.g.op('SimplifiedLayerNormalization', [x, this.param(scale)], { axis: -1, epsilon: { float: eps } }, { hint: scale });
  }

  /**
   * GroupNorm (affine `<name>.weight/bias`) as InstanceNormalization over `[B, groups, C/groups·H·W]` plus the
   * per-channel affine: ORT has no CPU kernel for GroupNormalization-21 and expands it into ~12 full-tensor passes.
   */
  groupNorm(x: Value, name: string, groups: number, eps: number): Value {
    const g = this.g;
    const grouped = g.op('Reshape', [x, g.constI64([0, groups, -1])]);
    const ones = g.constF32(new Float32Array(groups).fill(1), [groups], 'ones');
    const zeros = g.constF32(new Float32Array(groups), [groups], 'zeros');
    const normed = g.op('InstanceNormalization', [grouped, ones, zeros], { epsilon: { float: eps } }, { hint: `${name}.groupnorm` });
    const perChannel = g.constI64([-1, 1, 1]);
    const scale = g.op('Reshape', [this.param(`${name}.weight`), perChannel]);
    const bias = g.op('Reshape', [this.param(`${name}.bias`), perChannel]);
    return g.op('Add', [g.op('Mul', [g.op('Reshape', [normed, g.op('Shape', [x])]), scale]), bias], {}, { hint: name });
  }

  /** Eval-mode BatchNorm (`<name>.weight/bias/running_mean/running_var`). */
  batchNorm(x: Value, name: string, eps: number): Value {
    const args = ['weight', 'bias', 'running_mean', 'running_var'].map((n) => this.param(`${name}.${n}`));
    return this.g.op('BatchNormalization', [x, ...args], { epsilon: { float: eps } }, { hint: name });
  }

  /** A ones vector of length `n`, one per graph however many norms use it. */
  private ones(n: number): Value {
    let byDim = onesCache.get(this.g);
    if (!byDim) onesCache.set(this.g, (byDim = new Map()));
    let v = byDim.get(n);
    if (!v) byDim.set(n, (v = this.g.constF32(new Float32Array(n).fill(1), [n], 'ones')));
    return v;
  }

  silu(x: Value): Value {
    return this.g.op('Mul', [x, this.g.op('Sigmoid', [x])], {}, { hint: 'silu' });
  }

  /**
   * `softmax(q kᵀ · scale) v` per head over the whole sequence, no mask; q, k, v and the result `[B, L, heads·d]`.
   * com.microsoft MultiHeadAttention takes this layout as is and never materialises the score matrix on the CPU.
   */
  attention(q: Value, k: Value, v: Value, heads: number, scale?: number): Value {
    return this.g.op('MultiHeadAttention', [q, k, v], { num_heads: heads, ...(scale ? { scale: { float: scale } } : {}) }, { domain: MS_DOMAIN, hint: 'attention' });
  }
}
