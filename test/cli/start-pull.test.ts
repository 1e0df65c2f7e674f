// `npm start` / `klein serve` on a machine without the model: it is pulled from the Hub (a fake one on 127.0.0.1
// serving a tiny model as black-forest-labs/FLUX.2-klein-4B), then served; a terminal is asked first; --no-pull and an
// unreachable Hub end with the usual "no model" message.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { DEFAULT_REPO } from '../../src/weights/model-folder.ts';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';
import { type FakeHub, servedFolder, startFakeHub } from './fake-hub.ts';
import { KLEIN, ROOT, runKlein, startServe, stopProcess, tmpDir } from './helpers.ts';

let hub: FakeHub;
const children: ChildProcess[] = [];

before(async () => {
  const src = tmpDir('start-hub-src');
  writeTinyModel(src, { seed: 8 });
  hub = await startFakeHub();
  hub.repos.set(DEFAULT_REPO, servedFolder(src));
});
after(async () => {
  for (const c of children) await stopProcess(c);
  await hub.close();
});

/** No model anywhere this process could find one: an empty $KLEIN_HOME, no $KLEIN_MODEL(_DIR), the fake Hub. */
function freshMachine(): Record<string, string | undefined> & { KLEIN_HOME: string } {
  return { KLEIN_HOME: tmpDir('start-home'), HF_ENDPOINT: hub.url, HF_TOKEN: undefined, KLEIN_MODEL: undefined, KLEIN_MODEL_DIR: undefined, KLEIN_PULL: undefined, KLEIN_MATTING_MODEL: undefined };
}

test('npm start with no model pulls klein 4B from the Hub (progress on stderr), then serves a run; the next start pulls nothing', { timeout: 300_000 }, async () => {
  const env = freshMachine();
  const data = tmpDir('start-data');
  hub.requests.length = 0;
  const s = await startServe(['--port', '0', '--data', data], { command: ['npm', 'start', '--'], env, track: children, timeoutMs: 240_000 });
  const model = path.join(env.KLEIN_HOME, 'models', 'black-forest-labs--FLUX.2-klein-4B');
  assert.match(s.out(), new RegExp(`pulling ${DEFAULT_REPO} from ${hub.url} into ${model.replace(/[.]/g, '\\.')}`));
  assert.match(s.out(), /klein: …mer\/diffusion_pytorch_model\.safetensors\n/); // the progress line of the largest file
  assert.ok(hub.requests.some((r) => r.path === 'transformer/diffusion_pytorch_model.safetensors'));
  assert.ok(fs.existsSync(path.join(model, 'model_index.json')));
  // the admin key of a first start follows the listening line, maybe in a later chunk
  for (const t0 = Date.now(); !/\nkl_live_\S+/.test(s.out()) && Date.now() - t0 < 10_000; ) await new Promise((r) => setTimeout(r, 50));
  const key = /\n(kl_live_\S+)/.exec(s.out())![1];
  const res = await fetch(`${s.url}/v1/models/flux-2-klein-4b/runs`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', prefer: 'wait=180' },
    body: JSON.stringify({ input: { prompt: 'a lighthouse', image_size: { width: 64, height: 64 }, num_inference_steps: 1, seed: 3 } }),
  });
  const run = (await res.json()) as { status_code: string; output: { images: Array<{ url: string }> } };
  assert.equal(run.status_code, 'succeeded', JSON.stringify(run));
  const png = Buffer.from(await (await fetch(run.output.images[0].url)).arrayBuffer());
  assert.equal((await sharp(png).metadata()).width, 64);
  await stopProcess(s.proc);
  assert.match(s.out(), /klein serve: stopping/);

  // the model is there now: a plain start downloads nothing (and --no-pull does not stand in its way)
  const before = hub.requests.length;
  const again = await startServe(['--port', '0', '--data', data, '--no-pull'], { env, track: children, timeoutMs: 120_000 });
  assert.doesNotMatch(again.out(), /pulling/);
  assert.equal(hub.requests.length, before);
  await stopProcess(again.proc);
});

test('on a terminal, klein serve asks before pulling; "n" ends with the usual message and downloads nothing', { timeout: 120_000 }, async () => {
  const env = freshMachine();
  hub.requests.length = 0;
  // util-linux `script` gives the command a pseudo-terminal, so its stdin is a TTY as in a person's shell
  const cmd = `${JSON.stringify(process.execPath)} ${JSON.stringify(KLEIN)} serve --port 0 --data ${JSON.stringify(tmpDir('start-tty'))}`;
  const child = execFile('script', ['-qec', cmd, '/dev/null'], { cwd: ROOT, env: { ...process.env, ...env } as NodeJS.ProcessEnv });
  child.stdin!.end('n\n');
  const { code, out } = await new Promise<{ code: number | null; out: string }>((resolve) => {
    let out = '';
    child.stdout!.on('data', (d) => (out += d));
    child.stderr!.on('data', (d) => (out += d));
    child.on('close', (c) => resolve({ code: c, out }));
  });
  assert.match(out, /the model black-forest-labs\/FLUX\.2-klein-4B is not on this machine/);
  assert.match(out, /Download it from http:\/\/127\.0\.0\.1:\d+ now \(resumable; about 16 GB\)\? \[Y\/n\]/);
  assert.match(out, /klein: no model at .*Get it with `klein pull black-forest-labs\/FLUX\.2-klein-4B`/);
  assert.equal(code, 2);
  assert.equal(hub.requests.length, 0);
});

test('--no-pull, KLEIN_PULL=0 and an unreachable Hub end with the usual "no model" message (exit 2); a bad KLEIN_PULL is refused', async () => {
  const env = freshMachine();
  const data = tmpDir('start-refuse');
  hub.requests.length = 0;
  for (const [args, extra] of [[['--no-pull'], {}], [[], { KLEIN_PULL: '0' }]] as const) {
    const r = await runKlein(['serve', '--port', '0', '--data', data, ...args], { ...env, ...extra });
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /^klein: no model at .*black-forest-labs--FLUX\.2-klein-4B\. Get it with `klein pull black-forest-labs\/FLUX\.2-klein-4B`/);
    assert.doesNotMatch(r.stderr, /pulling/);
  }
  assert.equal(hub.requests.length, 0);
  const offline = await runKlein(['serve', '--port', '0', '--data', data, '--pull'], { ...env, HF_ENDPOINT: 'http://127.0.0.1:1' });
  assert.equal(offline.code, 2, offline.stderr);
  assert.match(offline.stderr, /klein: no model at .*\nThe download did not succeed: cannot list black-forest-labs\/FLUX\.2-klein-4B@main on http:\/\/127\.0\.0\.1:1: fetch failed/);
  const bad = await runKlein(['serve', '--port', '0', '--data', data], { ...env, KLEIN_PULL: 'maybe' });
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /\$KLEIN_PULL must be 1 .* or 0 .*, got "maybe"/);
});
