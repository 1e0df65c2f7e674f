// BiRefNet's forward (the reference `BiRefNet.forward` at inference), once, as the math: a Swin backbone run on the
// image and on a half-size copy (the 'cat' multi-scale input), the squeeze module, and a decoder fed with image
// patches at every level. The runtime (runtime.ts) builds it once per input size: Swin's padding, shift masks and
// patch grids depend on the size, and static shapes let ORT fold them.
import type { Value } from '../../graph/onnx-graph.ts';
import type { Layers } from '../../graph/nn/layers.ts';
import { BiRefNetError, type BiRefNetConfig } from './config.ts';
import { basicDecBlk, gradientAttention, imagePatches, outputHead, simpleConvs } from './decoder.ts';
import { concat, resizeAlignCorners, tapUnder, type Feature, type Tap } from './ops.ts';
import { swinBackbone } from './swin.ts';

/** Swin on the image and on its half-size copy, joined per stage; stage 4 also gets the three others resized. */
function encoder(nn: Layers, cfg: BiRefNetConfig, image: Feature, tap?: Tap): Feature[] {
  const g = nn.g;
  const [H, W] = image.hw;
  const half: Feature = { v: resizeAlignCorners(g, image, [H / 2, W / 2]), c: 3, hw: [H / 2, W / 2] };
  tap?.('dbg.x_half', half.v);
  const bb = nn.at('bb');
  const full = g.within('bb_full', () => swinBackbone(bb, cfg, image.v, image.hw, tapUnder(tap, 'dbg.bb.full')));
  const small = g.within('bb_half', () => swinBackbone(bb, cfg, half.v, half.hw, tapUnder(tap, 'dbg.bb.half')));
  const enc = full.map((f, i): Feature => ({ v: concat(g, [f.v, resizeAlignCorners(g, small[i], f.hw)], 1), c: 2 * f.c, hw: f.hw }));
  const last = enc[3];
  const x4 = concat(g, [...enc.slice(0, 3).map((f) => resizeAlignCorners(g, f, last.hw)), last.v], 1);
  enc[3] = { v: x4, c: enc.reduce((n, f) => n + f.c, 0), hw: last.hw };
  enc.forEach((f, i) => tap?.(`dbg.enc.x${i + 1}`, f.v));
  return enc;
}

/** Output channels of a decoder block (its conv_out). */
const widthOf = (dec: Layers, name: string) => dec.shape(`${name}.conv_out.weight`)[0];

/** Decoder levels 4 → 1 on the squeezed x4 and the encoder's x3, x2, x1; returns the logits at the input size. */
function decoder(dec: Layers, image: Feature, enc: Feature[], x4: Value, tap?: Tap): Value {
  const g = dec.g;
  const patches = (blk: number, hw: [number, number]) => {
    const pt = imagePatches(dec, image, hw);
    const out = simpleConvs(dec.at(`ipt_blk${blk}`), pt);
    if (blk === 5) {
      tap?.('ipt_blk5.input', pt);
      tap?.('ipt_blk5', out);
    }
    return out;
  };
  const hw4 = enc[3].hw;
  let p: Feature = g.within('level4', () => {
    const d4 = basicDecBlk(dec.at('decoder_block4'), concat(g, [x4, patches(5, hw4)], 1), hw4);
    tap?.('decoder_block4', d4);
    return { v: gradientAttention(dec, d4, 4, tap), c: widthOf(dec, 'decoder_block4'), hw: hw4 };
  });
  for (const level of [3, 2, 1]) {
    const skip = enc[level - 1];
    p = g.within(`level${level}`, (): Feature => {
      const up = g.op('Add', [resizeAlignCorners(g, p, skip.hw), dec.conv(skip.v, `lateral_block${level + 1}.conv`)]);
      const d = basicDecBlk(dec.at(`decoder_block${level}`), concat(g, [up, patches(level + 1, skip.hw)], 1), skip.hw);
      if (level === 1) tap?.('decoder_block1', d);
      // level 1 feeds the output head directly; the others pass through gradient attention
      return { v: level === 1 ? d : gradientAttention(dec, d, level, tap), c: widthOf(dec, `decoder_block${level}`), hw: skip.hw };
    });
  }
  return g.within('head', () => outputHead(dec, p, simpleConvs(dec.at('ipt_blk1'), image.v), image.hw));
}

export interface ForwardOptions {
  /** Also output the golden file's `dbg.*` intermediates (bug hunting, conformance). */
  debug?: boolean;
}

/** The whole model for one input size: input `input` [1, 3, H, W] (normalised), outputs `logits` and `alpha`. */
export function buildBiRefNetForward(nn: Layers, cfg: BiRefNetConfig, [H, W]: [number, number], o: ForwardOptions = {}): void {
  if (H % 32 || W % 32 || H <= 0 || W <= 0) throw new BiRefNetError(`BiRefNet input must be a positive multiple of 32 in both directions, got ${W}×${H}`);
  const g = nn.g;
  const taps: Array<[string, Value]> = [];
  const tap: Tap | undefined = o.debug ? (name, v) => taps.push([name, v]) : undefined;
  const image: Feature = { v: g.input('input', 'float32', [1, 3, H, W]), c: 3, hw: [H, W] };

  const enc = encoder(nn, cfg, image, tap);
  let x4 = enc[3].v;
  for (let i = 0; nn.has(`squeeze_module.${i}.conv_in.weight`); i++) {
    x4 = nn.block(`squeeze_module.${i}`, (blk) => basicDecBlk(blk, x4, enc[3].hw, i === 0 ? tapUnder(tap, 'dbg.squeeze') : undefined));
  }
  tap?.('dbg.squeeze_out', x4);

  const logits = decoder(nn.at('decoder'), image, enc, x4, tapUnder(tap, 'dbg.decoder'));
  g.output(logits, 'logits', [1, 1, H, W]);
  g.output(g.op('Sigmoid', [logits]), 'alpha', [1, 1, H, W]);
  for (const [name, v] of taps) g.output(v, name);
}
