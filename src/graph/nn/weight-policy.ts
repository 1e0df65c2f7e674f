// How a Linear or a convolution reads its weight and computes: chosen once per graph build, so the model code never
// says it. Every policy keeps activations, norms, attention and residuals in fp32; only the products differ.
//  - `fp32` (CPU, exact): the weight widened to fp32 once into the weight store; FusedMatMul multiplies by the
//    `[out, in]` matrix directly (transB), so nothing is transposed or folded when the session opens.
//  - `int8` (CPU, fast): the Linears the model selects as int8 products on the CPU's VNNI units (weights:
//    weights/quantize.ts; activations per tensor (`dynamic`) or per row with outlier channels in fp32
//    (`row-outliers`, graph/int8-linear.ts)); the rest as `fp32`.
//  - `gpu-fp32` / `gpu-fp16` (WebGPU, CUDA): MatMul by a weight stored transposed `[in, out]` (WebGPU has no
//    FusedMatMul); in fp16 the activation is cast once per value however many products read it (q, k and v share
//    one cast) and each product is cast back to fp32.
import { Graph, MS_DOMAIN, type Value } from '../onnx-graph.ts';
import type { ElemType } from '../../weights/dtypes.ts';
import { INT8_ROWS_SCHEME, INT8_SCHEME } from '../../weights/quantize.ts';
import { int8Activation, int8Product, type Int8Activation } from '../int8-linear.ts';
import { convertedRef, sourceShape, type WeightRef, type WeightSource } from '../../weights/weight-ref.ts';

/** A Linear's weight as the policy sees it: `[out, in]` rows of stored tensors, maybe a column range. */
export interface LinearWeight {
  /** The model's name of the weight (`double_blocks.0.img_attn.qkv.weight`); int8 selectors match it. */
  name: string;
  /** Unique key of this (block of the) weight: the name plus its row/column range. */
  key: string;
  source: WeightSource;
  /** Output rows `[start, end)` of the weight this product computes (a block of a fused projection). */
  rows?: [number, number];
}

export interface LinearOptions {
  /**
   * The product's input and output may exceed fp16's ±65504 (an unnormalised SwiGLU product feeding a residual
   * stream with massive activations): fp16 policies compute it scaled by this factor and scale back in fp32.
   */
  headroom?: number;
}

export interface ConvAttrs {
  kernel_shape: number[];
  strides: number[];
  pads: number[];
  dilations?: number[];
  group?: number;
}

export interface WeightPolicy {
  /** Names the policy in weight-store folders and compiled-graph keys. */
  readonly tag: string;
  /** What the products compute in (reported to users). */
  readonly dtype: 'fp32' | 'fp16' | 'int8';
  /** `x · Wᵀ` in fp32 for x `[…, in]`. */
  linear(g: Graph, x: Value, w: LinearWeight, o?: LinearOptions): Value;
  /** Conv (NCHW) with weight and optional bias, output fp32. */
  conv(g: Graph, x: Value, weight: { key: string; source: WeightSource }, bias: { key: string; source: WeightSource } | undefined, attrs: ConvAttrs): Value;
  /** A small tensor as stored (fp32 for floats: norm scales, biases, statistics; integer tables unchanged). */
  param(g: Graph, key: string, source: WeightSource): Value;
}

function floatType(source: WeightSource): ElemType {
  const d = source.parts[0].dtype;
  return d === 'F32' || d === 'F16' || d === 'BF16' || d === 'F64' ? 'float32' : d === 'I64' ? 'int64' : d === 'I32' ? 'int32' : d === 'U8' ? 'uint8' : d === 'I8' ? 'int8' : 'bool';
}

function paramRef(key: string, source: WeightSource): WeightRef {
  return convertedRef(key, source, floatType(source));
}

/** CPU exact: fp32 weights, FusedMatMul with transB on the stored `[out, in]` layout. */
export class Fp32Policy implements WeightPolicy {
  readonly tag: string = 'fp32';
  readonly dtype: WeightPolicy['dtype'] = 'fp32';

  linear(g: Graph, x: Value, w: LinearWeight): Value {
    const [out] = sourceShape(w.source);
    const ref = convertedRef(w.key, w.source, 'float32', { dims: [out, sourceShape(w.source).slice(1).reduce((a, b) => a * b, 1)] });
    return g.op('FusedMatMul', [x, g.weight(ref)], { transB: 1 }, { domain: MS_DOMAIN, hint: hintOf(w.name) });
  }

  conv(g: Graph, x: Value, weight: { key: string; source: WeightSource }, bias: { key: string; source: WeightSource } | undefined, attrs: ConvAttrs): Value {
    const inputs = [x, g.weight(convertedRef(weight.key, weight.source, 'float32'))];
    if (bias) inputs.push(g.weight(convertedRef(bias.key, bias.source, 'float32')));
    return g.op('Conv', inputs, { ...attrs }, { hint: hintOf(weight.key) });
  }

  param(g: Graph, key: string, source: WeightSource): Value {
    return g.weight(paramRef(key, source));
  }
}

/**
 * How fast mode's int8 products quantize their activations: `dynamic`, one uint8 scale per tensor (ORT's
 * DynamicQuantizeMatMul); `row-outliers`, one scale per row with the largest input channels in fp32 (int8-linear.ts).
 */
