// The int8 weight schemes of weights/quantize.ts as an ONNX graph: ORT's vectorised QuantizeLinear, Transpose and
// elementwise kernels quantize a checkpoint ~4× faster than a JavaScript loop (docs/benchmarks.md, "fast first run"),
// and the conversion workers run it (runtime/int8-quantizer.ts) on blocks of rows.
//
// In: w fp32 `[rows, in]` (PyTorch's Linear layout). Out, per row n (one output column of the int8 Linear):
//   scale[n] = max_k |w[n, k]| / 127 (fp32 division; an all-zero row gets 1)
//   q        = QuantizeLinear(w, scale) transposed to `[in, rows]`: round half to even, in [-127, 127]
// and with `rows` (INT8_ROWS_SCHEME) the same weight 254× finer, in int16:
//   fine[n]  = scale[n] / 254
//   rows     = QuantizeLinear(w, fine) transposed: exact to half a fine step, |rows| ≤ 127·254 < 2¹⁵
import { Graph } from './onnx-graph.ts';

/** Steps of the exact rows per step of q (127 steps of q are 32258 fine steps: within int16). */
const FINE_STEPS = 254;

/** The graph: input `w`, outputs `q`, `scale` and, with `rows`, `rows` and `rows.scale` (see the file comment). */
export function int8QuantizeGraph(o: { rows: boolean }): Graph {
  const g = new Graph(o.rows ? 'int8-quantize-rows' : 'int8-quantize');
  const w = g.input('w', 'float32', ['rows', 'in']);
  const axis = g.constI64([1]);
  const absMax = g.op('Max', [g.op('ReduceMax', [w, axis], { keepdims: 0 }), g.op('Neg', [g.op('ReduceMin', [w, axis], { keepdims: 0 })])]);
  const scale = g.op('Where', [g.op('Equal', [absMax, g.scalarF32(0)]), g.scalarF32(1), g.op('Div', [absMax, g.scalarF32(127)])], {}, { hint: 'scale' });
  const zero = g.op('Expand', [g.const({ type: 'int8', dims: [], data: Int8Array.of(0) }), g.op('Shape', [scale])]);
  const q = g.op('QuantizeLinear', [w, scale, zero], { axis: 0 }, { hint: 'q' });
  const transposed = (x: ReturnType<Graph['op']>) => g.op('Transpose', [x], { perm: [1, 0] });
  g.output(transposed(q), 'q');
  g.output(scale, 'scale');
  if (o.rows) {
    const fine = g.op('Div', [scale, g.scalarF32(FINE_STEPS)], {}, { hint: 'fine' });
    const zero16 = g.op('Expand', [g.const({ type: 'int16', dims: [], data: Uint16Array.of(0) }), g.op('Shape', [scale])]);
    g.output(transposed(g.op('QuantizeLinear', [w, fine, zero16], { axis: 0 }, { hint: 'rows' })), 'rows');
    g.output(fine, 'rows.scale');
  }
  return g;
}
