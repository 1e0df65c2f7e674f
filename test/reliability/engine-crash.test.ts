// The engine process killed mid-run (SIGKILL, as the kernel's OOM killer does) under a real service on 127.0.0.1:
// the run is retried once on a fresh engine and succeeds, a run killed twice fails ENGINE_CRASHED unbilled, the next
// run succeeds, and /v1/health answered 200 all along (polled every 50 ms, each request bounded to 10 s).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { EngineHost } from '../../src/service/engine-host.ts';
import { startServe, stopProcess } from '../cli/helpers.ts';
import { type Harness, pollUntil, realPipeline, startService, tempDir, terminal } from '../service/helpers.ts';
import { cpuTarget } from '../../src/runtime/target.ts';
import { mallocTunablesApply } from '../../src/runtime/malloc-env.ts';

const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';
// 50 steps at 256²: long enough on the tiny model to be caught between its first and last step
const long = { input: { prompt: 'a lighthouse', image_size: { width: 256, height: 256 }, num_inference_steps: 50 } };
const short = { input: { prompt: 'a harbour', image_size: { width: 64, height: 64 } } };
const midRun = (attempts: number) => (r: any) => (r.status_code === 'running' && r.attempts === attempts && r.progress?.stage === 'denoise' && r.progress.step >= 1) || terminal(r);

let host: EngineHost;
let h: Harness;
let modelDir: string;
const spawned: ChildProcess[] = [];

before(async () => {
  const tiny = await realPipeline();
  await tiny.close(); // only its folder: the service's engine runs in the host's child process
  modelDir = tiny.modelDir;
  host = await EngineHost.start({ target: cpuTarget(), model: modelDir, keepLoaded: true });
  h = await startService({ pipeline: host, engines: [host] });
});
after(async () => {
  await h?.svc.close();
  await host?.close();
  for (const p of spawned) if (p.exitCode === null) p.kill('SIGKILL');
});

/** A process's children (Linux /proc). */
const childrenOf = (pid: number) => fs.readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
const commandOf = (pid: number) => fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ');
const alive = (pid: number) => fs.existsSync(`/proc/${pid}`) && !/^State:\s+Z/m.test(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));

