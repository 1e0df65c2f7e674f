// `klein serve --queue` whose Redis is unreachable must still stop: BullMQ waits for Redis forever (commands queue up
// while ioredis reconnects; QueueEvents.close() never resolves), and before serve's stop watchdog (src/cli/serve.ts)
// SIGTERM left the process running for good. Now it exits after the drain time plus a grace, saying why.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import { realPipeline, tempDir } from '../service/helpers.ts';
import { startServe } from '../cli/helpers.ts';

const started: ChildProcess[] = [];
after(() => {
  for (const p of started) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
});

/** A loopback port nothing listens on (bound, then closed). */
async function closedPort(): Promise<number> {
  const srv = net.createServer().listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise((r) => srv.close(r));
  return port;
}

test('klein serve --queue with Redis unreachable stops on SIGTERM within the drain time plus its grace, saying why', async () => {
  const engine = await realPipeline(); // makes (or reuses) the tiny model folder
  const modelDir = engine.modelDir;
  await engine.close();
  const queue = `redis://127.0.0.1:${await closedPort()}`;
  const s = await startServe(['--model', modelDir, '--data', tempDir('klein-redis-down-'), '--port', '0', '--queue', queue, '--workers', '0'], {
    env: { KLEIN_WORKER_TOKEN: 'redis-down-test-token-0123456789' },
    track: started,
  });
  const t0 = performance.now();
  const exited = once(s.proc, 'exit');
  s.proc.kill('SIGTERM');
  // drain 20 s + grace 10 s, and some slack for a loaded machine; without the watchdog it never exits
  const timeout = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 60_000).unref());
  const r = await Promise.race([exited, timeout]);
  assert.notEqual(r, 'timeout', `still running 60 s after SIGTERM: ${s.out().slice(-1000)}`);
  const [code] = r as [number | null];
  const seconds = (performance.now() - t0) / 1000;
  assert.equal(code, 1, s.out().slice(-1000));
  assert.match(s.out(), /the stop did not finish in 30 s \(is Redis at redis:\/\/127\.0\.0\.1:\d+ reachable\?\); exiting, unfinished runs are recovered at the next start/);
  assert.ok(seconds < 45, `stopped after ${seconds.toFixed(1)} s`);
});
