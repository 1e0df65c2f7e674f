// Conformance of the FLUX.2 transformer: every `transformer/case*.safetensors` of a golden folder, run on the
// BFL-layout weights (`transformer/` with config.json + model.safetensors) and again on the diffusers layout
// (`transformer/diffusers/`) when present. `output` (and `output_img`, the target-token part the sampler keeps)
// must match within 1e-4 · max(1, max|ref|); within 1e-2 · max(1, max|ref|) when a GPU runs the Linears in fp16
// (FP16_FACTOR: measured 2.7e-3–3.1e-3 on WebGPU/lavapipe, see docs/benchmarks.md), and the case name says fp16.
import fs from 'node:fs';
import path from 'node:path';
import { Flux2Transformer } from '../models/flux2/runtime.ts';
import { GoldenCase, errorResult, findCases, relResult } from './golden.ts';
import type { CaseResult, ConformComponent, ConformOptions } from './types.ts';

const COMPONENT = 'transformer';
/** Relative tolerance of the fp16 GPU path: ~3× the largest error measured on the golden cases. */
export const FP16_FACTOR = 1e-2;

/** Weight folders to check, each with a label: the BFL layout first, then diffusers if the golden has it. */
function modelFolders(dir: string): Array<{ label: string; folder: string }> {
  const out: Array<{ label: string; folder: string }> = [];
  if (fs.existsSync(path.join(dir, 'model.safetensors')) || fs.existsSync(path.join(dir, 'model.safetensors.index.json'))) out.push({ label: 'bfl', folder: dir });
  const diff = path.join(dir, 'diffusers');
  if (fs.existsSync(path.join(diff, 'config.json'))) out.push({ label: 'diffusers', folder: diff });
  return out;
}

async function* runCase(model: Flux2Transformer, label: string, file: string): AsyncIterable<CaseResult> {
  const gc = new GoldenCase(file);
  const fp16 = model.computeDtype === 'fp16';
  const name = `${COMPONENT}/${gc.name} (${label}${fp16 ? ', fp16' : ''})`;
  const factor = fp16 ? FP16_FACTOR : 1e-4;
  try {
    const [B, N] = gc.shape('x');
    const L = gc.shape('ctx')[1];
    const out = await model.forward({
      x: gc.f32('x'),
      xIds: gc.i64('x_ids'),
      timesteps: gc.f32('timesteps'),
      ctx: gc.f32('ctx'),
      ctxIds: gc.i64('ctx_ids'),
      guidance: gc.has('guidance') ? gc.f32('guidance') : undefined,
      batch: B,
      nTokens: N,
      nCtx: L,
    });
    yield relResult(COMPONENT, `${name} output`, out, gc.f32('output'), factor);
    if (gc.has('output_img')) {
      // the first n_img tokens of every sample: what the sampler keeps when references are appended
      const nImg = gc.shape('output_img')[1];
      const C = model.config.inChannels;
      const img = new Float32Array(B * nImg * C);
      for (let b = 0; b < B; b++) img.set(out.subarray(b * N * C, (b * N + nImg) * C), b * nImg * C);
      yield relResult(COMPONENT, `${name} output_img`, img, gc.f32('output_img'), factor);
    }
  } catch (e) {
    yield errorResult(COMPONENT, name, e);
  }
}

export const transformerComponent: ConformComponent = {
  name: COMPONENT,
  async *run(goldenDir: string, opts: ConformOptions): AsyncIterable<CaseResult> {
    const dir = path.join(goldenDir, 'transformer');
    const cases = findCases(dir, /^case.*\.safetensors$/).filter((f) => !/_intermediates\.safetensors$/.test(f));
    if (cases.length === 0) return;
    const folders = modelFolders(dir);
    if (folders.length === 0) {
      yield errorResult(COMPONENT, `${COMPONENT}/model`, new Error(`${dir} has cases but no model.safetensors (BFL) or diffusers/ weights`));
      return;
    }
    for (const { label, folder } of folders) {
      let model: Flux2Transformer;
      try {
        model = await Flux2Transformer.load(folder, { target: opts.target });
      } catch (e) {
        for (const c of cases) yield errorResult(COMPONENT, `${COMPONENT}/${path.basename(c, '.safetensors')} (${label})`, e);
        continue;
      }
      try {
        for (const c of cases) yield* runCase(model, label, c);
      } finally {
        await model.close();
      }
    }
  },
};
