// `klein pull` against a fake Hub on 127.0.0.1 (fake-hub.ts: the tree listing and `resolve` with HTTP Range).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { writeSafetensors } from '../../src/weights/safetensors.ts';
import { DEFAULT_MATTING_REPO } from '../../src/weights/matting-folder.ts';
import { writeTinyMattingModel, writeTinyModel } from '../../src/fixtures/tiny-model.ts';
import { type FakeHub, type Served, servedFolder, startFakeHub } from './fake-hub.ts';
import { runKlein, tmpDir } from './helpers.ts';

const REPO = 'acme/klein-tiny';
const TOKEN = 'hf_test_token';

const files = new Map<string, Served>();
let hub: FakeHub;
let hubUrl: string;

before(async () => {
  const st = tmpDir('hub-src');
  writeSafetensors(path.join(st, 'w.safetensors'), { w: { dtype: 'F32', shape: [256, 300], data: Float32Array.from({ length: 256 * 300 }, (_, i) => Math.sin(i)) } });
  files.set('model_index.json', { body: Buffer.from(JSON.stringify({ _class_name: 'Flux2KleinPipeline', is_distilled: true })), lfs: false });
  files.set('transformer/config.json', { body: Buffer.from('{"joint_attention_dim": 96}'), lfs: false });
  files.set('transformer/diffusion_pytorch_model.safetensors', { body: fs.readFileSync(path.join(st, 'w.safetensors')), lfs: true });
  files.set('tokenizer/tokenizer_config.json', { body: Buffer.from('{}'), lfs: false });
  files.set('README.md', { body: Buffer.from('# not needed'), lfs: false });
  files.set('flux-2-klein-4b.safetensors', { body: Buffer.alloc(5000, 7), lfs: true });
  hub = await startFakeHub({ token: TOKEN });
  hub.repos.set(REPO, files);
  hubUrl = hub.url;
});

after(() => hub.close());

const BIG = 'transformer/diffusion_pytorch_model.safetensors';
const env = { HF_TOKEN: TOKEN, HF_ENDPOINT: undefined };

test('klein pull downloads only the model files, verifies them, and resumes a connection cut mid-file by itself', async () => {
  const dest = tmpDir('pull');
  hub.requests.length = 0;
  hub.cutOnce.set(BIG, 100_000);
  const r = await runKlein(['pull', REPO, '--hub-url', hubUrl, '--dir', dest, '--json'], env);
  assert.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { files: Array<{ path: string; status: string }>; dir: string };
  assert.deepEqual(out.files.map((f) => f.path).sort(), ['model_index.json', 'tokenizer/tokenizer_config.json', 'transformer/config.json', BIG]);
  assert.equal(out.files.find((f) => f.path === BIG)?.status, 'resumed');
  for (const [p, f] of files) {
    const target = path.join(dest, p);
    if (p === 'README.md' || p.startsWith('flux-2')) assert.equal(fs.existsSync(target), false, `${p} should not be pulled`);
    else assert.ok(fs.readFileSync(target).equals(f.body), `${p} content`);
  }
  assert.equal(fs.existsSync(path.join(dest, `${BIG}.part`)), false);
  const big = hub.requests.filter((q) => q.path === BIG);
  assert.equal(big.length, 2);
  assert.equal(big[0].range, undefined);
  // the retry continues from what reached the .part file (the client may drop bytes still buffered when the
  // connection failed): never from 0, never past what the server sent
  const from = Number(/^bytes=(\d+)-$/.exec(big[1].range ?? '')?.[1]);
  assert.ok(from > 0 && from <= 100_000, `resumed from ${big[1].range}`);
  assert.ok(hub.requests.every((q) => q.auth === `Bearer ${TOKEN}`));
  // the incomplete folder is reported, not hidden
  assert.match(r.stdout, /"problem":".*incomplete/);

  // a second pull finds everything verified and downloads nothing
  hub.requests.length = 0;
  const again = await runKlein(['pull', REPO, '--hub-url', hubUrl, '--dir', dest, '--json'], env);
  assert.equal(again.code, 0, again.stderr);
  assert.ok((JSON.parse(again.stdout) as { files: Array<{ status: string }> }).files.every((f) => f.status === 'present'));
  assert.equal(hub.requests.length, 0);
});

test('an interrupted klein pull leaves a .part file and the next run continues from it with a Range request', async () => {
  const dest = tmpDir('pull-resume');
  hub.cutAlways.set(BIG, 150_000);
  const first = await runKlein(['pull', REPO, '--hub-url', hubUrl, '--dir', dest, '--retries', '0'], env);
  hub.cutAlways.delete(BIG);
  assert.equal(first.code, 1, first.stderr);
  assert.match(first.stderr, /partial download is kept/);
  assert.equal(fs.statSync(path.join(dest, `${BIG}.part`)).size, 150_000);
  assert.equal(fs.existsSync(path.join(dest, BIG)), false);

  hub.requests.length = 0;
  const second = await runKlein(['pull', REPO, '--hub-url', hubUrl, '--dir', dest], env);
  assert.equal(second.code, 0, second.stderr);
  assert.match(second.stderr, /resuming transformer\/diffusion_pytorch_model\.safetensors at 146\.5 KiB/);
  const big = hub.requests.filter((q) => q.path === BIG);
  assert.deepEqual(big.map((q) => q.range), ['bytes=150000-']);
  assert.ok(fs.readFileSync(path.join(dest, BIG)).equals(files.get(BIG)!.body));
});

test('a corrupted download fails the sha256 check, exits 1 and keeps nothing', async () => {
  const dest = tmpDir('pull-bad');
  const bad = Buffer.from(files.get(BIG)!.body);
  bad[bad.length - 1] ^= 0xff;
  hub.corrupt.set(BIG, bad);
  const r = await runKlein(['pull', REPO, '--hub-url', hubUrl, '--dir', dest], env);
  hub.corrupt.delete(BIG);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /checksum mismatch \(sha256 [0-9a-f]{64} ≠ listed [0-9a-f]{64}\)/);
  assert.equal(fs.existsSync(path.join(dest, BIG)), false);
  assert.equal(fs.existsSync(path.join(dest, `${BIG}.part`)), false);
});

