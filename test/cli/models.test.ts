// Model-folder detection and validation, through `klein models` and the module itself.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { writeSafetensors } from '../../src/weights/safetensors.ts';
import { ModelFolderError, filesToPull, openModelFolder, resolveModelPath } from '../../src/weights/model-folder.ts';
import { runKlein, tmpDir } from './helpers.ts';

function st(file: string, n = 4): void {
  writeSafetensors(file, { w: { dtype: 'F32', shape: [n], data: new Float32Array(n) } });
}
function json(file: string, v: unknown): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, JSON.stringify(v));
}

/** A folder with the HF layout's files (placeholder weights: detection reads headers only). */
function hfFolder(dir: string, opts: { distilled?: boolean; ctxDim?: number; skip?: string[] } = {}): string {
  const skip = new Set(opts.skip ?? []);
  json(path.join(dir, 'model_index.json'), { _class_name: 'Flux2KleinPipeline', is_distilled: opts.distilled ?? true });
  if (!skip.has('transformer')) {
    json(path.join(dir, 'transformer', 'config.json'), { joint_attention_dim: opts.ctxDim ?? 7680 });
    st(path.join(dir, 'transformer', 'diffusion_pytorch_model.safetensors'));
  }
  if (!skip.has('vae')) {
    json(path.join(dir, 'vae', 'config.json'), {});
    st(path.join(dir, 'vae', 'diffusion_pytorch_model.safetensors'));
  }
  json(path.join(dir, 'text_encoder', 'config.json'), {});
  fs.mkdirSync(path.join(dir, 'text_encoder'), { recursive: true });
  st(path.join(dir, 'text_encoder', 'model-00001-of-00002.safetensors'));
  st(path.join(dir, 'text_encoder', 'model-00002-of-00002.safetensors'));
  json(path.join(dir, 'text_encoder', 'model.safetensors.index.json'), { weight_map: { a: 'model-00001-of-00002.safetensors', b: 'model-00002-of-00002.safetensors' } });
  if (!skip.has('tokenizer')) {
    json(path.join(dir, 'tokenizer', 'tokenizer.json'), {});
    json(path.join(dir, 'tokenizer', 'tokenizer_config.json'), {});
  }
  json(path.join(dir, 'scheduler', 'scheduler_config.json'), {});
  return dir;
}

test('the HF layout is detected with its variant from model_index.json and the transformer config', () => {
  const m = openModelFolder(hfFolder(tmpDir('hf')));
  assert.equal(m.layout, 'diffusers');
  assert.equal(m.variant.id, 'klein-4b');
  assert.equal(m.variant.defaultSteps, 4);
  assert.equal(m.textEncoder.files.length, 2);
  assert.ok(m.tokenizer.endsWith('tokenizer'));
  const base9 = openModelFolder(hfFolder(tmpDir('hf9'), { distilled: false, ctxDim: 12288 }));
  assert.equal(base9.variant.id, 'klein-base-9b');
  assert.equal(base9.variant.defaultSteps, 50);
  assert.equal(base9.variant.defaultGuidance, 4);
  assert.equal(openModelFolder(base9.root, { variant: 'klein-4b' }).variant.id, 'klein-4b');
});

test('the BFL single-file layout is detected from the checkpoint name', () => {
  const dir = tmpDir('bfl');
  st(path.join(dir, 'flux-2-klein-base-4b.safetensors'));
  st(path.join(dir, 'ae.safetensors'));
  json(path.join(dir, 'text_encoder', 'config.json'), {});
  st(path.join(dir, 'text_encoder', 'model.safetensors'));
  json(path.join(dir, 'text_encoder', 'tokenizer.json'), {});
  json(path.join(dir, 'text_encoder', 'tokenizer_config.json'), {});
  const m = openModelFolder(dir);
  assert.equal(m.layout, 'bfl');
  assert.equal(m.variant.id, 'klein-base-4b');
  assert.equal(m.transformer.format, 'bfl');
  assert.equal(m.tokenizer, path.join(dir, 'text_encoder'));
});

