// Stopping the scale-out parts the moment they start, on a real redis-server: BullMQ objects closed while their Redis
// connections are still starting must not throw an uncaught "Connection is closed" (src/service/scale/closable.ts),
// and a KleinWorker stopped so early must leave no timer behind that keeps the process alive (worker.ts,
// startedOrLate). `klein serve --queue
// --workers 1` stopped right after its start did both: exit 1, or 15 s to exit.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { Queue, Worker } from 'bullmq';
import { createLogger } from '../../src/service/logger.ts';
import { ScaleApi } from '../../src/service/scale/api.ts';
import { closableWhileStarting } from '../../src/service/scale/closable.ts';
import { QUEUE_NAME } from '../../src/service/scale/protocol.ts';
import { redisConnection } from '../../src/service/scale/redis.ts';
import { RemotePipeline } from '../../src/service/scale/remote-pipeline.ts';
import { KleinWorker } from '../../src/service/scale/worker.ts';
import { type Harness, realPipeline, startService } from '../service/helpers.ts';
import { startRedis } from './redis-helper.ts';

const TOKEN = 'close-while-starting-token-0123';
const log = createLogger('silent');
let redis: Awaited<ReturnType<typeof startRedis>>;
let engine: ImagePipeline & { modelDir: string };
let remote: RemotePipeline;
let h: Harness;
let modelId: string;

before(async () => {
  redis = await startRedis();
  engine = await realPipeline();
  modelId = (engine as unknown as { variant: { id: string } }).variant.id;
  remote = new RemotePipeline(redis.url, modelId, log);
  h = await startService({ pipeline: remote, config: { workers: 64 }, scale: new ScaleApi(remote, TOKEN) });
});

after(async () => {
  await h?.svc.close();
  await remote?.close();
  await engine?.close();
  redis?.stop();
});

/** Runs `fn` and returns every error that reached the process uncaught meanwhile (and shortly after). */
async function uncaughtDuring(fn: () => Promise<void>): Promise<unknown[]> {
  const seen: unknown[] = [];
  const record = (e: unknown) => seen.push(e);
  process.on('uncaughtException', record);
  process.on('unhandledRejection', record);
  try {
    await fn();
    // the cut-short start-ups fail when their sockets close, a moment after close() has returned
    await new Promise((r) => setTimeout(r, 300));
  } finally {
    process.off('uncaughtException', record);
    process.off('unhandledRejection', record);
  }
  return seen;
}

const timers = () => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;

test('closableWhileStarting: BullMQ Queues and Workers closed 0-4 ms after they are built (100 each): nothing uncaught', async () => {
  // unguarded, 15 of 100 bare Queues closed this way threw here (the INFO of their start-up cut short)
  const connection = redisConnection(redis.url);
  const seen = await uncaughtDuring(async () => {
    for (let i = 0; i < 100; i++) {
      const q = closableWhileStarting(new Queue(QUEUE_NAME + '-early', { connection }), log);
      // skipStalledCheck: a Worker closed while starting would leave its stalled-check timer running (see below)
      const w = closableWhileStarting(new Worker(QUEUE_NAME + '-early', async () => undefined, { connection, skipStalledCheck: true }), log);
      // errors before the close are the owner's to log
      q.on('error', () => undefined);
      w.on('error', () => undefined);
      await new Promise((res) => setTimeout(res, i % 5));
      await Promise.all([q.close(), w.close()]);
    }
  });
  assert.deepEqual(seen.map(String), []);
});

test('KleinWorker stopped right after start (10 times): nothing uncaught, and no timer left keeping the process alive', async () => {
  const before = timers();
  const seen = await uncaughtDuring(async () => {
    for (let i = 0; i < 10; i++) {
      const w = new KleinWorker({ queueUrl: redis.url, apiUrl: h.url, token: TOKEN, pipeline: engine, modelId, device: 'cpu', log, id: `w-early-${i}` });
      await w.start();
      await w.stop();
    }
  });
  assert.deepEqual(seen.map(String), []);
  // a BullMQ Worker closed while starting left its 15 s stalled-check timer running (one per worker)
  assert.equal(timers(), before, `timers before: ${before}, after: ${process.getActiveResourcesInfo().join(', ')}`);
});
