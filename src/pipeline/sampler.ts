// The sampler: BFL's Euler loop over the flow transformer (spec §6.4, §6.6), with CFG for the base variants and
// reference-image tokens appended to every row; a batch runs in chunks of whole images.
import type { Device } from '../runtime/device.ts';
import type { Flux2Context, Flux2ContextInput, Flux2StepInput } from '../models/flux2/runtime.ts';
import { cfgCombine, eulerStep } from './schedule.ts';

/**
 * The model the sampler evaluates (`Flux2Transformer`): its step-invariant part (text projection, RoPE tables) is
 * prepared once per generation and chunk size, then every step runs on that context.
 */
export interface Denoiser {
  prepareContext(inp: Flux2ContextInput): Promise<Flux2Context>;
  step(inp: Flux2StepInput, context: Flux2Context): Promise<Float32Array>;
  close(): Promise<void>;
}


export interface DenoiseInput {
  /** Target tokens `[batch, nImg, C]`, updated in place. */
  x: Float32Array;
  batch: number;
  nImg: number;
  channels: number;
  /** `[nImg, 4]` ids of the target grid (shared by every row). */
  xIds: BigInt64Array;
  /** `[ctxRows, L, D]`: one row (distilled) or `[uncond, cond]` (CFG), shared by every image. */
  ctx: Float32Array;
  ctxRows: 1 | 2;
  ctxLen: number;
  /** Reference tokens `[nRef, C]` and ids `[nRef, 4]`, appended after the target tokens of every row. */
  refTokens?: Float32Array;
  refIds?: BigInt64Array;
  nRef?: number;
  timesteps: Float32Array;
  guidance?: number;
  /** Most rows per model call; a larger batch runs in chunks of whole images. */
  maxRows?: number;
  /** After step i (0-based): the raw model output rows of the step's last chunk, for conformance. */
  onStep?: (i: number, total: number, modelOut: Float32Array) => void;
  signal?: AbortSignal;
}

function textIds(len: number): BigInt64Array {
  const ids = new BigInt64Array(len * 4);
  for (let l = 0; l < len; l++) ids[l * 4 + 3] = BigInt(l);
  return ids;
}

function repeatIds(src: BigInt64Array, times: number): BigInt64Array {
  const out = new BigInt64Array(src.length * times);
  for (let i = 0; i < times; i++) out.set(src, i * src.length);
  return out;
}

/**
 * The Euler loop of BFL `denoise` / `denoise_cfg` (spec §6.4, §6.6): each step runs the model on
 * `[target ‖ references]` tokens at t = sigma_i, keeps the target part of its output, combines `[uncond, cond]`
 * with the guidance scale when there are two context rows, and moves x by `(sigma_{i+1} − sigma_i) · v`.
 */
export async function denoise(model: Denoiser, inp: DenoiseInput): Promise<Float32Array> {
  const { batch, nImg, channels: C, ctxRows, ctxLen } = inp;
  const nRef = inp.nRef ?? 0;
  const n = nImg + nRef;
  const D = inp.ctx.length / (ctxRows * ctxLen);
  const rowsPerImage = ctxRows;
  const maxRows = Math.max(rowsPerImage, inp.maxRows ?? Infinity);
  const imagesPerCall = Math.max(1, Math.min(batch, Math.floor(maxRows / rowsPerImage)));
  const rowIds = new BigInt64Array(n * 4);
  rowIds.set(inp.xIds, 0);
  if (nRef) rowIds.set(inp.refIds!, nImg * 4);
  const steps = inp.timesteps.length - 1;
  // one context per chunk size (the last chunk of a batch may be smaller), prepared at the first step
  const contexts = new Map<number, Flux2Context>();
  try {
    for (let i = 0; i < steps; i++) {
      inp.signal?.throwIfAborted();
      const t = inp.timesteps[i];
      let lastOut: Float32Array = new Float32Array(0);
      for (let b0 = 0; b0 < batch; b0 += imagesPerCall) {
        const nb = Math.min(imagesPerCall, batch - b0);
        const rows = nb * rowsPerImage;
        const counts = { batch: rows, nTokens: n, nCtx: ctxLen };
        let context = contexts.get(nb);
        if (!context) {
          // row r: image (r mod nb), context row ⌊r / nb⌋ — uncond rows first, as the reference batches [uncond, cond]
          const ctx = new Float32Array(rows * ctxLen * D);
          for (let r = 0; r < rows; r++) {
            const cr = Math.floor(r / nb);
            ctx.set(inp.ctx.subarray(cr * ctxLen * D, (cr + 1) * ctxLen * D), r * ctxLen * D);
          }
          context = await model.prepareContext({ ...counts, ctx, xIds: repeatIds(rowIds, rows), ctxIds: repeatIds(textIds(ctxLen), rows) });
          contexts.set(nb, context);
        }
        const x = new Float32Array(rows * n * C);
        for (let r = 0; r < rows; r++) {
          const img = b0 + (r % nb);
          x.set(inp.x.subarray(img * nImg * C, (img + 1) * nImg * C), r * n * C);
          if (nRef) x.set(inp.refTokens!, (r * n + nImg) * C);
        }
        const out = await model.step({ ...counts, x, timesteps: new Float32Array(rows).fill(t) }, context);
        lastOut = out;
        // target part of every row: [rows, nImg, C]
        let v: Float32Array = new Float32Array(rows * nImg * C);
        for (let r = 0; r < rows; r++) v.set(out.subarray(r * n * C, r * n * C + nImg * C), r * nImg * C);
        if (ctxRows === 2) v = cfgCombine(v, inp.guidance ?? 1);
        eulerStep(inp.x.subarray(b0 * nImg * C, (b0 + nb) * nImg * C), v, t, inp.timesteps[i + 1], nb);
      }
      inp.onStep?.(i, steps, lastOut);
    }
  } finally {
    for (const c of contexts.values()) c.dispose();
  }
  return inp.x;
}

/**
 * Rows per transformer call: attention activations grow with rows × seq², so on the CPU a batch of four 1024²
 * images (4 × 4608 tokens) runs as single images; on a GPU everything goes in one call.
 */
export function defaultMaxRows(seqLen: number, device?: Device): number {
  if (device && device !== 'cpu') return 8;
  return Math.max(1, Math.floor(12288 / seqLen));
}

