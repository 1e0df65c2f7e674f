// Runs the int8 weight schemes (graph/int8-quantize.ts) on ONNX Runtime's CPU kernels: the conversion workers of a
// weight store load this module (WeightStoreOptions.quantizer) and quantize each Linear a block of rows at a time,
// so the widened fp32 copy and ORT's temporaries stay a few MB whatever the weight's size.
import ort from 'onnxruntime-node';
import { int8QuantizeGraph } from '../graph/int8-quantize.ts';
import { checkQuantizeArgs, widenRows, type Int16Rows, type Int8Quantizer, type Int8Weight, type QuantizeOptions, type WeightRows } from '../weights/quantize.ts';
import { Scratch } from '../weights/scratch.ts';

/** Weights per block: ORT's temporaries are a few times this many fp32 values. */
const BLOCK_VALUES = 1 << 22;

/** A module URL for WeightStoreOptions.quantizer: the workers import it and call `createQuantizer`. */
export const INT8_QUANTIZER_MODULE = new URL(import.meta.url);

/** An Int8Quantizer on `threads` ORT threads (a conversion worker per core runs one each). */
export async function createQuantizer(threads = 1): Promise<Int8Quantizer> {
  const options: ort.InferenceSession.SessionOptions = { intraOpNumThreads: threads, interOpNumThreads: 1, executionMode: 'sequential', graphOptimizationLevel: 'all' };
  const sessions = new Map<boolean, ort.InferenceSession>();
  const session = async (rows: boolean) => {
    let s = sessions.get(rows);
    if (!s) sessions.set(rows, (s = await ort.InferenceSession.create(int8QuantizeGraph({ rows }).serialize(), options)));
    return s;
  };
  // reused memory for the widened block and ORT's outputs (written in place: fresh outputs per block cost page faults)
  const widened = new Scratch();
  const blockOut = { q: new Scratch(), rows: new Scratch() };
  return {
    async quantize(w: WeightRows, N: number, K: number, o: QuantizeOptions = {}): Promise<Int8Weight & { rows?: Int16Rows }> {
      checkQuantizeArgs(w, N, K, o);
      const rows = o.rows === true;
      const s = await session(rows);
      const q = o.into?.q ?? new Int8Array(K * N);
      const scale = new Float32Array(N);
      const exact = rows ? { values: o.into?.rows ?? new Int16Array(K * N), scale: new Float32Array(N) } : undefined;
      const block = Math.max(1, Math.min(N, Math.floor(BLOCK_VALUES / K)));
      for (let n0 = 0; n0 < N; n0 += block) {
        const n1 = Math.min(N, n0 + block);
        const r = n1 - n0;
        const x = widenRows(w, n0, n1, K, widened.float32(block * K));
        const qPart = blockOut.q.int8(K * r);
        const rowsPart = exact && blockOut.rows.int16(K * r);
        const fetches: Record<string, ort.Tensor> = { q: new ort.Tensor('int8', qPart, [K, r]), scale: new ort.Tensor('float32', scale.subarray(n0, n1), [r]) };
        if (exact && rowsPart) Object.assign(fetches, { rows: new ort.Tensor('int16', rowsPart, [K, r]), 'rows.scale': new ort.Tensor('float32', exact.scale.subarray(n0, n1), [r]) });
        await s.run({ w: new ort.Tensor('float32', x, [r, K]) }, fetches);
        placeColumns(qPart, q, n0, n1, N, K);
        if (exact && rowsPart) placeColumns(rowsPart, exact.values, n0, n1, N, K);
      }
      return { q, scale, inFeatures: K, outFeatures: N, ...(exact ? { rows: exact } : {}) };
    },
    async release() {
      await Promise.all([...sessions.values()].map((s) => s.release()));
    },
  };
}

/** A block's `[K, n1 − n0]` output into columns `[n0, n1)` of the `[K, N]` whole. */
function placeColumns<T extends Int8Array | Int16Array>(part: T, whole: T, n0: number, n1: number, N: number, K: number): void {
  const width = n1 - n0;
  for (let k = 0; k < K; k++) whole.set(part.subarray(k * width, (k + 1) * width), k * N + n0);
}
