// What each component of a klein pipeline needs in memory for one request, computed from the model's configs and
// the request's shape before any weight is read (runtime/memory-plan.ts turns the needs into a plan or a refusal).
// The activation figures are per-token / per-pixel rates measured at real size on the CPU (docs/benchmarks.md,
// "Memory plan"); weights are what the weight policy maps or packs.
import type { ComponentNeed } from '../runtime/memory-plan.ts';
import { GiB } from '../runtime/memory-plan.ts';
import type { ExecutionTarget } from '../runtime/target.ts';
import { flux2Params, flux2BlockParams, mlpHidden, type Flux2Config } from '../models/flux2/config.ts';

/** The shape of one request as the components see it. */
export interface RequestShape {
  width: number;
  height: number;
  /** Transformer rows per call (images in a chunk × CFG rows). */
  rows: number;
  /** Reference-image tokens appended to every row. */
  refTokens: number;
  /** Text tokens (the prompt window). */
  textTokens: number;
  /** Reference images the VAE encodes (largest side of each decides its memory). */
  refPixels: number[];
  transparent: boolean;
  /**
   * LoRAs: the host bytes of the set's matrices (as read, prepared and fed; 0 when the transformer only holds its
   * LoRA sessions from an earlier request); absent: no LoRA sessions.
   */
  loraBytes?: number;
}

/** Process baseline every component adds to: Node, ORT's code, the tokenizer, the prompt cache. */
export const PROCESS_BASE = 0.6 * GiB;

/**
 * Activations of one transformer call: per row and token, the live intermediates of a block (the MLP's gate, up
 * and their product at the MLP width, the attention's q, k, v, rotated copies and outputs at the hidden width),
 * and ORT's attention workspace. Measured rates: see docs/benchmarks.md ("Memory plan").
 */
export function flux2ActivationBytes(c: Flux2Config, rows: number, tokens: number): number {
  const perToken = (6 * mlpHidden(c) + 16 * c.hiddenSize) * 4;
  return rows * tokens * perToken;
}

/**
 * `loraBytes` (see RequestShape): the LoRA sessions beside the base ones map the same weights file (no second copy
 * of file-backed pages) but hold an activation arena of their own and, in fast mode, their own packed weights.
 */
export function transformerNeed(c: Flux2Config, target: ExecutionTarget, rows: number, tokens: number, loraBytes?: number): ComponentNeed {
  const all = flux2Params(c);
  const block = flux2BlockParams(c);
  const act = flux2ActivationBytes(c, rows, tokens);
  const sessions = loraBytes === undefined ? 1 : 2;
  const lora = loraBytes ?? 0;
  if (target.device !== 'cpu') return { name: 'transformer', fileBacked: 0, anon: (sessions * act) / 4 + lora };
  if (target.precision === 'fast') {
    // ORT packs the int8 block weights and the fp32 rest into its own layouts when the session opens
    return { name: 'transformer', fileBacked: 0, anon: sessions * (block + 4 * (all - block) + act) + lora };
  }
  return { name: 'transformer', fileBacked: 4 * all, anon: sessions * act + lora };
}

export interface Qwen3Shape {
  hiddenSize: number;
  intermediateSize: number;
  numAttentionHeads: number;
  numKeyValueHeads: number;
  headDim: number;
}

/** The text encoder over `layers` decoder layers for `rows` prompts of `seq` tokens. */
export function textEncoderNeed(c: Qwen3Shape, layers: number, target: ExecutionTarget, rows: number, seq: number): ComponentNeed {
  const H = c.hiddenSize;
  const perLayer = H * (c.numAttentionHeads + 2 * c.numKeyValueHeads) * c.headDim + c.numAttentionHeads * c.headDim * H + 3 * H * c.intermediateSize;
  const params = layers * perLayer;
  const act = rows * seq * (4 * c.intermediateSize + 12 * H) * 4 + rows * c.numAttentionHeads * seq * seq * 4 * 2;
  if (target.device !== 'cpu') return { name: 'text encoder', fileBacked: 0, anon: act };
  if (target.precision === 'fast') return { name: 'text encoder', fileBacked: 0, anon: params + act };
  return { name: 'text encoder', fileBacked: 4 * params, anon: act };
}

/**
 * The VAE's full-resolution activations dominate it: untiled up to 1536², tiles of at most 1536² above (models/vae
 * tiling), so its need stops growing there. Its 84 M weights (0.35 GiB) are anonymous: ORT's NCHWc layout pass
 * copies every convolution weight.
 */
export function vaeNeed(direction: 'encoder' | 'decoder', width: number, height: number, bytesPerPixel: number): ComponentNeed {
  const tile = Math.min(width * height, 1536 * 1536);
  return { name: `VAE ${direction}`, fileBacked: 0, anon: 0.35 * GiB + tile * bytesPerPixel };
}

/** BiRefNet at its 1024² input (measured 6.8 GiB peak for the full Swin-L variant, fp32, arena on). */
export function mattingNeed(): ComponentNeed {
  return { name: 'matting model', fileBacked: 0.9 * GiB, anon: 6 * GiB };
}
