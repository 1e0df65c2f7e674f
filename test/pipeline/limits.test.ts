// One set of limits (src/pipeline/limits.ts): the pipeline's checks, the API's zod schemas (and so its OpenAPI
// document) and the CLI's flags accept and refuse the same values.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { z } from '@hono/zod-openapi';
import { LIMITS, parseSizeSpec, SIZE_PRESETS, sizeFromReference } from '../../src/pipeline/limits.ts';
import { PipelineInputError, resolveRequest } from '../../src/pipeline/request.ts';
import type { GenerateRequest } from '../../src/pipeline/types.ts';
import { EditInput, TextToImageInput } from '../../src/service/models.ts';
import { VARIANTS } from '../../src/weights/model-folder.ts';
import { runKlein } from '../cli/helpers.ts';

const base: GenerateRequest = { prompt: 'a fox', width: 512, height: 512, seed: 0, numImages: 1, outputFormat: 'png' };
const pipelineCode = (req: Partial<GenerateRequest>): string | null => {
  try {
    resolveRequest({ ...base, ...req }, VARIANTS['klein-base-4b']);
    return null;
  } catch (e) {
    if (e instanceof PipelineInputError) return e.code;
    throw e;
  }
};
const apiProblem = (input: Record<string, unknown>): string | null => {
  const r = TextToImageInput.safeParse({ prompt: 'a fox', ...input });
  return r.success ? null : r.error.issues.map((i) => i.path.join('.')).join(',');
};

test('the API schemas take their bounds from LIMITS (what /openapi.json and llms.txt publish)', () => {
  const t2i = z.toJSONSchema(TextToImageInput, { io: 'input', unrepresentable: 'any' }) as any;
  const p = t2i.properties;
  assert.equal(p.num_inference_steps.maximum, LIMITS.maxSteps);
  assert.equal(p.seed.maximum, LIMITS.maxSeed);
  assert.equal(p.num_images.maximum, LIMITS.maxImages);
  assert.equal(p.prompt.maxLength, LIMITS.maxPromptChars);
  assert.equal(p.guidance_scale.maximum, LIMITS.maxGuidance);
  const sizeObj = p.image_size.anyOf.find((x: any) => x.type === 'object');
  assert.equal(sizeObj.properties.width.minimum, LIMITS.minSide);
  assert.equal(sizeObj.properties.width.multipleOf, LIMITS.multiple);
  assert.deepEqual(p.image_size.anyOf.find((x: any) => x.enum).enum, Object.keys(SIZE_PRESETS));
  const edit = z.toJSONSchema(EditInput, { io: 'input', unrepresentable: 'any' }) as any;
  assert.equal(edit.properties.image_urls.maxItems, LIMITS.maxRefs);
});

test('the pipeline and the API accept the limits and refuse one past them, field by field', () => {
  const cases: Array<[string, Partial<GenerateRequest>, Record<string, unknown>, string]> = [
    ['steps', { steps: LIMITS.maxSteps + 1 }, { num_inference_steps: LIMITS.maxSteps + 1 }, 'invalid_steps'],
    ['seed', { seed: LIMITS.maxSeed + 1 }, { seed: LIMITS.maxSeed + 1 }, 'invalid_seed'],
    ['seed + image index', { seed: LIMITS.maxSeed, numImages: 2 }, { seed: LIMITS.maxSeed, num_images: 2 }, 'invalid_seed'],
    ['images', { numImages: LIMITS.maxImages + 1 }, { num_images: LIMITS.maxImages + 1 }, 'invalid_num_images'],
    ['prompt', { prompt: 'x'.repeat(LIMITS.maxPromptChars + 1) }, { prompt: 'x'.repeat(LIMITS.maxPromptChars + 1) }, 'invalid_prompt'],
    ['guidance', { guidance: LIMITS.maxGuidance + 0.5 }, { guidance_scale: LIMITS.maxGuidance + 0.5 }, 'invalid_guidance'],
    ['side', { width: LIMITS.minSide - LIMITS.multiple }, { image_size: { width: LIMITS.minSide - LIMITS.multiple, height: 512 } }, 'invalid_size'],
    ['multiple', { width: 520 }, { image_size: { width: 520, height: 512 } }, 'invalid_size'],
    ['pixels', { width: 2048, height: 2064 }, { image_size: { width: 2048, height: 2064 } }, 'invalid_size'],
  ];
  for (const [name, req, input, code] of cases) {
    assert.equal(pipelineCode(req), code, `pipeline: ${name}`);
    assert.notEqual(apiProblem(input), null, `API: ${name}`);
  }
  const ok: Array<[Partial<GenerateRequest>, Record<string, unknown>]> = [
    [{ steps: LIMITS.maxSteps, seed: LIMITS.maxSeed }, { num_inference_steps: LIMITS.maxSteps, seed: LIMITS.maxSeed }],
    [{ seed: LIMITS.maxSeed - 3, numImages: LIMITS.maxImages }, { seed: LIMITS.maxSeed - 3, num_images: LIMITS.maxImages }],
    [{ prompt: 'x'.repeat(LIMITS.maxPromptChars), guidance: LIMITS.maxGuidance }, { prompt: 'x'.repeat(LIMITS.maxPromptChars), guidance_scale: LIMITS.maxGuidance }],
    [{ width: 2048, height: 2048 }, { image_size: { width: 2048, height: 2048 } }],
    [{ width: LIMITS.minSide, height: 65536 }, { image_size: { width: LIMITS.minSide, height: 65536 } }],
  ];
  for (const [req, input] of ok) {
    assert.equal(pipelineCode(req), null, JSON.stringify(req).slice(0, 80));
    assert.equal(apiProblem(input), null, JSON.stringify(input).slice(0, 80));
  }
  // the seed rule names the field at fault
  assert.equal(apiProblem({ seed: LIMITS.maxSeed, num_images: 2 }), 'seed');
});

test('an edit without a size: the first reference\'s aspect at no more than 1 MP, sides multiples of 16', () => {
  assert.deepEqual(sizeFromReference(4000, 3000), { width: 1168, height: 880 });
  assert.deepEqual(sizeFromReference(1024, 1024), { width: 1024, height: 1024 });
  assert.deepEqual(sizeFromReference(100, 70), { width: 96, height: 64 });
  assert.deepEqual(sizeFromReference(30, 2010), { width: 64, height: 2000 });
  for (const [w, h] of [[4000, 3000], [6000, 1000], [333, 777]]) {
    const s = sizeFromReference(w, h);
    assert.ok(s.width % 16 === 0 && s.height % 16 === 0 && s.width * s.height <= 1024 * 1024, `${w}×${h} → ${s.width}×${s.height}`);
  }
  assert.deepEqual(parseSizeSpec('square_hd'), { width: 1024, height: 1024 });
  assert.deepEqual(parseSizeSpec('640x480'), { width: 640, height: 480 });
  assert.equal(parseSizeSpec('huge'), null);
});

test('the CLI refuses the same seeds and image counts before it loads anything (exit 2)', async () => {
  const seed = await runKlein(['generate', 'a fox', '-m', '/nonexistent', '--seed', String(LIMITS.maxSeed + 1)]);
  assert.equal(seed.code, 2);
  assert.match(seed.stderr, new RegExp(`--seed is too large: ${LIMITS.maxSeed + 1}`));
  const n = await runKlein(['generate', 'a fox', '-m', '/nonexistent', '--num-images', String(LIMITS.maxImages + 1)]);
  assert.equal(n.code, 2);
  assert.match(n.stderr, new RegExp(`--num-images must be 1 to ${LIMITS.maxImages}`));
});