test('klein pull: a missing token, an unknown revision and a bad repo id are errors the user can fix (exit 2)', async () => {
  const dest = tmpDir('pull-err');
  const noToken = await runKlein(['pull', REPO, '--hub-url', hubUrl, '--dir', dest], { HF_TOKEN: '' });
  assert.equal(noToken.code, 2);
  assert.match(noToken.stderr, /gated or private.*HF_TOKEN/);
  const rev = await runKlein(['pull', REPO, '--hub-url', hubUrl, '--dir', dest, '--revision', 'nope'], env);
  assert.equal(rev.code, 2);
  assert.match(rev.stderr, /no such repository or revision/);
  const bad = await runKlein(['pull', 'not a repo', '--hub-url', hubUrl], env);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /not a Hub repository id/);
  const url = await runKlein(['pull', REPO, '--hub-url', 'ftp://x'], env);
  assert.equal(url.code, 2);
  assert.match(url.stderr, /--hub-url must be an http/);
});

test('a tiny model pulled into the cache ($KLEIN_HOME) is listed by klein models and generates by its repo id', async () => {
  // serve a real tiny model in the HF layout, the way the Hub serves black-forest-labs/FLUX.2-klein-4B
  const src = tmpDir('hub-tiny');
  writeTinyModel(src, { seed: 4 });
  const served = servedFolder(src);
  served.set('README.md', { body: Buffer.from('# tiny'), lfs: false });
  hub.repos.set('acme/klein-tiny-real', served);
  const home = tmpDir('pull-home');
  const r = await runKlein(['pull', 'acme/klein-tiny-real', '--hub-url', hubUrl, '--json', '-q'], { ...env, KLEIN_HOME: home });
  assert.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { dir: string; variant: string; problem?: string };
  assert.equal(out.dir, path.join(home, 'models', 'acme--klein-tiny-real'));
  assert.equal(out.variant, 'klein-4b');
  assert.equal(out.problem, undefined);
  const models = await runKlein(['models', '--json'], { KLEIN_HOME: home });
  const list = (JSON.parse(models.stdout) as { models: Array<{ name: string; ok: boolean; variant: string }> }).models;
  assert.deepEqual(list.map((m) => [m.name, m.ok, m.variant]), [['acme/klein-tiny-real', true, 'klein-4b']]);
  const png = path.join(home, 'fox.png');
  const g = await runKlein(['generate', 'a fox', '-m', 'acme/klein-tiny-real', '--size', '64x64', '--seed', '1', '-o', png, '-q'], { KLEIN_HOME: home });
  assert.equal(g.code, 0, g.stderr);
  assert.equal((await sharp(png).metadata()).width, 64);
  // a repo id that was never pulled says how to get it
  const missing = await runKlein(['generate', 'a fox', '-m', 'acme/other', '-o', png, '-q'], { KLEIN_HOME: home });
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /no model at .*acme--other.*klein pull acme\/other/);
});

