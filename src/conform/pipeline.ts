// End-to-end conformance on pipeline/*.safetensors (t2i, edit, klein-base CFG): the stored inputs (token ids,
// noise, reference images) go through the same pieces the pipeline uses — Qwen3 context, reference encoding, the
// schedule, the Euler/CFG loop with the tiny golden transformer, unpacking, the VAE decoder, uint8 conversion — and
// every stored intermediate is compared: ≤ 1e-3 absolute for latents and `decoded`, ±1 for the uint8 images.
import fs from 'node:fs';
import path from 'node:path';
import { Flux2Transformer } from '../models/flux2/runtime.ts';
import { Flux2VAE } from '../models/vae/runtime.ts';
import { Qwen3TextEncoder } from '../models/qwen3/runtime.ts';
import { encodeImage, prepareReferenceImage, tensorToRgb } from '../pipeline/images.ts';
import { imagePositionIds, latentToTokens, referenceTokens, tokensToLatent } from '../pipeline/latents.ts';
import { denoise } from '../pipeline/sampler.ts';
import { getSchedule, imageSeqLen } from '../pipeline/schedule.ts';
import { GoldenCase, absResult, errorResult, findCases, relResult } from './golden.ts';
import type { CaseResult, ConformComponent, ConformOptions } from './types.ts';

const NAME = 'pipeline';
const LATENT_TOL = 1e-3;

interface Models {
  te: Qwen3TextEncoder;
  tr: Flux2Transformer;
  vae: Flux2VAE;
}

function exact(name: string, got: ArrayLike<bigint | number>, want: ArrayLike<bigint | number>): CaseResult {
  let bad = got.length === want.length ? 0 : Infinity;
  for (let i = 0; i < Math.min(got.length, want.length); i++) if (got[i] !== want[i]) bad++;
  return { component: NAME, name, maxAbsErr: bad, tolerance: 0, passed: bad === 0, error: bad ? `${bad} of ${want.length} values differ` : undefined };
}

/** uint8 images agree within ±1 level (float32 rounding at the .5 boundaries). */
function uint8Result(name: string, got: Uint8Array, want: Uint8Array): CaseResult {
  return absResult(NAME, name, got, want, 1);
}

