// LoRA files in every format klein reads, written by the make-tiny-lora writers, loaded onto a tiny FLUX.2
// transformer: each module must land on the right BFL weight and rows (checked numerically against the delta the
// writer meant), several LoRAs must stack, the merge reference must equal W + s·(alpha/rank)·B·A in both checkpoint
// layouts, and LoRAs for other models or broken files must be refused with a LoraError that says why.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import type { Flux2Config } from '../../src/models/flux2/config.ts';
import { writeRandomFlux2Checkpoint } from '../../src/fixtures/flux2.ts';
import { flux2BflShapes, openFlux2Checkpoint, type Flux2Weights } from '../../src/models/flux2/checkpoint.ts';
import { LoraError, loadLora, stackLoras, type LoadedLora } from '../../src/models/flux2/lora/load.ts';
import { mergeLorasIntoCheckpoint, storedPieces } from '../../src/models/flux2/lora/merge.ts';
import { TINY_LORA_FORMATS, writeTinyLora, type TinyLora } from '../../src/fixtures/lora.ts';
import { readFloat32, writeSafetensors, type TensorToWrite } from '../../src/weights/safetensors.ts';
import { runKlein, tmpDir } from '../cli/helpers.ts';

const CFG: Flux2Config = { inChannels: 128, contextInDim: 96, hiddenSize: 64, numHeads: 2, depth: 2, depthSingleBlocks: 2, axesDim: [8, 8, 8, 8], theta: 2000, mlpRatio: 3, useGuidanceEmbed: false };
const H = CFG.hiddenSize;
const SHAPES = new Map(flux2BflShapes(CFG).map((s) => [s.name, s.shape]));
let dir: string;
const base: Record<'bfl' | 'diffusers', string> = { bfl: '', diffusers: '' };
const tiny = new Map<string, TinyLora>();

before(() => {
  dir = tmpDir('lora');
  for (const layout of ['bfl', 'diffusers'] as const) {
    base[layout] = path.join(dir, `base-${layout}.safetensors`);
    writeRandomFlux2Checkpoint(base[layout], CFG, { layout, seed: 5, dtype: 'F32' });
  }
  for (const f of TINY_LORA_FORMATS) tiny.set(f, writeTinyLora(path.join(dir, `${f}.safetensors`), f, CFG, { seed: 3 }));
});

