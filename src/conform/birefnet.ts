// Conformance of the BiRefNet matting model against `birefnet/case*.safetensors` (reference code, tiny random
// weights in `birefnet/model.safetensors`). Every stage is checked on its own reference input so a failure points
// at one stage: preprocessing (Pillow resize + normalisation), the network (logits, alpha), the float alpha route
// back to the source size through the public `predict()`, the uint8 mask route of the HF model card and the
// blur-fusion foreground estimate.
import path from 'node:path';
import fs from 'node:fs';
import { normalizeImage, pilResize } from '../pipeline/image-resize.ts';
import { estimateForeground, truncateToUint8 } from '../pipeline/matting.ts';
import { MattingPredictor } from '../pipeline/matting-model.ts';
import { GoldenCase, findCases, relResult, absResult, errorResult } from './golden.ts';
import type { CaseResult, ConformComponent, ConformOptions } from './types.ts';

const NAME = 'birefnet';
/** 8-bit outputs: float rounding may flip a truncation by one level (the README's ±1). */
const U8_TOL = 1;

export const birefnetComponent: ConformComponent = {
  name: NAME,
  async *run(goldenDir: string, opts: ConformOptions): AsyncIterable<CaseResult> {
    const dir = path.join(goldenDir, 'birefnet');
    const cases = findCases(dir, /^case.*\.safetensors$/);
    if (cases.length === 0) return;
    const weights = path.join(dir, 'model.safetensors');
    for (const file of cases) {
      const label = `birefnet/${path.basename(file, '.safetensors')}`;
      if (!fs.existsSync(weights)) {
        yield errorResult(NAME, label, new Error(`weights not found: ${weights}`));
        continue;
      }
      try {
        yield* runCase(new GoldenCase(file), weights, label, opts);
      } catch (e) {
        yield errorResult(NAME, label, e);
      }
    }
  },
};

async function* runCase(gc: GoldenCase, weights: string, label: string, opts: ConformOptions): AsyncIterable<CaseResult> {
  const [, , h, w] = gc.shape('input');
  const [sh, sw] = gc.shape('source_image_uint8_hwc');
  const source = gc.u8('source_image_uint8_hwc');

  const resized = pilResize(source, sw, sh, 3, w, h);
  yield absResult(NAME, `${label} resized_image_uint8_hwc`, resized, gc.u8('resized_image_uint8_hwc'), U8_TOL);
  yield relResult(NAME, `${label} input`, normalizeImage(gc.u8('resized_image_uint8_hwc'), w, h), gc.f32('input'));

  // exact on every device: the model always computes in fp32
  const model = await MattingPredictor.load(weights, { target: opts.target, inputSize: [h, w] });
  try {
    const out = await model.run(gc.f32('input'), h, w);
    yield relResult(NAME, `${label} logits`, out.logits, gc.f32('logits'));
    yield relResult(NAME, `${label} alpha`, out.alpha, gc.f32('alpha'));
    yield absResult(NAME, `${label} mask_uint8_model_size`, truncateToUint8(out.alpha), gc.u8('mask_uint8_model_size'), U8_TOL);
    // the public API end to end: source image in, matte at the source size out
    yield relResult(NAME, `${label} alpha_source_size (predict)`, await model.predict(source, sw, sh), gc.f32('alpha_source_size'));
  } finally {
    await model.close();
  }

  yield absResult(NAME, `${label} mask_uint8_source_size`, pilResize(gc.u8('mask_uint8_model_size'), w, h, 1, sw, sh, 'bicubic'), gc.u8('mask_uint8_source_size'), U8_TOL);
  const mask = gc.u8('mask_uint8_source_size');
  const alpha = Float32Array.from(mask, (v) => v / 255);
  yield absResult(NAME, `${label} foreground_uint8_hwc`, truncateToUint8(estimateForeground(source, alpha, sw, sh)), gc.u8('foreground_uint8_hwc'), U8_TOL);
}
