// The int8 Linear that survives activation outliers (issue 21): per-row (per-token) activation scales, and the few
// input channels with the largest magnitudes taken out of the int8 product and multiplied in fp32 (LLM.int8()'s
// decomposition, with the channels picked at run time, so no calibration data is needed and channels that move
// with the timestep or the prompt are caught too). The weights are the ones weights/quantize.ts defines (int8
// `[in, out]`, one fp32 scale per output column), optionally with its exact rows (int16, 254× finer), which make the
// gathered outlier rows exact (their int8 rounding otherwise dominates the error where the outliers are large).
// Int8Policy (nn/weight-policy.ts) emits it for `row-outliers`; the weight store holds the tensors.
//
// For x `[…, K]` and a weight `W ≈ q · scale`:
//   o      = the `outlierChannels` input channels with the largest max |x| over every 8th row (TopK of a column max)
//   x̃      = x with the columns o set to 0
//   r[m]   = max_k |x̃[m, k]| / 127                         (one scale per row)
//   y      = MatMulIntegerToFloat(QuantizeLinear(x̃, r, 128), q, r, scale, 128)   (uint8 × int8 on VNNI)
//          + x[:, o] · (rows[o, :] · rows.scale)   (fp32, K = |o|; without exact rows: q[o, :] · scale)
//          (+ MatMulIntegerToFloat(QuantizeLinear(x̃ − q̃·r, r/254, 128), q, r/254, scale, 128) with `secondPass`)
// The activation half (o, x̃'s uint8 values, r, x[:, o]) is computed once per input and shared by every Linear
// reading that input (q, k, v; gate, up): `int8Activation` once, `int8Product` per weight.
import type { Graph, Value } from './onnx-graph.ts';
import { MS_DOMAIN } from './onnx-graph.ts';

/** Input channels multiplied in fp32 per product when not told otherwise (measured: docs/benchmarks.md, fast mode). */
const DEFAULT_OUTLIER_CHANNELS = 16;

export interface Int8ActivationOptions {
  /** Input features K (the last dim of x). */
  inFeatures: number;
  /** Channels taken out of the int8 product and multiplied in fp32, picked per run (0: none). Default 16. */
  outlierChannels?: number;
  hint?: string;
  /**
   * Quantize the rounding residual of x too and multiply it by the same int8 weight: a second product that makes
   * the activation ~254× finer (for inputs no norm bounds, whose row maxima sit far above their typical values).
   */
  secondPass?: boolean;
}

/** An activation prepared for int8 products: what every Linear reading the same input shares. */
export interface Int8Activation {
  /** uint8 `[M, K]` (zero point 128), the outlier columns zeroed before quantizing. */
  q: Value;
  /** fp32 `[M, 1]`: the row scales. */
  rowScale: Value;
  /** int64 `[k]` and fp32 `[M, k]`: the outlier channels and x's values there, when `outlierChannels` > 0. */
  outliers?: { channels: Value; values: Value };
  /** uint8 `[M, K]` and fp32 `[M, 1]`: x̃ − dequantized q, quantized at rowScale/254 (`secondPass`). */
  residual?: { q: Value; rowScale: Value };
  /** The output shape for N outputs: x's leading dims, then N. */
  outShape?: (outFeatures: number) => Value;
}

/** The int8 weight of one Linear: the scheme's tensors (weights/quantize.ts) as initializers. */
export interface Int8LinearWeight {
  /** int8 `[inFeatures, outFeatures]`. */
  q: Value;
  /** fp32 `[outFeatures]`. */
  scale: Value;
  outFeatures: number;
  /** Optional fp32 `[outFeatures]`. */
  bias?: Value;
  /**
   * The scheme's exact rows (int16 `[in, out]`, fp32 `[out]`), for the outlier-row gathers: exact to half of
   * `scale / 254`, and an initializer of their own, so ORT packs `q` for the product and lets its mapped original go
   * while only the gathered rows' pages of these stay resident.
   */
  rows?: { values: Value; scale: Value };
}

/** Channel maxima are taken over every ROW_STRIDE-th row: a full pass over x cost ~10 % of a product. */
const ROW_STRIDE = 8;

const u8 = (g: Graph, v: number): Value => g.const({ type: 'uint8', dims: [], data: Uint8Array.of(v) }, 'zp128');

/** Column-wise max |x| over rows of 2-D x, as two reductions (no |x| temporary). */
function absMax(g: Graph, x: Value, axis: number, keepdims: 0 | 1): Value {
  const ax = g.constI64([axis]);
  return g.op('Max', [g.op('ReduceMax', [x, ax], { keepdims }), g.op('Neg', [g.op('ReduceMin', [x, ax], { keepdims })])]);
}

