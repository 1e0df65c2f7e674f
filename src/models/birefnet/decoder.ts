// BiRefNet's decoder blocks (the reference `decoder_blocks.py`, `aspp.py`, `deform_conv.py` and `birefnet.py`'s
// Decoder): BasicDecBlk with ASPP over modulated deformable convolutions, image patches stacked on channels, the
// gradient attention applied at inference, and the output head.
import type { Value } from '../../graph/onnx-graph.ts';
import type { Layers } from '../../graph/nn/layers.ts';
import { BN_EPS } from './config.ts';
import { concat, relu, reshape, resizeAlignCorners, transpose, type Feature, type Tap } from './ops.ts';

/** Eval-mode BatchNorm; absent when the reference was built with batch_size 1 (nn.Identity). */
export function batchNorm(nn: Layers, x: Value, name: string): Value {
  return nn.has(`${name}.running_mean`) ? nn.batchNorm(x, name, BN_EPS) : x;
}

/** `relu(bn(conv(x)))`. */
function convBnRelu(nn: Layers, x: Value, conv: string, bn: string): Value {
  return relu(nn.g, batchNorm(nn, nn.conv(x, conv), bn));
}

/** `DeformableConv2d`: offsets and a `2·sigmoid` modulation mask predicted by plain convs, then ONNX DeformConv. */
function deformableConv(dc: Layers, x: Value): Value {
  const g = dc.g;
  const k = dc.shape('regular_conv.weight')[2];
  const pad = k >> 1;
  const offset = dc.conv(x, 'offset_conv');
  const mask = g.op('Mul', [g.op('Sigmoid', [dc.conv(x, 'modulator_conv')]), g.scalarF32(2)]);
  const bias = dc.has('regular_conv.bias') ? dc.param('regular_conv.bias') : null;
  const attrs = { kernel_shape: [k, k], pads: [pad, pad, pad, pad], strides: [1, 1], dilations: [1, 1], group: 1, offset_group: 1 };
  return g.op('DeformConv', [x, dc.param('regular_conv.weight'), offset, bias, mask], attrs, { hint: 'deform' });
}

/** `ASPPDeformable`: a 1×1 and k = 1, 3, 7 deformable branches plus global pooling, fused by a 1×1 conv. */
function asppDeformable(aspp: Layers, x: Value, hw: [number, number], tap?: Tap): Value {
  const g = aspp.g;
  const branch = (name: string) => relu(g, batchNorm(aspp, deformableConv(aspp.at(`${name}.atrous_conv`), x), `${name}.bn`));
  const branches = [branch('aspp1')];
  for (let i = 0; aspp.has(`aspp_deforms.${i}.atrous_conv.regular_conv.weight`); i++) {
    if (tap && i === 2) {
      tap('deform_k7.input', x);
      tap('deform_k7', deformableConv(aspp.at(`aspp_deforms.${i}.atrous_conv`), x));
    }
    branches.push(branch(`aspp_deforms.${i}`));
  }
  // global-average-pool branch; upsampling a 1×1 map with align_corners is a broadcast
  const pooled = convBnRelu(aspp, g.op('GlobalAveragePool', [x]), 'global_avg_pool.1', 'global_avg_pool.2');
  branches.push(g.op('Expand', [pooled, g.constI64([1, 1, hw[0], hw[1]])]));
  return convBnRelu(aspp, concat(g, branches, 1), 'conv1', 'bn1'); // dropout: identity in eval
}

/** `BasicDecBlk`: conv_in, the ASPP attention (when the checkpoint has one), conv_out. */
export function basicDecBlk(blk: Layers, x: Value, hw: [number, number], tap?: Tap): Value {
  let y = convBnRelu(blk, x, 'conv_in', 'bn_in');
  if (blk.has('dec_att.conv1.weight')) {
    y = asppDeformable(blk.at('dec_att'), y, hw, tap);
    tap?.('dec_att', y);
  }
  return batchNorm(blk, blk.conv(y, 'conv_out'), 'bn_out');
}

/** `rearrange(x, 'b c (hg h) (wg w) -> b (c hg wg) h w')`: the image cut into an hg×wg grid stacked on channels. */
export function imagePatches(nn: Layers, image: Feature, [h, w]: [number, number]): Value {
  const g = nn.g;
  const hg = image.hw[0] / h, wg = image.hw[1] / w;
  if (hg === 1 && wg === 1) return image.v;
  return reshape(g, transpose(g, reshape(g, image.v, [1, 3, hg, h, wg, w]), [0, 1, 2, 4, 3, 5]), [1, 3 * hg * wg, h, w]);
}

/** `SimpleConvs`: conv1, conv_out (no activation between). */
export function simpleConvs(blk: Layers, x: Value): Value {
  return blk.conv(blk.conv(x, 'conv1'), 'conv_out');
}

/** `p · sigmoid(attn(relu(bn(conv(p)))))`, the gradient attention the reference applies at inference too. */
export function gradientAttention(dec: Layers, p: Value, level: number, tap?: Tap): Value {
  const g = dec.g;
  const f = convBnRelu(dec, p, `gdt_convs_${level}.0`, `gdt_convs_${level}.1`);
  const a = dec.conv(f, `gdt_convs_attn_${level}.0`);
  tap?.(`gdt_convs_attn_${level}`, a);
  return g.op('Mul', [p, g.op('Sigmoid', [a])]);
}

/**
 * `conv_out1(cat(upsample(d1 → H×W), ipt))`, computed as `upsample(conv_a(d1)) + conv_b(ipt)`: the 1×1 conv and the
 * bilinear upsample are both linear (and the upsample's weights sum to 1), so they commute. The reference form
 * materialises d1 at full resolution (192 ch × 1024² for Swin-L); this one upsamples a single channel.
 */
export function outputHead(dec: Layers, d1: Feature, ipt: Value, size: [number, number]): Value {
  const g = dec.g;
  const total = dec.shape('conv_out1.0.weight')[1];
  const weight = dec.param('conv_out1.0.weight');
  const part = (from: number, to: number) => g.op('Slice', [weight, g.constI64([from]), g.constI64([to]), g.constI64([1])], {}, { hint: 'conv_out1_part' });
  const low = g.op('Conv', [d1.v, part(0, d1.c)], { kernel_shape: [1, 1] });
  const high = g.op('Conv', [ipt, part(d1.c, total), dec.param('conv_out1.0.bias')], { kernel_shape: [1, 1] });
  return g.op('Add', [resizeAlignCorners(g, { v: low, c: 1, hw: d1.hw }, size), high], {}, { hint: 'logits' });
}
