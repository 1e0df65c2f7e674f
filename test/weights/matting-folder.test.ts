// Where the matting weights are found (option → $KLEIN_MATTING_MODEL → the model's matting/ → the pulled default),
// what a missing or foreign folder says, and which files of a Hub listing a matting pull takes.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { BIREFNET_CONFIGS } from '../../src/models/birefnet/config.ts';
import { inspectMattingFolder, resolveMattingModel } from '../../src/pipeline/matting-model.ts';
import { writeSafetensors } from '../../src/weights/safetensors.ts';
import { writeTinyMattingModel, TINY_MATTING_INPUT_SIZE } from '../../src/fixtures/tiny-model.ts';
import { DEFAULT_MATTING_REPO, MattingModelError, findMattingModel, isMattingListing, mattingFilesToPull, openMattingFolder } from '../../src/weights/matting-folder.ts';
import { tmpDir } from '../cli/helpers.ts';

let work: string;
const saved = { home: process.env.KLEIN_HOME, matting: process.env.KLEIN_MATTING_MODEL };

before(() => {
  work = tmpDir('matting-folder');
  process.env.KLEIN_HOME = path.join(work, 'home');
  delete process.env.KLEIN_MATTING_MODEL;
});

after(() => {
  for (const [k, v] of [['KLEIN_HOME', saved.home], ['KLEIN_MATTING_MODEL', saved.matting]] as const) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
});

test('the tiny matting folder opens with its files and input size from config.json; the model reads its geometry', () => {
  const dir = path.join(work, 'tiny-matting');
  writeTinyMattingModel(dir, 3);
  const folder = openMattingFolder(dir);
  assert.deepEqual(folder.files, [path.join(dir, 'model.safetensors')]);
  assert.equal(folder.bytes, fs.statSync(path.join(dir, 'model.safetensors')).size);
  assert.equal(folder.configuredInputSize, TINY_MATTING_INPUT_SIZE);
  const m = inspectMattingFolder(folder);
  assert.deepEqual(m.config, BIREFNET_CONFIGS.tiny);
  assert.equal(m.geometry, 'custom');
  assert.equal(m.inputSize, TINY_MATTING_INPUT_SIZE);
  // a bad klein_input_size is named, not ignored
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ klein_input_size: 100 }));
  assert.throws(() => openMattingFolder(dir), (e: unknown) => e instanceof MattingModelError && e.code === 'matting_model_invalid' && /klein_input_size must be a positive multiple of 32.*100/.test(e.message));
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ architectures: ['BiRefNet'] }));
  assert.equal(openMattingFolder(dir).configuredInputSize, undefined);
  assert.equal(inspectMattingFolder(openMattingFolder(dir)).inputSize, 1024, 'no klein_input_size: the published checkpoints take 1024²');
});

test('resolution order: option, then $KLEIN_MATTING_MODEL, then the model folder\'s matting/, then the pulled default', () => {
  const a = path.join(work, 'order', 'a');
  const b = path.join(work, 'order', 'b');
  const model = path.join(work, 'order', 'model');
  const cached = path.join(process.env.KLEIN_HOME!, 'models', DEFAULT_MATTING_REPO.replace('/', '--'));
  for (const [d, seed] of [[a, 1], [b, 2], [path.join(model, 'matting'), 3], [cached, 4]] as const) writeTinyMattingModel(d, seed);
  try {
    process.env.KLEIN_MATTING_MODEL = b;
    assert.deepEqual([findMattingModel({ explicit: a, modelRoot: model }).path, findMattingModel({ explicit: a, modelRoot: model }).source], [a, 'option']);
    assert.deepEqual([findMattingModel({ modelRoot: model }).path, findMattingModel({ modelRoot: model }).source], [b, 'env']);
    delete process.env.KLEIN_MATTING_MODEL;
    assert.deepEqual([findMattingModel({ modelRoot: model }).path, findMattingModel({ modelRoot: model }).source], [path.join(model, 'matting'), 'model folder']);
    assert.deepEqual([findMattingModel({ modelRoot: path.join(work, 'order', 'other') }).path, findMattingModel({}).source], [cached, 'cache']);
    // an interrupted pull (only a .part file) does not count as installed
    fs.renameSync(path.join(cached, 'model.safetensors'), path.join(cached, 'model.safetensors.part'));
    assert.throws(() => findMattingModel({}), (e: unknown) => e instanceof MattingModelError && e.code === 'matting_model_missing');
  } finally {
    delete process.env.KLEIN_MATTING_MODEL;
  }
});

test('no matting weights: the error names the pull command; a foreign folder says it holds no BiRefNet weights', () => {
  assert.throws(
    () => findMattingModel({ modelRoot: path.join(work, 'nowhere') }),
    (e: unknown) => e instanceof MattingModelError && e.code === 'matting_model_missing' && e.message.includes('`klein pull --matting`') && e.message.includes(DEFAULT_MATTING_REPO),
  );
  const foreign = path.join(work, 'foreign');
  writeSafetensors(path.join(foreign, 'model.safetensors'), { 'encoder.weight': { dtype: 'F32', shape: [2, 2], data: new Float32Array(4) } });
  assert.throws(() => findMattingModel({ explicit: foreign }), (e: unknown) => e instanceof MattingModelError && e.code === 'matting_model_invalid' && /does not hold BiRefNet matting weights/.test(e.message));
  // a BiRefNet-looking file whose other weights are missing: the model's own reading refuses it
  const partial = path.join(work, 'partial');
  writeSafetensors(path.join(partial, 'model.safetensors'), { 'bb.patch_embed.proj.weight': { dtype: 'F32', shape: [8, 3, 4, 4], data: new Float32Array(8 * 48) } });
  assert.ok(findMattingModel({ explicit: partial }));
  assert.throws(() => resolveMattingModel({ explicit: partial }), (e: unknown) => e instanceof MattingModelError && e.code === 'matting_model_invalid' && /does not hold BiRefNet matting weights.*expected a 4-stage Swin backbone/.test(e.message));
  assert.throws(() => findMattingModel({ explicit: path.join(work, 'missing') }), (e: unknown) => e instanceof MattingModelError && /no matting model at .*missing/.test(e.message));
});

test('a BiRefNet listing is recognised, and only its weights and config.json are pulled', () => {
  const listing = ['.gitattributes', 'BiRefNet_config.py', 'README.md', 'birefnet.py', 'config.json', 'handler.py', 'model.safetensors', 'pytorch_model.bin', 'requirements.txt', 'onnx/model.safetensors'];
  assert.equal(isMattingListing(listing), true);
  assert.deepEqual(mattingFilesToPull(listing), ['config.json', 'model.safetensors']);
  assert.equal(isMattingListing(['model_index.json', 'transformer/diffusion_pytorch_model.safetensors']), false);
  assert.equal(isMattingListing(['birefnet.py', 'pytorch_model.bin']), false, 'no safetensors weights: nothing klein can load');
});