/** Σ (alpha/rank)·B·A per BFL weight, in BFL rows, from what the loader returned. */
function denseDeltas(lora: LoadedLora): Map<string, Float64Array> {
  const out = new Map<string, Float64Array>();
  for (const t of lora.targets) {
    const [rows, inF] = SHAPES.get(t.weight)!;
    const d = out.get(t.weight) ?? new Float64Array(rows * inF);
    const first = t.rows?.[0] ?? 0;
    for (let i = 0; i < t.outFeatures; i++) {
      for (let k = 0; k < t.rank; k++) {
        const c = (t.alpha / t.rank) * t.up[i * t.rank + k];
        for (let j = 0; j < inF; j++) d[(first + i) * inF + j] += c * t.down[k * inF + j];
      }
    }
    out.set(t.weight, d);
  }
  return out;
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

for (const format of TINY_LORA_FORMATS) {
  test(`${format}: every module maps onto its BFL weight and rows; B·A equals the delta the writer meant`, () => {
    const t = tiny.get(format)!;
    const lora = loadLora(t.file, CFG);
    assert.equal(lora.targets.length, t.modules);
    const got = denseDeltas(lora);
    assert.deepEqual([...got.keys()].sort(), [...t.expected.keys()].sort());
    for (const [w, exp] of t.expected) {
      const diff = maxAbsDiff(got.get(w)!, exp);
      assert.ok(diff < 1e-9, `${format} ${w}: max |Δ| ${diff}`);
      assert.ok(exp.some((v) => v !== 0), `${w}: the writer's delta is not all zero`);
    }
  });
}

test('format names, row ranges of split q/k/v, per-module alphas from tensors and from diffusers metadata', () => {
  const d = loadLora(tiny.get('diffusers')!.file, CFG);
  assert.match(d.format, /diffusers \(transformer\.; lora_A\/lora_B\)/);
  const byModule = new Map(d.targets.map((t) => [t.module, t]));
  assert.deepEqual(byModule.get('transformer.transformer_blocks.1.attn.to_k')!.rows, [H, 2 * H]);
  assert.equal(byModule.get('transformer.transformer_blocks.1.attn.add_v_proj')!.weight, 'double_blocks.1.txt_attn.qkv.weight');
  assert.deepEqual(byModule.get('transformer.transformer_blocks.1.attn.add_v_proj')!.rows, [2 * H, 3 * H]);
  // lora_adapter_metadata: alpha 8 at rank 4, alpha_pattern/rank_pattern give single to_out rank 2, alpha 1
  assert.deepEqual([byModule.get('transformer.transformer_blocks.0.attn.to_q')!.rank, byModule.get('transformer.transformer_blocks.0.attn.to_q')!.alpha], [4, 8]);
  assert.deepEqual([byModule.get('transformer.single_transformer_blocks.0.attn.to_out')!.rank, byModule.get('transformer.single_transformer_blocks.0.attn.to_out')!.alpha], [2, 1]);
  const k = loadLora(tiny.get('kohya')!.file, CFG);
  assert.match(k.format, /kohya\/musubi-tuner \(lora_unet_; lora_down\/lora_up\)/);
  const l1 = k.targets.find((t) => t.weight === 'single_blocks.1.linear1.weight')!;
  assert.deepEqual([l1.rank, l1.alpha, l1.rows, l1.outFeatures], [3, 6, undefined, 3 * H + 2 * 3 * H]);
  assert.match(loadLora(tiny.get('ai-toolkit')!.file, CFG).format, /ai-toolkit\/BFL \(diffusion_model\./);
  assert.equal(loadLora(tiny.get('peft')!.file, CFG).targets[0].alpha, 3);
});

test('stackLoras: per Linear, up·down = Σ scale·(alpha/rank)·B·A over several LoRAs; scale 0 adds nothing', () => {
  const a = loadLora(tiny.get('diffusers')!.file, CFG);
  const b = loadLora(tiny.get('kohya')!.file, CFG);
  const c = loadLora(tiny.get('onetrainer')!.file, CFG);
  const stacked = stackLoras([{ lora: a, scale: 0.7 }, { lora: b, scale: -0.5 }, { lora: c, scale: 0 }], CFG);
  const qkv = stacked.get('double_blocks.0.img_attn.qkv.weight')!;
  assert.equal(qkv.rank, 3 * 4 + 4, 'to_q/to_k/to_v at rank 4 each, plus the fused kohya qkv at rank 4');
  assert.equal(stacked.has('txt_in.weight'), true, 'context_embedder of the diffusers LoRA');
  for (const [w, s] of stacked) {
    const [rows, inF] = SHAPES.get(w)!;
    assert.deepEqual([s.outFeatures, s.inFeatures], [rows, inF]);
    const product = new Float64Array(rows * inF);
    for (let i = 0; i < rows; i++) for (let k = 0; k < s.rank; k++) for (let j = 0; j < inF; j++) product[i * inF + j] += s.up[i * s.rank + k] * s.down[k * inF + j];
    const want = new Float64Array(rows * inF);
    for (const [t, scale] of [[tiny.get('diffusers')!, 0.7], [tiny.get('kohya')!, -0.5]] as const) {
      const e = t.expected.get(w);
      if (e) for (let i = 0; i < want.length; i++) want[i] += scale * e[i];
    }
    assert.ok(maxAbsDiff(product, want) < 1e-6, `${w}: ${maxAbsDiff(product, want)}`);
  }
  assert.equal(stackLoras([{ lora: a, scale: 0 }], CFG).size, 0);
});

test('storedPieces: a fused-qkv target lands on to_q/to_k/to_v rows, a row range on one part, final adaLN halves swap', () => {
  const qkv = 'double_blocks.0.txt_attn.qkv.weight';
  assert.deepEqual(storedPieces('bfl', qkv, 3 * H), [{ stored: qkv, storedRows: [0, 3 * H], upRows: [0, 3 * H] }]);
  assert.deepEqual(storedPieces('diffusers', qkv, 3 * H), [
    { stored: 'transformer_blocks.0.attn.add_q_proj.weight', storedRows: [0, H], upRows: [0, H] },
    { stored: 'transformer_blocks.0.attn.add_k_proj.weight', storedRows: [0, H], upRows: [H, 2 * H] },
    { stored: 'transformer_blocks.0.attn.add_v_proj.weight', storedRows: [0, H], upRows: [2 * H, 3 * H] },
  ]);
  assert.deepEqual(storedPieces('diffusers', qkv, 3 * H, [H, 2 * H]), [{ stored: 'transformer_blocks.0.attn.add_k_proj.weight', storedRows: [0, H], upRows: [0, H] }]);
  assert.deepEqual(storedPieces('diffusers', 'final_layer.adaLN_modulation.1.weight', 2 * H), [
    { stored: 'norm_out.linear.weight', storedRows: [H, 2 * H], upRows: [0, H] },
    { stored: 'norm_out.linear.weight', storedRows: [0, H], upRows: [H, 2 * H] },
  ]);
});

/** Every BFL weight of a checkpoint as float32, rows concatenated in BFL order. */
function bflValues(w: Flux2Weights): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const { name } of flux2BflShapes(w.config)) {
    const parts = w.parts(name).map(readFloat32);
    const all = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      all.set(p, at);
      at += p.length;
    }
    out.set(name, all);
  }
  return out;
}