/** Prepares x `[…, K]` for `int8Product` (see the file comment). */
export function int8Activation(g: Graph, x: Value, o: Int8ActivationOptions): Int8Activation {
  const K = o.inFeatures;
  const k = Math.min(o.outlierChannels ?? DEFAULT_OUTLIER_CHANNELS, K);
  const hint = o.hint ?? 'int8_act';
  const lead = g.op('Shape', [x], { end: -1 }, { hint: `${hint}_lead` });
  const x2 = g.op('Reshape', [x, g.constI64([-1, K])], {}, { hint: `${hint}_2d` });
  const outShape = (N: number) => g.op('Concat', [lead, g.constI64([N])], { axis: 0 }, { hint: `${hint}_shape` });
  let xi = x2;
  let outliers: Int8Activation['outliers'];
  if (k > 0) {
    // channel maxima over every ROW_STRIDE-th row: outlier channels are large on most rows, and a row whose own
    // outliers are missed still gets its own scale (it loses only its own precision)
    const sample = g.op('Slice', [x2, g.constI64([0]), g.constI64([Number.MAX_SAFE_INTEGER]), g.constI64([0]), g.constI64([ROW_STRIDE])], {}, { hint: `${hint}_sample` });
    const [, channels] = g.opN('TopK', [absMax(g, sample, 0, 0), g.constI64([k])], 2, { sorted: 0 }, { hint: `${hint}_outlier_channels` });
    const mask = g.op('ScatterElements', [g.constF32(new Float32Array(K).fill(1), [K], 'ones'), channels, g.constF32(new Float32Array(k), [k], 'zeros')], { axis: 0 }, { hint: `${hint}_mask` });
    xi = g.op('Mul', [x2, mask], {}, { hint: `${hint}_inliers` });
    outliers = { channels, values: g.op('Gather', [x2, channels], { axis: 1 }, { hint: `${hint}_outliers` }) };
  }
  // one scale per row: its max |x| over 127; an all-zero row gets a tiny scale (its values quantize to 0)
  const rowScale = g.op('Div', [g.op('Max', [absMax(g, xi, 1, 1), g.scalarF32(1e-30)]), g.scalarF32(127)], {}, { hint: `${hint}_row_scale` });
  const flat = g.op('Reshape', [rowScale, g.constI64([-1])]);
  const zp = g.op('Expand', [u8(g, 128), g.op('Shape', [flat])]);
  const q = g.op('QuantizeLinear', [xi, flat, zp], { axis: 0 }, { hint: `${hint}_u8` });
  let residual: Int8Activation['residual'];
  if (o.secondPass) {
    // rounding leaves |x̃ − q·r| ≤ r/2, so r/254 maps the residual onto ±127 without clipping
    const rest = g.op('Sub', [xi, g.op('DequantizeLinear', [q, flat, zp], { axis: 0 })], {}, { hint: `${hint}_residual` });
    const restScale = g.op('Div', [rowScale, g.scalarF32(254)]);
    const restQ = g.op('QuantizeLinear', [rest, g.op('Reshape', [restScale, g.constI64([-1])]), zp], { axis: 0 }, { hint: `${hint}_residual_u8` });
    residual = { q: restQ, rowScale: restScale };
  }
  return { q, rowScale, outliers, outShape, residual };
}

/** `x Wᵀ (+ bias)` in fp32 from a prepared activation and an int8 weight. */
export function int8Product(g: Graph, a: Int8Activation, w: Int8LinearWeight, hint = 'int8_linear'): Value {
  // the bias is added apart: MatMulIntegerToFloat applies a non-scalar A scale after its bias (it would scale it)
  let y = g.op('MatMulIntegerToFloat', [a.q, w.q, a.rowScale, w.scale, u8(g, 128)], {}, { domain: MS_DOMAIN, hint });
  if (a.residual) {
    const rest = g.op('MatMulIntegerToFloat', [a.residual.q, w.q, a.residual.rowScale, w.scale, u8(g, 128)], {}, { domain: MS_DOMAIN, hint: `${hint}_residual` });
    y = g.op('Add', [y, rest], {}, { hint: `${hint}_plus_residual` });
  }
  if (a.outliers) {
    // the outlier channels' rows of W, dequantized: [k, N]
    const [table, scale] = w.rows ? [w.rows.values, w.rows.scale] : [w.q, w.scale];
    const rows = g.op('Mul', [g.op('Cast', [g.op('Gather', [table, a.outliers.channels], { axis: 0 })], { to: 1 }), scale], {}, { hint: `${hint}_outlier_rows` });
    y = g.op('Gemm', [a.outliers.values, rows, y], {}, { hint: `${hint}_plus_outliers` });
  }
  if (w.bias) y = g.op('Add', [y, w.bias], {}, { hint: `${hint}_bias` });
  return a.outShape ? g.op('Reshape', [y, a.outShape(w.outFeatures)], {}, { hint }) : y;
}