export type Int8Scheme = 'dynamic' | 'row-outliers';
export const INT8_SCHEMES: readonly Int8Scheme[] = ['dynamic', 'row-outliers'];
/** Real checkpoints carry activation outliers that wreck one scale per tensor (docs/benchmarks.md, issue 21). */
export const DEFAULT_INT8_SCHEME: Int8Scheme = 'row-outliers';

/**
 * CPU fast: the Linears `select` names as int8 products on int8 `[in, out]` weights with one fp32 scale per output
 * (activations quantized at run time as `scheme` says); everything else as Fp32Policy. With `row-outliers`, the
 * Linears `secondPass` names also multiply their activation's rounding residual (int8-linear.ts): the component
 * passes those whose input no norm bounds, where one int8 pass loses the most (docs/benchmarks.md, issue 21).
 */
export class Int8Policy extends Fp32Policy {
  override readonly tag: string;
  override readonly dtype: WeightPolicy['dtype'] = 'int8';
  /** The prepared activation of each input a `row-outliers` product read (q, k and v share one), by pass count. */
  private readonly activations = [new WeakMap<Value, Int8Activation>(), new WeakMap<Value, Int8Activation>()];

  constructor(
    private readonly select: (name: string) => boolean,
    readonly scheme: Int8Scheme = DEFAULT_INT8_SCHEME,
    private readonly secondPass: (name: string) => boolean = () => false,
  ) {
    super();
    // the weight store holds what the weight scheme makes; how activations are quantized is in the graphs, whose
    // cache keys follow their content
    this.tag = `int8-${scheme === 'dynamic' ? INT8_SCHEME : INT8_ROWS_SCHEME}`;
  }

  override linear(g: Graph, x: Value, w: LinearWeight): Value {
    if (!this.select(w.name)) return super.linear(g, x, w);
    const [out, inF] = sourceShape(w.source);
    const scheme = this.scheme === 'dynamic' ? INT8_SCHEME : INT8_ROWS_SCHEME;
    const quantized = (output: string, type: ElemType, dims: number[]): Value =>
      g.weight({ key: `${w.key}.${output}`, type, dims, source: w.source, transform: { kind: 'quantize', scheme, output } });
    const q = quantized('q', 'int8', [inF, out]);
    const scale = quantized('scale', 'float32', [out]);
    if (this.scheme === 'dynamic') return g.op('DynamicQuantizeMatMul', [x, q, scale], {}, { domain: MS_DOMAIN, hint: hintOf(w.name) });
    const rows = { values: quantized('rows', 'int16', [inF, out]), scale: quantized('rows.scale', 'float32', [out]) };
    return int8Product(g, this.activation(g, x, inF, this.secondPass(w.name)), { q, scale, outFeatures: out, rows }, hintOf(w.name));
  }

  private activation(g: Graph, x: Value, inFeatures: number, secondPass: boolean): Int8Activation {
    const prepared = this.activations[secondPass ? 1 : 0];
    let a = prepared.get(x);
    if (!a) {
      a = int8Activation(g, x, { inFeatures, hint: 'int8_act', secondPass });
      prepared.set(x, a);
    }
    return a;
  }
}

/** GPU devices: MatMul by `[in, out]` weights in fp32 or fp16 (products only; the rest of the graph stays fp32). */
export class GpuPolicy implements WeightPolicy {
  readonly tag: string;
  /** The fp16 copy of each activation a product read (a Value belongs to one graph, so one map serves all). */
  private readonly halves = new WeakMap<Value, Value>();

  constructor(readonly dtype: 'fp32' | 'fp16') {
    this.tag = `gpu-${dtype}`;
  }

  private get elem(): ElemType {
    return this.dtype === 'fp16' ? 'float16' : 'float32';
  }

  private half(g: Graph, x: Value): Value {
    let h = this.halves.get(x);
    if (!h) {
      h = g.cast(x, 'float16');
      this.halves.set(x, h);
    }
    return h;
  }

  linear(g: Graph, x: Value, w: LinearWeight, o: LinearOptions = {}): Value {
    const wt = g.weight(convertedRef(`${w.key}.T`, w.source, this.elem, { transpose: true }));
    const hint = hintOf(w.name);
    if (this.dtype === 'fp32') return g.op('MatMul', [x, wt], {}, { hint });
    const scaled = o.headroom ? g.op('Mul', [x, g.scalarF32(o.headroom)], {}, { hint: 'prescale' }) : x;
    const y = g.cast(g.op('MatMul', [this.half(g, scaled), wt], {}, { hint }), 'float32');
    return o.headroom ? g.op('Mul', [y, g.scalarF32(1 / o.headroom)], {}, { hint: 'unscale' }) : y;
  }

  conv(g: Graph, x: Value, weight: { key: string; source: WeightSource }, bias: { key: string; source: WeightSource } | undefined, attrs: ConvAttrs): Value {
    const inputs = [this.dtype === 'fp16' ? this.half(g, x) : x, g.weight(convertedRef(`${weight.key}.${this.dtype}`, weight.source, this.elem))];
    if (bias) inputs.push(g.weight(convertedRef(`${bias.key}.${this.dtype}`, bias.source, this.elem)));
    return g.cast(g.op('Conv', inputs, { ...attrs }, { hint: hintOf(weight.key) }), 'float32');
  }

  param(g: Graph, key: string, source: WeightSource): Value {
    return g.weight(paramRef(key, source));
  }
}

function hintOf(name: string): string {
  return name.replace(/\.weight$/, '');
}