for (const layout of ['bfl', 'diffusers'] as const) {
  test(`merge into a ${layout} checkpoint: every weight equals W + Σ s·(alpha/rank)·B·A; the rest is unchanged`, () => {
    const applied = [
      { lora: loadLora(tiny.get('kohya')!.file, CFG), scale: 0.8 },
      { lora: loadLora(tiny.get('diffusers')!.file, CFG), scale: 1.3 },
    ];
    const out = path.join(dir, `merged-${layout}.safetensors`);
    const r = mergeLorasIntoCheckpoint(base[layout], applied, out, { dtype: 'F32' });
    assert.equal(r.layout, layout);
    const merged = openFlux2Checkpoint(out);
    assert.equal(merged.layout, layout);
    const before = bflValues(openFlux2Checkpoint(base[layout]));
    const after = bflValues(merged);
    let adapted = 0;
    for (const [w, b] of before) {
      const want = Float64Array.from(b);
      for (const [t, s] of [[tiny.get('kohya')!, 0.8], [tiny.get('diffusers')!, 1.3]] as const) {
        const e = t.expected.get(w);
        if (e) for (let i = 0; i < want.length; i++) want[i] += s * e[i];
      }
      const changed = want.some((v, i) => v !== b[i]);
      if (changed) adapted++;
      else assert.deepEqual(after.get(w), b, `${w} untouched`);
      assert.ok(maxAbsDiff(after.get(w)!, want) < 1e-5, `${w}: ${maxAbsDiff(after.get(w)!, want)}`);
    }
    assert.equal(adapted, new Set([...tiny.get('kohya')!.expected.keys(), ...tiny.get('diffusers')!.expected.keys()]).size);
  });
}

test('merge keeps bf16 tensors bf16 (one rounding of W + delta) and scale 0 writes the base back bit for bit', () => {
  const bf = path.join(dir, 'base-bf16.safetensors');
  writeRandomFlux2Checkpoint(bf, CFG, { layout: 'diffusers', seed: 9 });
  const lora = loadLora(tiny.get('peft')!.file, CFG);
  const same = path.join(dir, 'merged-zero.safetensors');
  mergeLorasIntoCheckpoint(bf, [{ lora, scale: 0 }], same);
  const a = openFlux2Checkpoint(bf).checkpoint;
  const b = openFlux2Checkpoint(same).checkpoint;
  for (const n of a.names) assert.deepEqual(readFloat32(b.info(n)), readFloat32(a.info(n)), n);
  const out = path.join(dir, 'merged-bf16.safetensors');
  mergeLorasIntoCheckpoint(bf, [{ lora, scale: 1 }], out);
  const m = openFlux2Checkpoint(out);
  const w = 'single_blocks.0.linear1.weight';
  assert.equal(m.parts(w)[0].dtype, 'BF16');
  const base0 = bflValues(openFlux2Checkpoint(bf)).get(w)!;
  const got = bflValues(m).get(w)!;
  const e = tiny.get('peft')!.expected.get(w)!;
  for (let i = 0; i < got.length; i++) {
    const want = base0[i] + e[i];
    assert.ok(Math.abs(got[i] - want) <= Math.abs(want) * 2 ** -8 + 1e-30, `${i}: ${got[i]} vs ${want}`);
  }
});