async function* runCase(file: string, m: Models): AsyncGenerator<CaseResult> {
  const c = new GoldenCase(file);
  const tag = `pipeline/${c.name}`;
  const meta = c.metadata;
  const width = Number(meta.width);
  const height = Number(meta.height);
  const steps = Number(meta.num_steps);
  const guidance = Number(meta.guidance);
  const cfg = c.shape('ctx')[0] === 2;

  // text: stored ids → Qwen3 → stacked hidden states
  const [ctxRows, ctxLen] = c.shape('input_ids');
  const ctx = await m.te.embed(c.i64('input_ids'), c.i64('attention_mask'), ctxRows);
  yield relResult(NAME, `${tag} ctx`, ctx, c.f32('ctx'));

  // references: uint8 HWC → the pipeline's own preparation (pixel cap, centre crop to multiples of 16, [-1, 1]),
  // fed a lossless PNG of the stored pixels as the pipeline is fed an upload → VAE encode → tokens at t = 10, 20, …
  let refs: ReturnType<typeof referenceTokens> | undefined;
  const refSuffixes: string[] = [];
  for (let k = 0; c.has(`ref_image_uint8_hwc${k ? `.${k}` : ''}`); k++) refSuffixes.push(k ? `.${k}` : '');
  if (refSuffixes.length) {
    const latents = [];
    for (const sfx of refSuffixes) {
      const [h, w] = c.shape(`ref_image_uint8_hwc${sfx}`);
      const png = await encodeImage({ data: c.u8(`ref_image_uint8_hwc${sfx}`), width: w, height: h }, 'png');
      const t = await prepareReferenceImage(png, { numReferences: refSuffixes.length });
      yield absResult(NAME, `${tag} ref_image_tensor${sfx}`, t.tensor, c.f32(`ref_image_tensor${sfx}`), 1e-6);
      const e = await m.vae.encode(t.tensor, t.dims);
      yield absResult(NAME, `${tag} ref_latent${sfx}`, e.latent, c.f32(`ref_latent${sfx}`), LATENT_TOL);
      latents.push({ data: e.latent, dims: e.dims });
    }
    refs = referenceTokens(latents);
    yield absResult(NAME, `${tag} img_cond_seq`, refs.tokens, c.f32('img_cond_seq'), LATENT_TOL);
    yield exact(`${tag} img_cond_seq_ids`, refs.ids, c.i64('img_cond_seq_ids'));
  }

  // noise → packed tokens, ids, schedule
  const [, C, h, w] = c.shape('noise');
  const x = latentToTokens(c.f32('noise'), c.shape('noise')).data;
  yield absResult(NAME, `${tag} x_init`, x, c.f32('x_init'), 0);
  const xIds = imagePositionIds(h, w);
  yield exact(`${tag} x_ids`, xIds, c.i64('x_ids'));
  const timesteps = getSchedule(steps, imageSeqLen(width, height));
  yield absResult(NAME, `${tag} timesteps`, timesteps, c.f32('timesteps'), 1e-6);

  // the sampler loop, checking every stored step
  const stepResults: CaseResult[] = [];
  await denoise(m.tr, {
    x,
    batch: 1,
    nImg: h * w,
    channels: C,
    xIds,
    ctx,
    ctxRows: cfg ? 2 : 1,
    ctxLen,
    refTokens: refs?.tokens,
    refIds: refs?.ids,
    nRef: refs?.count ?? 0,
    timesteps,
    guidance,
    onStep: (i, _total, out) => {
      if (c.has(`step${i}.model_out`)) stepResults.push(absResult(NAME, `${tag} step${i}.model_out`, out, c.f32(`step${i}.model_out`), LATENT_TOL));
      if (c.has(`step${i}.model_out_uncond_cond`)) stepResults.push(absResult(NAME, `${tag} step${i}.model_out_uncond_cond`, out, c.f32(`step${i}.model_out_uncond_cond`), LATENT_TOL));
      if (c.has(`step${i}.x_after`)) stepResults.push(absResult(NAME, `${tag} step${i}.x_after`, x, c.f32(`step${i}.x_after`), LATENT_TOL));
    },
  });
  yield* stepResults;
  yield absResult(NAME, `${tag} final_tokens`, x, c.f32('final_tokens'), LATENT_TOL);

  // unpack, decode, uint8 by both reference rules
  const lat = tokensToLatent(x, [1, h * w, C], h, w);
  yield absResult(NAME, `${tag} final_latent`, lat.data, c.f32('final_latent'), LATENT_TOL);
  const dec = await m.vae.decode(lat.data, lat.dims);
  yield absResult(NAME, `${tag} decoded`, dec.image, c.f32('decoded'), LATENT_TOL);
  yield uint8Result(`${tag} image_uint8_bfl`, tensorToRgb(dec.image, dec.dims, 0, 'truncate').data, c.u8('image_uint8_bfl'));
  yield uint8Result(`${tag} image_uint8_diffusers_round`, tensorToRgb(dec.image, dec.dims, 0, 'round').data, c.u8('image_uint8_diffusers_round'));
}

export const pipelineComponent: ConformComponent = {
  name: NAME,
  async *run(goldenDir: string, opts: ConformOptions): AsyncIterable<CaseResult> {
    const cases = findCases(path.join(goldenDir, 'pipeline'), /\.safetensors$/);
    if (cases.length === 0) return;
    const fp32 = { ...opts.target, gpuDtype: 'fp32' as const };
    let models: Models;
    try {
      const teDir = path.join(goldenDir, 'text_encoder');
      const trDir = path.join(goldenDir, 'transformer');
      const vaeFile = path.join(goldenDir, 'vae', 'model.safetensors');
      for (const p of [teDir, trDir, vaeFile]) if (!fs.existsSync(p)) throw new Error(`the pipeline cases need the tiny weights: ${p} is missing`);
      models = {
        te: await Qwen3TextEncoder.load(teDir, { target: fp32 }), // fp16 contexts are ≈6e-3 off (text-encoder component)
        // fp32 on GPUs too: these cases check the pipeline's plumbing to 1e-3 over 4 steps and a decode, which the
        // fp16 Linears (≈3e-3 relative per evaluation, checked by the transformer component) would exceed.
        tr: await Flux2Transformer.load(trDir, { target: fp32 }),
        vae: await Flux2VAE.load(vaeFile, { target: opts.target, gpuDtype: 'fp32' }), // likewise: fp16 convs are ≈1e-2 off
      };
    } catch (e) {
      for (const f of cases) yield errorResult(NAME, `pipeline/${path.basename(f, '.safetensors')}`, e);
      return;
    }
    try {
      for (const f of cases) {
        try {
          yield* runCase(f, models);
        } catch (e) {
          yield errorResult(NAME, `pipeline/${path.basename(f, '.safetensors')}`, e);
        }
      }
    } finally {
      await models.te.close();
      await models.tr.close();
      await models.vae.close();
    }
  },
};

