// BiRefNet's Swin-v1 backbone (the reference `swin_v1.py`): patch embedding, stages of window attention with a
// relative position bias, every second block on windows shifted by half a window (with the reference's region
// mask), patch merging between stages. Tokens stay NHWC `[1, H, W, C]`; the four stage outputs are NCHW.
import type { Graph, Value } from '../../graph/onnx-graph.ts';
import type { Layers } from '../../graph/nn/layers.ts';
import { LN_EPS, type BiRefNetConfig } from './config.ts';
import { reshape, roll, transpose, type Feature, type Tap } from './ops.ts';

/** `relative_position_index` of the reference, recomputed: index into the (2ws−1)² bias table per token pair. */
export function relativePositionIndex(ws: number): number[] {
  const n = ws * ws;
  const idx = new Array<number>(n * n);
  for (let i = 0; i < n; i++) {
    const ih = Math.floor(i / ws), iw = i % ws;
    for (let j = 0; j < n; j++) {
      const jh = Math.floor(j / ws), jw = j % ws;
      idx[i * n + j] = (ih - jh + ws - 1) * (2 * ws - 1) + (iw - jw + ws - 1);
    }
  }
  return idx;
}

/**
 * Region ids of the shifted-window mask, per window and token: the reference labels the padded map in 3×3 bands
 * (`[0, Hp−ws)`, `[Hp−ws, Hp−shift)`, `[Hp−shift, Hp)` per axis); tokens of different bands never attend to each
 * other. Returned as `[nW, N]`, windows in row-major order.
 */
export function shiftRegionIds(Hp: number, Wp: number, ws: number, shift: number): Float32Array {
  const band = (r: number, n: number) => (r < n - ws ? 0 : r < n - shift ? 1 : 2);
  const nWh = Hp / ws, nWw = Wp / ws, N = ws * ws;
  const ids = new Float32Array(nWh * nWw * N);
  for (let a = 0; a < nWh; a++) {
    for (let b = 0; b < nWw; b++) {
      for (let i = 0; i < ws; i++) {
        for (let j = 0; j < ws; j++) ids[(a * nWw + b) * N + i * ws + j] = band(a * ws + i, Hp) * 3 + band(b * ws + j, Wp);
      }
    }
  }
  return ids;
}

/** A stage's token grid `h × w`, zero-padded to `hp × wp` (multiples of the window `ws`), cut into `count` windows. */
interface Windows {
  h: number;
  w: number;
  hp: number;
  wp: number;
  ws: number;
  count: number;
}

function windowsOf([h, w]: [number, number], ws: number): Windows {
  const hp = Math.ceil(h / ws) * ws, wp = Math.ceil(w / ws) * ws;
  return { h, w, hp, wp, ws, count: (hp / ws) * (wp / ws) };
}

/** `[nW, 1, N, N]` additive mask (0 / −inf), built in-graph from the small id table so ORT folds it at load. */
function shiftMask(g: Graph, win: Windows, shift: number): Value {
  const N = win.ws * win.ws;
  const ids = g.constF32(shiftRegionIds(win.hp, win.wp, win.ws, shift), [win.count, N], 'region_ids');
  const same = g.op('Equal', [reshape(g, ids, [win.count, N, 1]), reshape(g, ids, [win.count, 1, N])]);
  const m = g.op('Where', [same, g.scalarF32(0), g.scalarF32(-Infinity)], {}, { hint: 'shift_mask' });
  return reshape(g, m, [win.count, 1, N, N]);
}

interface Stage {
  dim: number;
  heads: number;
  depth: number;
}

/** Per-graph values shared by both input scales: one index table per window size, one gathered bias per block. */
const graphCaches = new WeakMap<Graph, Map<string, Value>>();

function cached(g: Graph, key: string, make: () => Value): Value {
  let m = graphCaches.get(g);
  if (!m) graphCaches.set(g, (m = new Map()));
  let v = m.get(key);
  if (!v) m.set(key, (v = make()));
  return v;
}

/** `table[relative_position_index]` as `[1, heads, N, N]`: a Gather on a weight, which ORT folds at load. */
function relativePositionBias(attn: Layers, ws: number, heads: number): Value {
  const g = attn.g;
  const N = ws * ws;
  return cached(g, `bias:${attn.prefix}`, () => {
    const index = cached(g, `index:${ws}`, () => g.constI64(relativePositionIndex(ws), [N * N], 'relative_position_index'));
    const gathered = g.op('Gather', [attn.param('relative_position_bias_table'), index], { axis: 0 });
    return reshape(g, transpose(g, reshape(g, gathered, [N, N, heads]), [2, 0, 1]), [1, heads, N, N]);
  });
}

/** `WindowAttention`: multi-head attention inside each window, plus the relative position bias (and shift mask). */
function windowAttention(attn: Layers, x: Value, st: Stage, win: Windows, mask?: Value): Value {
  const g = attn.g;
  const N = win.ws * win.ws, C = st.dim, d = C / st.heads;
  const [q0, k0, v0] = g.opN('Split', [attn.linear(x, 'qkv'), g.constI64([C, C, C])], 3, { axis: -1 });
  const heads = (t: Value, perm: number[]) => transpose(g, reshape(g, t, [win.count, N, st.heads, d]), perm);
  const q = g.op('Mul', [heads(q0, [0, 2, 1, 3]), g.scalarF32(d ** -0.5)]);
  let scores = g.op('Add', [g.op('MatMul', [q, heads(k0, [0, 2, 3, 1])]), relativePositionBias(attn, win.ws, st.heads)]);
  if (mask) scores = g.op('Add', [scores, mask]);
  const probs = g.op('Softmax', [scores], { axis: -1 });
  const out = reshape(g, transpose(g, g.op('MatMul', [probs, heads(v0, [0, 2, 1, 3])]), [0, 2, 1, 3]), [win.count, N, C]);
  return attn.linear(out, 'proj');
}

