// LoRA applied in the graph as low-rank side products: beside every Linear of the transformer, y += (x·Aᵀ)·Bᵀ with
// A [R, in] and Bᵀ [R, out] graph inputs whose rank R is symbolic. One compiled adapter graph therefore serves every
// LoRA set: several LoRAs are concatenated along R (scale·alpha/rank folded into Bᵀ), a Linear no LoRA of the set
// adapts is fed R = 0, and switching sets changes the feeds only — rows copied from each file's matrices, which are
// brought into that layout once per file. Aᵀ is taken in the graph, where the planner puts it in the step-invariant
// session (once per generation). The side products are plain fp32 MatMuls whatever the base product computes in
// (int8 in fast mode, fp16 on GPUs), so they run on every execution provider.
// Measurements behind the choice (vs weights merged per LoRA set): docs/benchmarks.md, "LoRA".
import type { Graph, Value } from '../../../graph/onnx-graph.ts';
import type { LinearAdapter } from '../../../graph/nn/layers.ts';
import type { LinearWeight } from '../../../graph/nn/weight-policy.ts';
import { ort } from '../../../runtime/session.ts';
import { sourceShape } from '../../../weights/weight-ref.ts';
import type { AppliedLora, LoadedLora, LoraTarget } from './load.ts';

/** One graph input of the adapter: A of a Linear (or of a column block of it), or Bᵀ of a Linear (or a row block). */
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
 * inputs they read, all `[R, width]`. `carry`: every Bᵀ passes through an Identity, so that, like Aᵀ, it is computed
 * by the step-invariant session, whose outputs stay on a GPU: the LoRA tensors are uploaded once per generation.
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
      const aT = this.input(g, { name: downName, weight: w.name, part: 'down', range: colRange, width: cols }, rank, (a) => g.op('Transpose', [a], { perm: [1, 0] }, { hint: 'lora_a_t' }));
      down = g.op('MatMul', [x, aT], {}, { hint: 'lora_down' });
      perX.set(downName, down);
    }
    const upName = `lora.${base}.up${w.rows ? `.rows_${w.rows[0]}_${w.rows[1]}` : ''}`;
    const bT = this.input(g, { name: upName, weight: w.name, part: 'up', range: w.rows, width: rows }, rank, (b) => (this.o.carry ? g.op('Identity', [b], {}, { hint: 'lora_on_device' }) : b));
    return g.op('MatMul', [down, bT], {}, { hint: 'lora_up' });
  }

  /** The input `[rank, width]` (declared once however many products read it), through `use`. */
  private input(g: Graph, spec: LoraInput, rank: string, use: (raw: Value) => Value): Value {
    let v = this.values.get(spec.name);
    if (!v) {
      this.inputs.push(spec);
      v = use(g.input(spec.name, 'float32', [rank, spec.width]));
      this.values.set(spec.name, v);
    }
    return v;
  }

  get inputNames(): Set<string> {
    return new Set(this.inputs.map((i) => i.name));
  }
}

/** One module of a LoRA in the feeds' layout: A `[r, in]` as stored, Bᵀ `[r, out]` with alpha/rank folded in. */
interface PreparedTarget extends Omit<LoraTarget, 'up' | 'alpha' | 'module'> {
  upT: Float32Array;
}

/** Per loaded file, once (a LoraCache hands out the same object for the same file). */
const prepared = new WeakMap<LoadedLora, Map<string, PreparedTarget[]>>();

function prepare(lora: LoadedLora): Map<string, PreparedTarget[]> {
  let byWeight = prepared.get(lora);
  if (byWeight) return byWeight;
  byWeight = new Map();
  for (const t of lora.targets) {
    const upT = new Float32Array(t.rank * t.outFeatures);
    const f = t.alpha / t.rank;
    for (let i = 0; i < t.outFeatures; i++) for (let k = 0; k < t.rank; k++) upT[k * t.outFeatures + i] = f * t.up[i * t.rank + k];
    const list = byWeight.get(t.weight) ?? [];
    list.push({ weight: t.weight, rows: t.rows, rank: t.rank, inFeatures: t.inFeatures, outFeatures: t.outFeatures, down: t.down, upT });
    byWeight.set(t.weight, list);
  }
  prepared.set(lora, byWeight);
  return byWeight;
}

/** The modules of a set that adapt `weight`, each with its scale (scale 0 left out). */
function members(applied: readonly AppliedLora[], weight: string): Array<{ t: PreparedTarget; scale: number }> {
  return applied.filter((a) => a.scale !== 0).flatMap((a) => (prepare(a.lora).get(weight) ?? []).map((t) => ({ t, scale: a.scale })));
}

/**
 * The adapter's feeds for a set of LoRAs: per block, the members' A rows (their columns of it) and scaled Bᵀ rows
 * (their output rows inside the block, zeros elsewhere) one after another along R; `[0, width]` for Linears the set
 * leaves alone — or, with `emptyRank` 1, a row of zeros (WebGPU takes no empty tensors).
 */
export function loraFeeds(inputs: readonly LoraInput[], applied: readonly AppliedLora[], o: { emptyRank?: 0 | 1 } = {}): Map<string, ort.Tensor> {
  const feeds = new Map<string, ort.Tensor>();
  const byWeight = new Map<string, ReturnType<typeof members>>();
  for (const inp of inputs) {
    let list = byWeight.get(inp.weight);
    if (!list) byWeight.set(inp.weight, (list = members(applied, inp.weight)));
    const R = list.reduce((n, m) => n + m.t.rank, 0) || (o.emptyRank ?? 0);
    const n = inp.width;
    const data = new Float32Array(R * n);
    let r0 = 0;
    for (const { t, scale } of list) {
      if (inp.part === 'down') {
        const c0 = inp.range?.[0] ?? 0;
        for (let k = 0; k < t.rank; k++) data.set(t.down.subarray(k * t.inFeatures + c0, k * t.inFeatures + c0 + n), (r0 + k) * n);
      } else {
        // the member's output rows [m0, m1) of the weight against this block's [b0, b0 + n)
        const b0 = inp.range?.[0] ?? 0;
        const m0 = t.rows?.[0] ?? 0;
        const lo = Math.max(b0, m0);
        const hi = Math.min(b0 + n, m0 + t.outFeatures);
        for (let k = 0; k < t.rank && lo < hi; k++) {
          const src = t.upT.subarray(k * t.outFeatures + lo - m0, k * t.outFeatures + hi - m0);
          const at = (r0 + k) * n + lo - b0;
          for (let i = 0; i < src.length; i++) data[at + i] = scale * src[i];
        }
      }
      r0 += t.rank;
    }
    feeds.set(inp.name, new ort.Tensor('float32', data, [R, n]));
  }
  return feeds;
}

/** Whether a set changes the model at all (some LoRA at a non-zero scale with a module). */
export function adaptsAnything(applied: readonly AppliedLora[]): boolean {
  return applied.some((a) => a.scale !== 0 && a.lora.targets.length > 0);
}

/** Host bytes a set holds while applied: its matrices as read, Bᵀ as prepared, and the feeds (fp32, three copies). */
export function loraHostBytes(applied: readonly AppliedLora[]): number {
  return 3 * applied.reduce((n, a) => n + a.lora.targets.reduce((m, t) => m + 4 * t.rank * (t.inFeatures + t.outFeatures), 0), 0);
}