test('klein pull --matting fetches only the BiRefNet weights and config into the cache; a BiRefNet repo is recognised without the flag', async () => {
  // served the way the Hub serves ZhengPeng7/BiRefNet-matting: weights, config.json and the reference's python files
  const src = tmpDir('hub-matting');
  writeTinyMattingModel(src, 6);
  const served = new Map<string, Served>([
    ['model.safetensors', { body: fs.readFileSync(path.join(src, 'model.safetensors')), lfs: true }],
    ['config.json', { body: fs.readFileSync(path.join(src, 'config.json')), lfs: false }],
    ['birefnet.py', { body: Buffer.from('# the reference model code'), lfs: false }],
    ['BiRefNet_config.py', { body: Buffer.from('# config class'), lfs: false }],
    ['handler.py', { body: Buffer.from('# endpoint handler'), lfs: false }],
    ['README.md', { body: Buffer.from('# BiRefNet-matting'), lfs: false }],
  ]);
  hub.repos.set(DEFAULT_MATTING_REPO, served);
  const home = tmpDir('pull-matting-home');
  const r = await runKlein(['pull', '--matting', '--hub-url', hubUrl, '--json', '-q'], { ...env, KLEIN_HOME: home });
  assert.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { repo: string; kind: string; dir: string; matting?: { geometry: string; input_size: number }; problem?: string; files: Array<{ path: string; status: string }> };
  assert.equal(out.repo, DEFAULT_MATTING_REPO);
  assert.equal(out.kind, 'matting');
  assert.equal(out.dir, path.join(home, 'models', 'ZhengPeng7--BiRefNet-matting'));
  assert.deepEqual(out.files.map((f) => f.path).sort(), ['config.json', 'model.safetensors']);
  assert.deepEqual(out.matting, { geometry: 'custom', input_size: 64 });
  assert.equal(out.problem, undefined);
  assert.ok(fs.readFileSync(path.join(out.dir, 'model.safetensors')).equals(served.get('model.safetensors')!.body));
  assert.ok(!fs.existsSync(path.join(out.dir, 'birefnet.py')), 'no python code is pulled');
  // klein models lists it as the matting model
  const models = await runKlein(['models', '--json'], { KLEIN_HOME: home });
  assert.equal(models.code, 0, models.stderr);
  const list = (JSON.parse(models.stdout) as { models: Array<{ name: string; ok: boolean; kind: string; geometry: string }> }).models;
  assert.deepEqual(list.map((m) => [m.name, m.ok, m.kind, m.geometry]), [[DEFAULT_MATTING_REPO, true, 'matting', 'custom']]);
  const text = await runKlein(['models'], { KLEIN_HOME: home });
  assert.match(text.stdout, /ZhengPeng7\/BiRefNet-matting {2}matting model \(BiRefNet custom, 64² input\) for --background transparent/);
  // and `klein models FOLDER` checks a matting folder too
  const one = await runKlein(['models', out.dir, '--json']);
  assert.equal(one.code, 0, one.stderr);
  assert.deepEqual((JSON.parse(one.stdout) as { models: Array<{ kind: string; input_size: number }> }).models.map((m) => [m.kind, m.input_size]), [['matting', 64]]);
  // named by its repo id without --matting: recognised from the listing; already complete, nothing downloaded
  const again = await runKlein(['pull', DEFAULT_MATTING_REPO, '--hub-url', hubUrl], { ...env, KLEIN_HOME: home });
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stdout, /2 files .* 0 downloaded, 2 already present/);
  assert.match(again.stdout, /matting model: BiRefNet \(custom geometry, 64² input\) for --background transparent/);
  // --matting on a klein repository is refused before anything is downloaded
  const wrong = await runKlein(['pull', '--matting', REPO, '--hub-url', hubUrl, '--dir', tmpDir('pull-wrong')], env);
  assert.equal(wrong.code, 2, wrong.stderr);
  assert.match(wrong.stderr, /acme\/klein-tiny is a FLUX.2 \[klein\] model, not matting weights; pull it without --matting/);
});
