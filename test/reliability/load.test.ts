// Bounded load over loopback (the figures for docs/reliability.md come from `klein bench load`): 200 concurrent
// clients creating and polling runs on the tiny model. No 5xx, no failed connections, 429 only once the key's
// creation budget is spent, and the server's memory does not climb with the requests.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runLoad } from '../../bench/load.ts';
import { realPipeline } from '../service/helpers.ts';

test('200 concurrent clients, 2000 requests: zero 5xx, 429 only past the limit, memory flat', async () => {
  const pipeline = await realPipeline();
  const limit = 300;
  try {
    const f = await runLoad({ pipeline, clients: 200, requests: 2000, maxSeconds: 60, createsPerMinute: limit });
    console.log(JSON.stringify(f));
    assert.equal(f.server_5xx, 0, JSON.stringify(f.status));
    assert.equal(f.errors, 0);
    assert.deepEqual(Object.keys(f.status).sort(), ['200', '201', '429'].filter((s) => f.status[s]).sort());
    // the bucket starts full (limit) and refills at limit/min: accepted creations can exceed it only by the refill
    assert.ok(f.creates_ok <= limit + Math.ceil((f.wall_s * limit) / 60) + 1, `${f.creates_ok} accepted`);
    assert.ok(f.creates_429 > 0, 'the load never reached the limit, so the test proves nothing about 429');
    assert.ok(f.first_429_after_creates! >= limit, `first 429 after only ${f.first_429_after_creates} creations`);
    // live JS heap (measured after a full GC) is what a per-request leak grows; rss is reported, not asserted: it
    // holds ONNX Runtime's arenas and the model's first load, which the allocator keeps after use
    assert.ok(f.heap_mb_end - f.heap_mb_start < 50, `live heap ${f.heap_mb_start} → ${f.heap_mb_end} MB`);
  } finally {
    await pipeline.close();
  }
});