/** Windows `[nW, ws², C]` of a padded `[1, hp, wp, C]` map, and back. */
function toWindows(g: Graph, y: Value, win: Windows, C: number): Value {
  const { hp, wp, ws } = win;
  return reshape(g, transpose(g, reshape(g, y, [1, hp / ws, ws, wp / ws, ws, C]), [0, 1, 3, 2, 4, 5]), [win.count, ws * ws, C]);
}

function fromWindows(g: Graph, a: Value, win: Windows, C: number): Value {
  const { hp, wp, ws } = win;
  return reshape(g, transpose(g, reshape(g, a, [1, hp / ws, wp / ws, ws, ws, C]), [0, 1, 3, 2, 4, 5]), [1, hp, wp, C]);
}

/** `SwinTransformerBlock`; `shifted` for the odd blocks (cyclic shift by half a window, masked attention). */
function swinBlock(blk: Layers, x: Value, st: Stage, win: Windows, shifted?: { shift: number; mask: Value }): Value {
  const g = blk.g;
  const { h, w, hp, wp } = win;
  const padded = hp > h || wp > w;
  const shiftBy = (t: Value, k: number) => roll(g, roll(g, t, k, 1, hp), k, 2, wp);
  let y = blk.layerNorm(x, LN_EPS, 'norm1');
  // padded tokens are zeros after norm1 and are not masked (the reference attends to them too)
  if (padded) y = g.op('Pad', [y, g.constI64([0, 0, 0, 0, 0, hp - h, wp - w, 0])]);
  if (shifted) y = shiftBy(y, -shifted.shift);
  y = fromWindows(g, windowAttention(blk.at('attn'), toWindows(g, y, win, st.dim), st, win, shifted?.mask), win, st.dim);
  if (shifted) y = shiftBy(y, shifted.shift);
  if (padded) y = g.op('Slice', [y, g.constI64([0, 0]), g.constI64([h, w]), g.constI64([1, 2])]);
  const x1 = g.op('Add', [x, y]);
  const hidden = g.op('Gelu', [blk.linear(blk.layerNorm(x1, LN_EPS, 'norm2'), 'mlp.fc1')]);
  return g.op('Add', [x1, blk.linear(hidden, 'mlp.fc2')]);
}

/** One stage's blocks; the shift mask is built whatever the size (no "window ≥ feature map" shortcut here). */
function swinStage(layer: Layers, x: Value, st: Stage, hw: [number, number], ws: number): Value {
  const win = windowsOf(hw, ws);
  const shift = ws >> 1;
  const mask = st.depth > 1 ? shiftMask(layer.g, win, shift) : undefined;
  for (let b = 0; b < st.depth; b++) x = swinBlock(layer.at(`blocks.${b}`), x, st, win, b % 2 && mask ? { shift, mask } : undefined);
  return x;
}

/** `PatchMerging`: zero-pad odd sizes, gather 2×2 neighbours in the order (0,0), (1,0), (0,1), (1,1), norm, reduce. */
function patchMerging(ds: Layers, x: Value, C: number, [h, w]: [number, number]): Value {
  const g = ds.g;
  if (h % 2 || w % 2) x = g.op('Pad', [x, g.constI64([0, 0, 0, 0, 0, h % 2, w % 2, 0])]);
  const h2 = Math.ceil(h / 2), w2 = Math.ceil(w / 2);
  // [1, h2, dh, w2, dw, C] → [1, h2, w2, dw, dh, C]: channel block dw·2 + dh matches the reference's cat order
  const merged = reshape(g, transpose(g, reshape(g, x, [1, h2, 2, w2, 2, C]), [0, 1, 3, 4, 2, 5]), [1, h2, w2, 4 * C]);
  return ds.linear(ds.layerNorm(merged, LN_EPS, 'norm'), 'reduction');
}

/** The four stage outputs (after `bb.norm{i}`), NCHW, strides 4, 8, 16, 32, of an `[1, 3, H, W]` image. */
export function swinBackbone(bb: Layers, cfg: BiRefNetConfig, x: Value, [H, W]: [number, number], tap?: Tap): Feature[] {
  const g = bb.g;
  let hw: [number, number] = [Math.ceil(H / 4), Math.ceil(W / 4)];
  const embedded = bb.conv(x, 'patch_embed.proj', { stride: 4, pads: [0, 0, 0, 0] });
  let t = bb.layerNorm(transpose(g, embedded, [0, 2, 3, 1]), LN_EPS, 'patch_embed.norm');
  const outs: Feature[] = [];
  for (let s = 0; s < cfg.depths.length; s++) {
    const st: Stage = { dim: cfg.embedDim * 2 ** s, heads: cfg.numHeads[s], depth: cfg.depths[s] };
    t = bb.block(`layers.${s}`, (layer) => swinStage(layer, t, st, hw, cfg.windowSize));
    const out = transpose(g, bb.layerNorm(t, LN_EPS, `norm${s}`), [0, 3, 1, 2]);
    tap?.(`stage${s}`, out);
    outs.push({ v: out, c: st.dim, hw });
    if (s < cfg.depths.length - 1) {
      t = patchMerging(bb.at(`layers.${s}.downsample`), t, st.dim, hw);
      hw = [Math.ceil(hw[0] / 2), Math.ceil(hw[1] / 2)];
    }
  }
  return outs;
}