/** Polls /v1/health every 50 ms until stopped; every answer and failure is kept. */
function healthPoller(url: string) {
  const seen: { status: number | string; ms: number }[] = [];
  let stop = false;
  const done = (async () => {
    while (!stop) {
      const t0 = performance.now();
      try {
        const res = await fetch(`${url}/v1/health`, { signal: AbortSignal.timeout(10_000) });
        await res.arrayBuffer();
        seen.push({ status: res.status, ms: performance.now() - t0 });
      } catch (e) {
        seen.push({ status: (e as Error).name, ms: performance.now() - t0 });
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  return { seen, stop: async () => { stop = true; await done; } };
}

async function killMidRun(id: string, attempts: number): Promise<void> {
  const r = await pollUntil(h, id, midRun(attempts), 120_000);
  assert.equal(r.status_code, 'running', `run ended before attempt ${attempts} could be killed: ${JSON.stringify(r)}`);
  process.kill(host.pid!, 'SIGKILL');
}

test('engine killed mid-run: retried on a fresh engine; killed twice: ENGINE_CRASHED, unbilled; the API answered throughout', { timeout: 600_000 }, async () => {
  const health = healthPoller(h.url);
  try {
    // killed once: the attempt is lost, the run goes back to the queue and succeeds on the restarted engine
    const once = await h.api('POST', T2I, long);
    assert.equal(once.status, 201);
    await killMidRun(once.json.id, 1);
    const retried = await pollUntil(h, once.json.id, terminal, 300_000);
    assert.equal(retried.status_code, 'succeeded', JSON.stringify(retried));
    assert.equal(retried.attempts, 2);
    assert.equal(retried.output.images.length, 1);
    assert.ok(Number(retried.cost) > 0);

    // killed on both attempts: failed with the engine's code, not billed
    const twice = await h.api('POST', T2I, long);
    await killMidRun(twice.json.id, 1);
    await killMidRun(twice.json.id, 2);
    const failed = await pollUntil(h, twice.json.id, terminal, 300_000);
    assert.equal(failed.status_code, 'failed');
    assert.equal(failed.failure_code, 'ENGINE_CRASHED');
    assert.equal(failed.failure_stage, 'inference');
    assert.match(failed.failure_message, /engine process .* was killed \(SIGKILL.*attempt 2 of 2/);
    assert.equal(failed.cost, '0.000');

    // the next run is served by the third engine process
    const next = await h.api('POST', T2I, short);
    const ok = await pollUntil(h, next.json.id, terminal, 300_000);
    assert.equal(ok.status_code, 'succeeded', JSON.stringify(ok));
    assert.equal(ok.attempts, 1);
    assert.equal(host.crashes, 3);
  } finally {
    await health.stop();
  }
  const failures = health.seen.filter((s) => s.status !== 200);
  assert.deepEqual(failures, [], 'every health check answered 200');
  assert.ok(health.seen.length >= 20, `only ${health.seen.length} health checks ran`);

  const admin = h.newKey({ admin: true });
  const metrics = await (await fetch(`${h.url}/metrics`, { headers: { authorization: `Bearer ${admin}` } })).text();
  const value = (line: string) => Number(metrics.match(new RegExp(`^${line.replace(/[{}"]/g, (c) => `\\${c}`)} (\\S+)$`, 'm'))?.[1]);
  assert.equal(value('klein_engine_crashes_total'), 3);
  assert.equal(value('klein_engine_starts_total'), 4);
  assert.equal(value('klein_engine_generation_seconds_count{outcome="lost"}'), 3);
  assert.equal(value('klein_engine_generation_seconds_count{outcome="succeeded"}'), 2);
});

test('klein serve generates in an engine child process by default: killed mid-run, the run is retried and the server stays up; SIGTERM stops both', { timeout: 300_000 }, async () => {
  const data = tempDir('klein-engine-serve-');
  const serve = await startServe(['--model', modelDir, '--data', data, '--port', '0'], { track: spawned });
  const key = serve.lines.at(-1)!;
  const engines = childrenOf(serve.proc.pid!).filter((p) => /engine-child\.ts/.test(commandOf(p)));
  assert.equal(engines.length, 1, `one engine child of klein serve: ${childrenOf(serve.proc.pid!).map(commandOf).join('; ')}`);
  const api = async (method: string, p: string, body?: unknown) => {
    const res = await fetch(serve.url + p, { method, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, ...(body ? { body: JSON.stringify(body) } : {}) });
    return { status: res.status, json: (await res.json()) as any };
  };
  const run = await api('POST', T2I, long);
  assert.equal(run.status, 201, JSON.stringify(run.json));
  const poll = async (pred: (r: any) => boolean) => {
    for (const t0 = Date.now(); Date.now() - t0 < 240_000; await new Promise((r) => setTimeout(r, 25))) {
      const r = (await api('GET', `/v1/runs/${run.json.id}`)).json;
      if (pred(r)) return r;
    }
    throw new Error('timed out');
  };
  await poll(midRun(1));
  // the engine process runs with glibc's malloc tunables (runtime/malloc-env.ts) wherever they apply (glibc splits
  // the variable at its colons in the process's original environment block when it parses it)
  if (mallocTunablesApply()) assert.match(fs.readFileSync(`/proc/${engines[0]}/environ`, 'utf8'), /(^|\0)GLIBC_TUNABLES=glibc\.malloc\.hugetlb=1[:\0]glibc\.malloc\.mmap_threshold=1048576(\0|$)/);
  process.kill(engines[0], 'SIGKILL');
  const done = await poll(terminal);
  assert.equal(done.status_code, 'succeeded', JSON.stringify(done));
  assert.equal(done.attempts, 2);
  const fresh = childrenOf(serve.proc.pid!).filter((p) => /engine-child\.ts/.test(commandOf(p)));
  assert.equal(fresh.length, 1);
  assert.notEqual(fresh[0], engines[0]);
  assert.equal(await stopProcess(serve.proc), 0);
  for (const t0 = Date.now(); alive(fresh[0]) && Date.now() - t0 < 15_000; ) await new Promise((r) => setTimeout(r, 50));
  assert.ok(!alive(fresh[0]), 'the engine process exits with klein serve');
});
