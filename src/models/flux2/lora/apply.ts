// LoRA applied in the graph as low-rank side products: beside every Linear of the transformer, y += (x·Aᵀ)·Bᵀ with
// Aᵀ [in, R] and Bᵀ [R, out] graph inputs whose rank R is symbolic. One compiled adapter graph therefore serves every
// LoRA set: several LoRAs are concatenated along R (scale·alpha/rank folded into Bᵀ), a Linear no LoRA of the set
// adapts is fed R = 0, and switching sets changes the feeds only. The side products are plain fp32 MatMuls whatever
// the base product computes in (int8 in fast mode, fp16 on GPUs), so they run on every execution provider.
// Measurements behind the choice (vs weights merged per LoRA set): docs/benchmarks.md, "LoRA".
import type { Graph, Value } from '../../../graph/onnx-graph.ts';
import type { LinearAdapter } from '../../../graph/nn/layers.ts';
import type { LinearWeight } from '../../../graph/nn/weight-policy.ts';
import { ort } from '../../../runtime/session.ts';
import { sourceShape } from '../../../weights/weight-ref.ts';
import type { StackedLora } from './load.ts';

/** One graph input of the adapter: Aᵀ of a Linear (or of a column block of it), or Bᵀ of a Linear (or a row block). */
export interface LoraInput {
  name: string;
  /** BFL weight name, e.g. `double_blocks.0.img_attn.qkv.weight`. */
  weight: string;
  part: 'down' | 'up';
  /** Input columns (down) or output rows (up) of the block; absent: all of them. */
  range?: [number, number];
  /** Features of the block: input columns (down) or output rows (up). */
  width: number;
}

/**
 * Builds the side products while the forward is built (pass `adapter` in the Layers context) and records the graph
 * inputs they read. `carry`: every input passes through an Identity, so the planner computes it in the
 * step-invariant session whose outputs stay on a GPU — the LoRA tensors are uploaded once per generation, not per
 * step.
 */
export class LoraAdapter {
  readonly inputs: LoraInput[] = [];
  private readonly values = new Map<string, Value>();
  /** x·Aᵀ per activation: q, k and v (gate and up) read one activation and share one down product. */
  private readonly downs = new WeakMap<Value, Map<string, Value>>();

  constructor(private readonly o: { carry?: boolean } = {}) {}

  readonly adapter: LinearAdapter = (g, x, w) => this.sideProduct(g, x, w);

  private sideProduct(g: Graph, x: Value, w: LinearWeight): Value {
    const base = w.name.replace(/\.weight$/, '');
    const [rows, cols] = sourceShape(w.source);
    const rank = `rank:${base}`;
    const colRange = w.source.cols;
    const downName = `lora.${base}.down${colRange ? `.cols_${colRange[0]}_${colRange[1]}` : ''}`;
    let perX = this.downs.get(x);
    if (!perX) this.downs.set(x, (perX = new Map()));
    let down = perX.get(downName);
    if (!down) {
      const a = this.input(g, { name: downName, weight: w.name, part: 'down', range: colRange, width: cols }, [cols, rank]);
      down = g.op('MatMul', [x, a], {}, { hint: 'lora_down' });
      perX.set(downName, down);
    }
    const upName = `lora.${base}.up${w.rows ? `.rows_${w.rows[0]}_${w.rows[1]}` : ''}`;
    const b = this.input(g, { name: upName, weight: w.name, part: 'up', range: w.rows, width: rows }, [rank, rows]);
    return g.op('MatMul', [down, b], {}, { hint: 'lora_up' });
  }

  private input(g: Graph, spec: LoraInput, dims: [number | string, number | string]): Value {
    let v = this.values.get(spec.name);
    if (!v) {
      this.inputs.push(spec);
      const raw = g.input(spec.name, 'float32', dims);
      v = this.o.carry ? g.op('Identity', [raw], {}, { hint: 'lora_on_device' }) : raw;
      this.values.set(spec.name, v);
    }
    return v;
  }

  get inputNames(): Set<string> {
    return new Set(this.inputs.map((i) => i.name));
  }
}

/**
 * The adapter's feeds for a stacked LoRA set: Aᵀ `[in, R]` and Bᵀ `[R, out]` per block, transposed and sliced on the
 * host (`stackLoras` already folded scale·alpha/rank into B); `[in, 0]` and `[0, out]` for Linears the set leaves
 * alone — or, with `emptyRank` 1, a rank-1 pair of zeros (WebGPU cannot take empty tensors).
 */
export function loraFeeds(inputs: readonly LoraInput[], stacked: ReadonlyMap<string, StackedLora>, o: { emptyRank?: 0 | 1 } = {}): Map<string, ort.Tensor> {
  const feeds = new Map<string, ort.Tensor>();
  for (const inp of inputs) {
    const s = stacked.get(inp.weight);
    const R = s?.rank ?? o.emptyRank ?? 0;
    const n = inp.width;
    const data = new Float32Array(R * n);
    if (s && inp.part === 'down') {
      const c0 = inp.range?.[0] ?? 0;
      for (let k = 0; k < R; k++) {
        const row = s.down.subarray(k * s.inFeatures + c0, k * s.inFeatures + c0 + n);
        for (let j = 0; j < n; j++) data[j * R + k] = row[j];
      }
    } else if (s) {
      const r0 = inp.range?.[0] ?? 0;
      for (let i = 0; i < n; i++) {
        const row = s.up.subarray((r0 + i) * R, (r0 + i + 1) * R);
        for (let k = 0; k < R; k++) data[k * n + i] = row[k];
      }
    }
    feeds.set(inp.name, new ort.Tensor('float32', data, inp.part === 'down' ? [n, R] : [R, n]));
  }
  return feeds;
}

/** Bytes the feeds of a stacked set hold (fp32): what a LoRA set costs in memory, and on a GPU in uploads. */
export function loraFeedBytes(feeds: ReadonlyMap<string, ort.Tensor>): number {
  let n = 0;
  for (const t of feeds.values()) n += (t.data as Float32Array).byteLength;
  return n;
}
