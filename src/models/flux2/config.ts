// FLUX.2 transformer hyperparameters (spec §1.1): klein 4B, klein 9B and FLUX.2 [dev] differ only in these numbers
// (the golden tiny model too). Read from a checkpoint by checkpoint.ts.

export interface Flux2Config {
  inChannels: number;
  /** Width of the text context: 3 × the text encoder's hidden size. */
  contextInDim: number;
  hiddenSize: number;
  numHeads: number;
  /** Double-stream blocks. */
  depth: number;
  depthSingleBlocks: number;
  /** RoPE dims per position axis (t, h, w, l); they sum to the head dim. */
  axesDim: number[];
  theta: number;
  mlpRatio: number;
  /** FLUX.2 [dev] embeds a guidance value; klein has no guidance embedder. */
  useGuidanceEmbed: boolean;
}

export const KLEIN_4B: Flux2Config = { inChannels: 128, contextInDim: 7680, hiddenSize: 3072, numHeads: 24, depth: 5, depthSingleBlocks: 20, axesDim: [32, 32, 32, 32], theta: 2000, mlpRatio: 3, useGuidanceEmbed: false };
export const KLEIN_9B: Flux2Config = { ...KLEIN_4B, contextInDim: 12288, hiddenSize: 4096, numHeads: 32, depth: 8, depthSingleBlocks: 24 };
export const FLUX2_DEV: Flux2Config = { ...KLEIN_4B, contextInDim: 15360, hiddenSize: 6144, numHeads: 48, depth: 8, depthSingleBlocks: 48, useGuidanceEmbed: true };

/** LayerNorm and QK-RMSNorm epsilon (spec §1.2). */
export const EPS = 1e-6;

export function headDim(c: Flux2Config): number {
  return c.hiddenSize / c.numHeads;
}

export function mlpHidden(c: Flux2Config): number {
  return Math.round(c.hiddenSize * c.mlpRatio);
}

/**
 * The Linears that carry the bulk of a step's FLOPs (92–96 %): q/k/v, attention output and MLP of the double
 * blocks, linear1/linear2 of the single blocks. Fast mode computes these in int8; the modulations (they scale every
 * activation of a block), the embedders (one row per sample), img_in (K = 128), txt_in (its input is the text
 * encoder's hidden states, whose outlier channels a per-tensor activation scale crushes) and the final projection
 * (the velocity itself) stay fp32 (docs/benchmarks.md, "Fast mode").
 */
export function isBlockLinear(name: string): boolean {
  return /^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])\.weight$/.test(name);
}

/**
 * The block Linears whose input no norm bounds: the attention output (`attn.proj`; linear2's first part) and the
 * SwiGLU product (`mlp.2`; linear2's rest). Their rows' maxima sit far above the typical value, so one int8 pass
 * rounds them coarsest: fast mode gives these a second pass over the rounding residual (docs/benchmarks.md, issue 21).
 */
export function readsUnnormalisedInput(name: string): boolean {
  return /^(double_blocks\.\d+\.(img|txt)_(attn\.proj|mlp\.2)|single_blocks\.\d+\.linear2)\.weight$/.test(name);
}

/** Parameters of the whole transformer (spec §1.1; klein 4B: 3,875,544,576), for memory plans. */
export function flux2Params(c: Flux2Config): number {
  const H = c.hiddenSize;
  const hd = headDim(c);
  const embed = H * c.inChannels + H * c.contextInDim + (256 * H + H * H) * (c.useGuidanceEmbed ? 2 : 1);
  const modulation = (6 + 6 + 3 + 2) * H * H;
  const norms = (4 * c.depth + 2 * c.depthSingleBlocks) * hd;
  return embed + modulation + norms + flux2BlockParams(c) + c.inChannels * H;
}

/** Parameters of the block Linears (`isBlockLinear`): what fast mode stores as int8. */
export function flux2BlockParams(c: Flux2Config): number {
  const H = c.hiddenSize;
  const M = mlpHidden(c);
  return c.depth * 2 * (3 * H * H + H * H + 2 * M * H + M * H) + c.depthSingleBlocks * ((3 * H + 2 * M) * H + H * (H + M));
}
