// The reference a LoRA run is checked against: a new checkpoint whose weights are W + Σ scale·(alpha/rank)·B·A,
// written in the base checkpoint's own layout (a BFL file stays BFL, a diffusers one keeps its to_q/to_k/to_v and
// its swapped norm_out halves). It also shows how a target in BFL rows lands on the tensors a layout stores.
import type { Flux2Config } from '../config.ts';
import { diffusersSource, flux2BflShapes, openFlux2Checkpoint, type Flux2Layout, type Flux2Weights } from '../checkpoint.ts';
import type { AppliedLora, LoraTarget } from './load.ts';
import { f32ToBf16, f32ToF16, readFloat32, readRaw, writeSafetensors, type TensorData, type TensorToWrite } from '../../../weights/safetensors.ts';

/** A slice of a target: rows `upRows` of its B land on rows `storedRows` of stored tensor `stored`. */
export interface StoredPiece {
  stored: string;
  storedRows: [number, number];
  upRows: [number, number];
}

/**
 * Where rows `range` (default all) of BFL weight `weight` (`rows` rows) are stored in a layout: one piece in a BFL
 * file; up to three for a fused qkv in diffusers (to_q/to_k/to_v), two for the swapped final adaLN halves.
 */
export function storedPieces(layout: Flux2Layout, weight: string, rows: number, range: [number, number] = [0, rows]): StoredPiece[] {
  type Part = { stored: string; bflStart: number; bflEnd: number; storedStart: number };
  let parts: Part[];
  if (layout === 'bfl') parts = [{ stored: weight, bflStart: 0, bflEnd: rows, storedStart: 0 }];
  else {
    const src = diffusersSource(weight);
    if ('parts' in src) {
      const n = rows / src.parts.length;
      parts = src.parts.map((stored, k) => ({ stored, bflStart: k * n, bflEnd: (k + 1) * n, storedStart: 0 }));
    } else {
      const h = rows / 2;
      parts = [
        { stored: src.swapHalves, bflStart: 0, bflEnd: h, storedStart: h },
        { stored: src.swapHalves, bflStart: h, bflEnd: rows, storedStart: 0 },
      ];
    }
  }
  const out: StoredPiece[] = [];
  for (const p of parts) {
    const lo = Math.max(range[0], p.bflStart);
    const hi = Math.min(range[1], p.bflEnd);
    if (lo >= hi) continue;
    out.push({ stored: p.stored, storedRows: [p.storedStart + lo - p.bflStart, p.storedStart + hi - p.bflStart], upRows: [lo - range[0], hi - range[0]] });
  }
  return out;
}

export interface MergeOptions {
  /** dtype of every written tensor; 'same' (default) keeps each tensor's dtype (bf16 rounding applies). */
  dtype?: 'same' | 'F32' | 'BF16' | 'F16';
}

export interface MergeResult {
  file: string;
  layout: Flux2Layout;
  /** Stored tensors that changed. */
  adapted: string[];
}

/** Writes `base` with every LoRA merged at its scale into `outFile` (one file, the base's layout, its config in the metadata). */
export function mergeLorasIntoCheckpoint(base: string | Flux2Weights, applied: AppliedLora[], outFile: string, opts: MergeOptions = {}): MergeResult {
  const w = typeof base === 'string' ? openFlux2Checkpoint(base) : base;
  const rowsOf = new Map(flux2BflShapes(w.config).map((s) => [s.name, s.shape[0]]));
  const deltas = new Map<string, Array<{ t: LoraTarget; factor: number; piece: StoredPiece }>>();
  for (const { lora, scale } of applied) {
    if (scale === 0) continue;
    for (const t of lora.targets) {
      for (const piece of storedPieces(w.layout, t.weight, rowsOf.get(t.weight)!, t.rows)) {
        const list = deltas.get(piece.stored) ?? [];
        list.push({ t, factor: (scale * t.alpha) / t.rank, piece });
        deltas.set(piece.stored, list);
      }
    }
  }
  const tensors: Record<string, TensorToWrite> = {};
  for (const name of w.checkpoint.names) {
    const info = w.checkpoint.info(name);
    const dtype = opts.dtype && opts.dtype !== 'same' ? opts.dtype : info.dtype;
    const list = deltas.get(name);
    if (!list && dtype === info.dtype) {
      tensors[name] = { dtype, shape: info.shape, data: () => new Uint8Array(readRaw(info)) };
      continue;
    }
    tensors[name] = {
      dtype,
      shape: info.shape,
      data: () => {
        const values = readFloat32(info);
        for (const d of list ?? []) addDelta(values, info.shape[1], d.t, d.factor, d.piece);
        return encode(values, dtype);
      },
    };
  }
  const metadata: Record<string, string> = {
    ...w.checkpoint.files[0].metadata,
    flux2_config: JSON.stringify(w.config satisfies Flux2Config),
    klein_lora_merge: JSON.stringify(applied.map((a) => ({ file: a.lora.file, scale: a.scale }))),
  };
  writeSafetensors(outFile, tensors, metadata);
  return { file: outFile, layout: w.layout, adapted: [...deltas.keys()] };
}

/** values[storedRows] += factor · B[upRows] · A, summed in float64 per row. */
function addDelta(values: Float32Array, inFeatures: number, t: LoraTarget, factor: number, p: StoredPiece): void {
  const acc = new Float64Array(inFeatures);
  for (let i = p.upRows[0]; i < p.upRows[1]; i++) {
    acc.fill(0);
    for (let k = 0; k < t.rank; k++) {
      const c = factor * t.up[i * t.rank + k];
      if (c === 0) continue;
      const a = t.down.subarray(k * inFeatures, (k + 1) * inFeatures);
      for (let j = 0; j < inFeatures; j++) acc[j] += c * a[j];
    }
    const row = (p.storedRows[0] + i - p.upRows[0]) * inFeatures;
    for (let j = 0; j < inFeatures; j++) values[row + j] += acc[j];
  }
}

function encode(values: Float32Array, dtype: string): TensorData {
  if (dtype === 'F32') return values;
  if (dtype === 'BF16') return f32ToBf16(values);
  if (dtype === 'F16') return f32ToF16(values);
  throw new Error(`cannot write a merged tensor as ${dtype}`);
}