test('klein dev make-tiny-lora writes every format for a model; the files load; existing files need --force', async () => {
  const out = path.join(dir, 'cli');
  const r = await runKlein(['dev', 'make-tiny-lora', base.diffusers, out, '--seed', '4', '--rank', '2', '--alpha', '5']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /wrote 6 tiny random LoRA\(s\) for a 64-wide model with 2 double and 2 single blocks/);
  for (const f of TINY_LORA_FORMATS) {
    const l = loadLora(path.join(out, `${f}.safetensors`), CFG);
    assert.ok(l.targets.every((t) => t.rank === 2), f);
    assert.ok(l.targets.every((t) => t.alpha === (['kohya', 'onetrainer', 'diffusers'].includes(f) ? 5 : 2)), f);
  }
  const again = await runKlein(['dev', 'make-tiny-lora', base.diffusers, out, '--format', 'kohya']);
  assert.equal(again.code, 2);
  assert.match(again.stderr, /already holds kohya\.safetensors \(use --force/);
  const bad = await runKlein(['dev', 'make-tiny-lora', path.join(dir, 'nope'), out]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /not found/);
});

// ---------------------------------------------------------------------------------------------- hostile files

function writeLora(name: string, tensors: Record<string, TensorToWrite>, metadata?: Record<string, string>): string {
  const f = path.join(dir, `${name}.safetensors`);
  writeSafetensors(f, tensors, metadata);
  return f;
}
const mat = (rows: number, cols: number, fill = 0.01): TensorToWrite => ({ dtype: 'F32', shape: [rows, cols], data: new Float32Array(rows * cols).fill(fill) });

function refused(file: string, code: LoraError['code'], why: RegExp, cfg: Flux2Config = CFG): void {
  assert.throws(() => loadLora(file, cfg), (e: unknown) => {
    assert.ok(e instanceof LoraError, `expected LoraError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.ok(e.status >= 400 && e.status < 500);
    assert.match(e.message, why);
    return true;
  });
}

test('a FLUX.1 LoRA is refused as FLUX.1: kohya per-block modulation, diffusers proj_mlp, metadata, 19 double blocks', () => {
  refused(writeLora('f1-kohya', { 'lora_unet_double_blocks_0_img_mod_lin.lora_down.weight': mat(4, H), 'lora_unet_double_blocks_0_img_mod_lin.lora_up.weight': mat(6 * H, 4) }), 'lora_incompatible', /FLUX\.1 LoRA .*img_mod/);
  refused(writeLora('f1-diffusers', { 'transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight': mat(4, H), 'transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight': mat(4 * H, 4) }), 'lora_incompatible', /FLUX\.1 LoRA .*proj_mlp/);
  refused(
    writeLora('f1-meta', { 'transformer.transformer_blocks.0.attn.to_q.lora_A.weight': mat(4, H), 'transformer.transformer_blocks.0.attn.to_q.lora_B.weight': mat(H, 4) }, { 'modelspec.architecture': 'flux-1-dev/lora' }),
    'lora_incompatible',
    /made for FLUX\.1 \(metadata modelspec\.architecture/,
  );
  refused(writeLora('f1-deep', { 'lora_unet_double_blocks_18_img_attn_proj.lora_down.weight': mat(4, H), 'lora_unet_double_blocks_18_img_attn_proj.lora_up.weight': mat(H, 4) }), 'lora_incompatible', /double block 18 .* this model has 2 double and 2 single blocks: it was made for a deeper model/);
  // a FLUX.1 single block: linear1 is 3·H + 4·H wide
  refused(writeLora('f1-linear1', { 'lora_unet_single_blocks_0_linear1.lora_down.weight': mat(4, H), 'lora_unet_single_blocks_0_linear1.lora_up.weight': mat(7 * H, 4) }), 'lora_incompatible', /maps 64 → 448 features.*maps 64 → 576 \(a FLUX\.1 single block/);
});

test('a LoRA for a larger klein is refused with the size it was made for; mismatched ranks and half modules are invalid', () => {
  refused(writeLora('9b', { 'diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight': mat(4, 4096), 'diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight': mat(3 * 4096, 4) }), 'lora_incompatible', /maps 4096 → 12288 .* \(hidden size 4096: a LoRA for klein 9B; this model's is 64\)/);
  const wider = writeTinyLora(path.join(dir, 'wider.safetensors'), 'peft', { ...CFG, hiddenSize: 96, numHeads: 3 });
  refused(wider.file, 'lora_incompatible', /maps 96 → 288 features, but this model's double_blocks\.0\.img_attn\.qkv\.weight maps 64 → 192/);
  refused(writeLora('rank', { 'transformer.transformer_blocks.0.attn.to_q.lora_A.weight': mat(4, H), 'transformer.transformer_blocks.0.attn.to_q.lora_B.weight': mat(H, 3) }), 'lora_invalid', /mismatched ranks: down \[4,64\] has rank 4, up \[64,3\] has 3/);
  refused(writeLora('half', { 'lora_unet_single_blocks_0_linear2.lora_down.weight': mat(4, 4 * H), 'lora_unet_single_blocks_0_linear2.alpha': { dtype: 'F32', shape: [], data: Float32Array.of(4) } }), 'lora_invalid', /has no up \(lora_B\/lora_up\) tensor/);
  refused(writeLora('nan', { 'transformer.proj_out.lora_A.weight': mat(2, H, NaN), 'transformer.proj_out.lora_B.weight': mat(128, 2) }), 'lora_invalid', /NaN or infinite/);
});

test('text-encoder LoRAs, other adapter types, full checkpoints and non-LoRA tensors are refused', () => {
  refused(writeLora('te', { 'text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight': mat(4, 32), 'text_encoder.model.layers.0.self_attn.q_proj.lora_B.weight': mat(32, 4) }), 'lora_unsupported', /adapts the text encoder/);
  refused(writeLora('te-kohya', { 'lora_te1_model_layers_0_mlp_up_proj.lora_down.weight': mat(4, 32), 'lora_te1_model_layers_0_mlp_up_proj.lora_up.weight': mat(32, 4) }), 'lora_unsupported', /adapts the text encoder/);
  refused(writeLora('dora', { 'transformer.proj_out.lora_A.weight': mat(2, H), 'transformer.proj_out.lora_B.weight': mat(128, 2), 'transformer.proj_out.dora_scale': mat(1, H) }), 'lora_unsupported', /DoRA/);
  refused(writeLora('lokr', { 'lora_unet_single_blocks_0_linear2.lokr_w1': mat(4, 4), 'lora_unet_single_blocks_0_linear2.lokr_w2': mat(16, 48) }), 'lora_unsupported', /LoKr/);
  refused(base.bfl, 'lora_invalid', /holds no LoRA weights .*tensors like img_in\.weight, .* look like a full checkpoint/);
  refused(writeLora('empty', {}), 'lora_invalid', /holds no LoRA weights/);
  refused(writeLora('guid', { 'diffusion_model.guidance_in.in_layer.lora_A.weight': mat(2, 256), 'diffusion_model.guidance_in.in_layer.lora_B.weight': mat(H, 2) }), 'lora_incompatible', /guidance embedder/);
  refused(writeLora('sd', { 'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight': mat(4, 32), 'lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight': mat(32, 4) }), 'lora_incompatible', /not FLUX\.2 transformer layers, e\.g\. lora_unet_down_blocks_0/);
});

test('truncated, garbage and missing files are refused as invalid, naming the file', () => {
  const good = fs.readFileSync(tiny.get('kohya')!.file);
  const cut = path.join(dir, 'cut.safetensors');
  fs.writeFileSync(cut, good.subarray(0, good.length - 100));
  refused(cut, 'lora_invalid', /cut\.safetensors is not a valid safetensors file: .*truncated or corrupt/);
  const junk = path.join(dir, 'junk.safetensors');
  fs.writeFileSync(junk, Buffer.from('<html>not found</html>'));
  refused(junk, 'lora_invalid', /junk\.safetensors is not a valid safetensors file: bad header length/);
  refused(path.join(dir, 'absent.safetensors'), 'lora_not_found', /no such file/);
});
