// The FLUX.2 autoencoder's forward (spec §5; BFL `flux2/autoencoder.py`), once, as the math: an encoder from
// [-1, 1] RGB to the posterior mean of a z-channel latent at 1/8 resolution, and a decoder back. Both include the
// FLUX.2 latent plumbing (2×2 patchify to 4z channels + BatchNorm normalisation with the checkpoint's running
// statistics), so the pipeline only ever sees the normalised [B, 4z, H/16, W/16] latent the transformer works in.
// Height and width are symbolic: one compiled graph serves every size.
import type { Value } from '../../graph/onnx-graph.ts';
import type { Layers } from '../../graph/nn/layers.ts';
import { VAE_BN_EPS, VAE_GROUPS, VAE_NORM_EPS, type Flux2VaeConfig } from './config.ts';

function norm(nn: Layers, x: Value, name: string): Value {
  return nn.groupNorm(x, name, VAE_GROUPS, VAE_NORM_EPS);
}

/** `ResnetBlock`: two GroupNorm → swish → 3×3 conv, plus the input (through a 1×1 conv when the width changes). */
function resnet(nn: Layers, x: Value): Value {
  let h = nn.conv(nn.silu(norm(nn, x, 'norm1')), 'conv1');
  h = nn.conv(nn.silu(norm(nn, h, 'norm2')), 'conv2');
  const shortcut = nn.has('nin_shortcut.weight') ? nn.conv(x, 'nin_shortcut') : x;
  return nn.g.op('Add', [shortcut, h], {}, { hint: 'resnet_out' });
}

/**
 * `AttnBlock`: single-head self-attention over all H·W positions; its 1×1 convolutions q, k, v and proj_out are
 * Linears over the tokens. com.microsoft MultiHeadAttention never materialises the score matrix on the CPU, which
 * is what lets large images through the mid block (65 536 positions at 2048²: a 16 GiB matrix otherwise).
 */
function attention(nn: Layers, x: Value): Value {
  const g = nn.g;
  const h = norm(nn, x, 'norm');
  const tokens = g.op('Transpose', [g.op('Reshape', [h, g.constI64([0, 0, -1])])], { perm: [0, 2, 1] }, { hint: 'tokens' });
  const o = nn.attention(nn.linear(tokens, 'q'), nn.linear(tokens, 'k'), nn.linear(tokens, 'v'), 1);
  const back = g.op('Reshape', [g.op('Transpose', [nn.linear(o, 'proj_out')], { perm: [0, 2, 1] }), g.op('Shape', [x])]);
  return g.op('Add', [x, back], {}, { hint: 'attn_out' });
}

/** The mid block: resnet, attention, resnet at the lowest resolution. */
function mid(nn: Layers, x: Value): Value {
  return resnet(nn.at('block_2'), attention(nn.at('attn_1'), resnet(nn.at('block_1'), x)));
}

/** GroupNorm → swish → conv_out. */
function head(nn: Layers, x: Value): Value {
  return nn.conv(nn.silu(norm(nn, x, 'norm_out')), 'conv_out');
}

/** BatchNorm statistics (`bn.running_*`, at the top level) as [1, 4z, 1, 1] mean and std = √(var + 1e-4). */
function bnStats(nn: Layers): { mean: Value; std: Value } {
  const g = nn.g;
  const shape = g.constI64([1, -1, 1, 1]);
  const mean = g.op('Reshape', [nn.param('bn.running_mean'), shape]);
  const std = g.op('Reshape', [g.op('Sqrt', [g.op('Add', [nn.param('bn.running_var'), g.scalarF32(VAE_BN_EPS)])]), shape]);
  return { mean, std };
}

/**
 * Encoder: input `image` [B, 3, H, W] in [-1, 1] (H, W multiples of the scale) → outputs `latent` [B, 4z, H/16,
 * W/16] (posterior mean, patchified, BatchNorm-normalised) and `moments` [B, 2z, H/8, W/8] (after quant_conv).
 */
export function buildVaeEncoder(root: Layers, c: Flux2VaeConfig): void {
  const g = root.g;
  const nn = root.at('encoder');
  const L = c.chMult.length;
  let h = nn.conv(g.input('image', 'float32', ['batch', c.inChannels, 'height', 'width']), 'conv_in');
  for (let i = 0; i < L; i++) {
    h = nn.block(`down.${i}`, (level) => {
      for (let j = 0; j < c.numResBlocks; j++) h = resnet(level.at(`block.${j}`), h);
      // Downsample: zero-pad right and bottom by one, 3×3 stride-2 conv (Conv's asymmetric pads)
      return i === L - 1 ? h : level.conv(h, 'downsample.conv', { stride: 2, pads: [0, 0, 1, 1] });
    });
  }
  h = nn.block('mid', (m) => mid(m, h));
  const moments = nn.conv(head(nn, h), 'quant_conv');
  g.output(moments, 'moments', ['batch', 2 * c.zChannels, 'h8', 'w8']);
  const z = c.zChannels;
  const mean = g.op('Slice', [moments, g.constI64([0]), g.constI64([z]), g.constI64([1])], {}, { hint: 'posterior_mean' });
  // 2×2 patchify with channel index c·4 + pi·2 + pj: SpaceToDepth orders channels (pi·2 + pj)·C + c, a Gather
  // reorders them
  const perm = Array.from({ length: 4 * z }, (_, k) => (k % 4) * z + Math.floor(k / 4));
  const patched = g.op('Gather', [g.op('SpaceToDepth', [mean], { blocksize: 2 }), g.constI64(perm)], { axis: 1 }, { hint: 'patchify' });
  const bn = bnStats(root);
  g.output(g.op('Div', [g.op('Sub', [patched, bn.mean]), bn.std], {}, { hint: 'bn_normalize' }), 'latent', ['batch', 4 * z, 'h16', 'w16']);
}

/** Decoder: input `latent` [B, 4z, h, w] (normalised) → output `image` [B, 3, 16h, 16w], not clamped. */
export function buildVaeDecoder(root: Layers, c: Flux2VaeConfig): void {
  const g = root.g;
  const nn = root.at('decoder');
  const L = c.chMult.length;
  const bn = bnStats(root);
  const z = g.input('latent', 'float32', ['batch', 4 * c.zChannels, 'h16', 'w16']);
  const denorm = g.op('Add', [g.op('Mul', [z, bn.std]), bn.mean], {}, { hint: 'bn_denormalize' });
  // DepthToSpace in CRD mode reads channel c·4 + pi·2 + pj into pixel (2i + pi, 2j + pj): exactly the unpatchify
  let h = g.op('DepthToSpace', [denorm], { blocksize: 2, mode: 'CRD' }, { hint: 'unpatchify' });
  h = nn.conv(nn.conv(h, 'post_quant_conv'), 'conv_in');
  h = nn.block('mid', (m) => mid(m, h));
  for (let i = L - 1; i >= 0; i--) {
    h = nn.block(`up.${i}`, (level) => {
      for (let j = 0; j <= c.numResBlocks; j++) h = resnet(level.at(`block.${j}`), h);
      if (i === 0) return h;
      // nearest ×2 (torch `interpolate(scale_factor=2, mode="nearest")` = asymmetric/floor), then 3×3 conv
      const up = g.op('Resize', [h, null, g.constF32([1, 1, 2, 2])], { mode: 'nearest', coordinate_transformation_mode: 'asymmetric', nearest_mode: 'floor' }, { hint: 'upsample' });
      return level.conv(up, 'upsample.conv');
    });
  }
  g.output(head(nn, h), 'image', ['batch', c.outChannels, 'height', 'width']);
}
