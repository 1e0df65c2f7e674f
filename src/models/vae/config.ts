// FLUX.2 autoencoder hyperparameters (spec §5; BFL `flux2/autoencoder.py`). The real VAE and the tiny golden one
// differ only in these numbers, which checkpoint.ts reads off the tensor shapes.

export interface Flux2VaeConfig {
  inChannels: number;
  outChannels: number;
  /** Base channel count; level i has `ch * chMult[i]` channels. */
  ch: number;
  chMult: number[];
  /** Resnet blocks per encoder level (the decoder has one more per level). */
  numResBlocks: number;
  /** Latent channels before patchify (4× that after the 2×2 patchify). */
  zChannels: number;
}

/** The real FLUX.2 VAE (spec §5: ch 128, mult [1,2,4,4], 2 res blocks, z 32). */
export const FLUX2_VAE_CONFIG: Flux2VaeConfig = { inChannels: 3, outChannels: 3, ch: 128, chMult: [1, 2, 4, 4], numResBlocks: 2, zChannels: 32 };

/** Constants fixed in the reference code, not in the checkpoint. */
export const VAE_GROUPS = 32;
export const VAE_NORM_EPS = 1e-6;
export const VAE_BN_EPS = 1e-4;
/** Pixels per latent token side of the real VAE: 8× downsampling × 2×2 patch. */
export const VAE_SCALE = 16;

/** Pixels per latent token side: 2^(levels − 1) from the downsamplers × 2 from the patch (16 for FLUX.2). */
export function vaeScale(c: Flux2VaeConfig): number {
  return 2 ** (c.chMult.length - 1) * 2;
}

/** Channels of the normalised, patchified latent the transformer works in (128 for FLUX.2). */
export function latentChannels(c: Flux2VaeConfig): number {
  return 4 * c.zChannels;
}