test('an incomplete folder gives one message listing everything missing or broken and how to get it', async () => {
  const dir = hfFolder(tmpDir('incomplete'), { skip: ['vae', 'tokenizer'] });
  // a truncated download: the header promises more bytes than the file has
  const t = path.join(dir, 'transformer', 'diffusion_pytorch_model.safetensors');
  fs.truncateSync(t, fs.statSync(t).size - 4);
  fs.writeFileSync(path.join(dir, 'transformer', 'x.part'), '');
  let err: unknown;
  try {
    openModelFolder(dir);
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof ModelFolderError);
  assert.equal(err.code, 'model_incomplete');
  assert.match(err.message, /missing: vae\/ \(diffusion_pytorch_model\.safetensors\)/);
  assert.match(err.message, /missing: tokenizer\/tokenizer\.json/);
  assert.match(err.message, /broken: {2}transformer\/diffusion_pytorch_model\.safetensors: .*truncated/);
  assert.match(err.message, /klein pull black-forest-labs\/FLUX\.2-klein-4B/);
  assert.equal(err.missing.length, 5); // vae weights and config, tokenizer.json and its config, the broken transformer

  const r = await runKlein(['models', dir]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /is incomplete:\n {2}missing: vae/);
});

test('klein models lists the cache ($KLEIN_HOME/models/<owner>--<name>) with variant and health', async () => {
  const home = tmpDir('home');
  hfFolder(path.join(home, 'models', 'black-forest-labs--FLUX.2-klein-4B'));
  hfFolder(path.join(home, 'models', 'acme--broken'), { skip: ['vae'] });
  const r = await runKlein(['models', '--json'], { KLEIN_HOME: home });
  assert.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { models: Array<{ name: string; ok: boolean; variant?: string; problem?: string }> };
  const byName = new Map(out.models.map((m) => [m.name, m]));
  assert.equal(byName.get('black-forest-labs/FLUX.2-klein-4B')?.variant, 'klein-4b');
  assert.equal(byName.get('acme/broken')?.ok, false);
  assert.match(byName.get('acme/broken')?.problem ?? '', /klein pull acme\/broken/);
  const text = await runKlein(['models'], { KLEIN_HOME: tmpDir('empty-home') });
  assert.equal(text.code, 0);
  assert.match(text.stdout, /no models in .*klein pull/);
});

test('a model name that is not installed points at klein pull; a non-model folder says what a model folder is', () => {
  process.env.KLEIN_HOME = tmpDir('home2');
  try {
    const p = resolveModelPath('acme/thing');
    assert.equal(p, path.join(process.env.KLEIN_HOME, 'models', 'acme--thing'));
    assert.throws(() => openModelFolder(p), (e: unknown) => e instanceof ModelFolderError && e.code === 'model_not_found' && /klein pull acme\/thing/.test(e.message));
  } finally {
    delete process.env.KLEIN_HOME;
  }
  const other = tmpDir('other');
  fs.writeFileSync(path.join(other, 'notes.txt'), 'hi');
  assert.throws(() => openModelFolder(other), /not a FLUX\.2 \[klein\] model folder: expected model_index\.json/);
  assert.throws(() => resolveModelPath('no such thing'), /neither a folder nor a Hub repository id/);
});

test('filesToPull takes the HF folders and model_index.json, never the duplicate BFL checkpoint or extras', () => {
  const listing = [
    'model_index.json', 'README.md', 'flux-2-klein-4b.safetensors', 'teaser.png',
    'transformer/config.json', 'transformer/diffusion_pytorch_model.safetensors',
    'vae/config.json', 'vae/diffusion_pytorch_model.safetensors',
    'text_encoder/config.json', 'text_encoder/model-00001-of-00002.safetensors', 'text_encoder/model.safetensors.index.json',
    'tokenizer/tokenizer.json', 'tokenizer/vocab.json', 'tokenizer/merges.txt', 'scheduler/scheduler_config.json', 'assets/x.safetensors',
  ];
  assert.deepEqual(filesToPull(listing), listing.filter((p) => !['README.md', 'flux-2-klein-4b.safetensors', 'teaser.png', 'assets/x.safetensors'].includes(p)));
  assert.deepEqual(filesToPull(['flux-2-klein-4b.safetensors', 'ae.safetensors', 'README.md', 'text_encoder/config.json', 'text_encoder/model.safetensors']), ['flux-2-klein-4b.safetensors', 'ae.safetensors', 'text_encoder/config.json', 'text_encoder/model.safetensors']);
});
