// Conformance of the Qwen3 text encoder against `text_encoder/case*.safetensors`: the stacked klein context
// `prompt_embeds` (B, 512, 3·hidden) for the stored input_ids/attention_mask, and every `hidden_states.k` a case
// stores (HF indexing), with the weights and config.json of the same folder. Within 1e-4 · max(1, max|ref|); on a
// GPU device the encoder runs in that device's default dtype (fp16 projections), each line names device and dtype,
// and fp16 is held to TEXT_FP16_FACTOR instead.
import path from 'node:path';
import { Qwen3TextEncoder } from '../models/qwen3/runtime.ts';
import { errorResult, findCases, GoldenCase, relResult } from './golden.ts';
import type { CaseResult, ConformComponent, ConformOptions } from './types.ts';

const NAME = 'text-encoder';
/**
 * Relative tolerance of the fp16 GPU projections: measured on WebGPU/lavapipe (ORT 1.30) 5.4e-3 (case1) and 5.7e-3
 * (case2) on prompt_embeds, up to 7.1e-3 on hidden_states.36 (the final norm scales the error up); ~3× the largest
 * (docs/benchmarks.md). fp32 on the same device: ~1e-6. The tiny model compounds rounding over 36 layers of width 32.
 */
export const TEXT_FP16_FACTOR = 2.5e-2;

export const textEncoderComponent: ConformComponent = {
  name: NAME,
  async *run(goldenDir: string, opts: ConformOptions): AsyncIterable<CaseResult> {
    const dir = path.join(goldenDir, 'text_encoder');
    const files = findCases(dir, /^case.*\.safetensors$/);
    if (files.length === 0) return;
    const cases = files.map((f) => new GoldenCase(f));
    // one session serves every case: it outputs the union of the hidden states the cases store
    const hiddenStates = [...new Set(cases.flatMap((c) => c.file.names.flatMap((n) => (/^hidden_states\.\d+$/.test(n) ? [Number(n.split('.')[1])] : []))))].sort((a, b) => a - b);
    let enc: Qwen3TextEncoder;
    try {
      enc = await Qwen3TextEncoder.load(dir, { hiddenStates, target: opts.target });
    } catch (e) {
      for (const c of cases) yield errorResult(NAME, `text_encoder/${c.name}`, e);
      return;
    }
    const fp16 = enc.computeDtype === 'fp16';
    const factor = fp16 ? TEXT_FP16_FACTOR : 1e-4;
    // CPU lines keep their names; a GPU line says what it ran on and in which dtype
    const where = enc.target.device === 'cpu' ? '' : ` (${enc.target.device}, ${enc.computeDtype})`;
    try {
      for (const c of cases) {
        const label = `text_encoder/${c.name}${where}`;
        try {
          const [batch] = c.shape('input_ids');
          const r = await enc.run(c.i64('input_ids'), c.i64('attention_mask'), batch);
          yield relResult(NAME, `${label} prompt_embeds`, r.context, c.f32('prompt_embeds'), factor);
          for (const k of hiddenStates) {
            if (c.has(`hidden_states.${k}`)) yield relResult(NAME, `${label} hidden_states.${k}`, r.hiddenStates.get(k)!, c.f32(`hidden_states.${k}`), factor);
          }
        } catch (e) {
          yield errorResult(NAME, label, e);
        }
      }
    } finally {
      await enc.close();
    }
  },
};
