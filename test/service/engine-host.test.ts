// The engine host (src/service/engine-host.ts): the real KleinPipeline on the tiny model in a child process, driven
// over IPC. Its images must be the in-process pipeline's byte for byte, its progress the same events, cancellation
// must stop it between steps without losing the process, and a killed engine must fail only its own generation.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import type { GenerateRequest, ImagePipeline, ProgressEvent } from '../../src/pipeline/types.ts';
import { PipelineInputError } from '../../src/pipeline/request.ts';
import { ENGINE_CRASHED, EngineCrashed, EngineHost } from '../../src/service/engine-host.ts';
import { AttemptLost } from '../../src/service/queue.ts';
import { ModelFolderError } from '../../src/weights/model-folder.ts';
import { realPipeline, tempDir } from './helpers.ts';
import { cpuTarget } from '../../src/runtime/target.ts';

const req = (o: Partial<GenerateRequest> = {}): GenerateRequest => ({ prompt: 'a red fox in the snow', width: 128, height: 96, seed: 7, numImages: 2, outputFormat: 'png', ...o });

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

async function gone(pid: number, ms = 10_000): Promise<boolean> {
  for (const t0 = Date.now(); Date.now() - t0 < ms; await new Promise((r) => setTimeout(r, 50))) if (!alive(pid)) return true;
  return false;
}

describe('engine host: the pipeline in a child process', () => {
  let local: ImagePipeline & { modelDir: string };
  let host: EngineHost;

  before(async () => {
    local = await realPipeline();
    host = await EngineHost.start({ target: cpuTarget(), model: local.modelDir, keepLoaded: true });
  });
  after(async () => {
    await host?.close();
    await local?.close();
  });

  test('images and progress are the in-process pipeline\'s, byte for byte; the model info comes back', async () => {
    assert.equal(host.info.variant.id, 'klein-4b');
    assert.equal(host.info.modelRoot, path.resolve(local.modelDir));
    assert.equal(host.info.precision, 'exact');
    const seen: { local: ProgressEvent[]; host: ProgressEvent[] } = { local: [], host: [] };
    const a = await local.generate(req(), { onProgress: (e) => seen.local.push(e) });
    const b = await host.generate(req(), { onProgress: (e) => seen.host.push(e) });
    assert.equal(b.images.length, 2);
    for (const [i, img] of b.images.entries()) {
      assert.ok(img.data instanceof Uint8Array);
      assert.deepEqual(Buffer.from(img.data), Buffer.from(a.images[i].data), `image ${i} differs from the in-process one`);
      const meta = await sharp(img.data).metadata();
      assert.deepEqual([meta.format, meta.width, meta.height], ['png', 128, 96]);
    }
    assert.equal(b.seed, 7);
    // the images came through files of the host's hand-over folder, read and removed
    assert.deepEqual(fs.readdirSync(host.handoverDir), []);
    assert.ok(b.timings.denoise > 0 && b.timings.total >= b.timings.denoise);
    // both were cold (first use loads each component; load events are left out): same stages, same steps
    const stages = (es: ProgressEvent[]) => es.filter((e) => e.stage !== 'load').map((e) => `${e.stage}:${e.step ?? ''}/${e.total ?? ''}`);
    assert.deepEqual(stages(seen.host), stages(seen.local));
    assert.deepEqual(seen.host.filter((e) => e.stage === 'denoise').map((e) => e.step), [0, 1, 2, 3, 4]);
  });

  test('the engine\'s input errors come back as PipelineInputError with their code and field', async () => {
    const e = await host.generate(req({ width: 100 })).then(() => null, (x: unknown) => x);
    assert.ok(e instanceof PipelineInputError, String(e));
    assert.equal(e.code, 'invalid_size');
    assert.match(e.message, /100/);
  });

  test('cancel between steps: rejects with the caller\'s reason; the same engine process runs the next request', async () => {
    const pid = host.pid!;
    const ac = new AbortController();
    const reason = new Error('cancelled by the test');
    const steps: number[] = [];
    const e = await host.generate(req({ width: 256, height: 256, steps: 50, numImages: 1 }), {
      signal: ac.signal,
      onProgress: (p) => {
        if (p.stage !== 'denoise' || p.step === undefined) return;
        steps.push(p.step);
        if (p.step === 2) ac.abort(reason);
      },
    }).then(() => null, (x: unknown) => x);
    assert.equal(e, reason);
    assert.ok(steps.at(-1)! < 50, `stopped at step ${steps.at(-1)} of 50`);
    assert.equal(host.pid, pid);
    assert.equal(host.crashes, 0);
    // a signal aborted before the call never reaches the engine
    const pre = new AbortController();
    pre.abort(reason);
    await assert.rejects(host.generate(req(), { signal: pre.signal }), (x) => x === reason);
    const next = await host.generate(req({ numImages: 1 }));
    assert.equal(next.images.length, 1);
  });

  test('one generation at a time, as the in-process pipeline', async () => {
    const first = host.generate(req({ numImages: 1 }));
    await assert.rejects(host.generate(req({ numImages: 1 })), /already generating/);
    assert.equal((await first).images.length, 1);
  });

  test('a killed engine fails its generation with EngineCrashed; a fresh process takes the next one', async () => {
    const pid = host.pid!;
    const starts = host.starts;
    const e = await host.generate(req({ width: 256, height: 256, steps: 50, numImages: 1 }), {
      onProgress: (p) => {
        if (p.stage === 'denoise' && p.step === 1) process.kill(pid, 'SIGKILL');
      },
    }).then(() => null, (x: unknown) => x);
    assert.ok(e instanceof EngineCrashed, String(e));
    assert.ok(e instanceof AttemptLost, 'the run queue treats it as a lost attempt (retried once)');
    assert.equal(e.code, ENGINE_CRASHED);
    assert.match(e.message, new RegExp(`pid ${pid}.*SIGKILL`));
    assert.equal(host.crashes, 1);
    assert.deepEqual(fs.readdirSync(host.handoverDir), []);
    const next = await host.generate(req({ numImages: 1 }));
    assert.equal(next.images.length, 1);
    assert.notEqual(host.pid, pid);
    assert.equal(host.starts, starts + 1);
  });

  test('close lets the engine process exit; a closed host refuses work', async () => {
    const other = await EngineHost.start({ target: cpuTarget(), model: local.modelDir });
    const pid = other.pid!;
    assert.ok(alive(pid));
    assert.ok(fs.statSync(other.handoverDir).isDirectory());
    await other.close();
    assert.ok(await gone(pid), `engine ${pid} still runs after close`);
    assert.equal(fs.existsSync(other.handoverDir), false, 'the hand-over folder outlived its host');
    await assert.rejects(other.generate(req()), /closed/);
  });
});

test('a folder that is no model fails the start with ModelFolderError, and no engine process stays behind', async () => {
  const dir = tempDir('klein-nomodel-');
  fs.writeFileSync(path.join(dir, 'README.md'), 'not a model');
  const before = new Set(childPids());
  const e = await EngineHost.start({ target: cpuTarget(), model: dir }).then(() => null, (x: unknown) => x);
  assert.ok(e instanceof ModelFolderError, String(e));
  for (const pid of childPids().filter((p) => !before.has(p))) assert.ok(await gone(pid), `engine ${pid} was left running`);
});

/** This process's children (Linux /proc). */
function childPids(): number[] {
  try {
    return fs.readFileSync(`/proc/${process.pid}/task/${process.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}
