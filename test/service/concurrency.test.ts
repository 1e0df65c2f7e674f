import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { PipelinePool } from '../../src/service/pool.ts';
import { type Harness, pollUntil, realPipeline, startService } from './helpers.ts';

const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';
const long = { input: { prompt: 'busy', image_size: { width: 64, height: 64 }, num_inference_steps: 50 } };

let pool: PipelinePool;
let h: Harness;
before(async () => {
  pool = new PipelinePool([await realPipeline(), await realPipeline()]);
  h = await startService({ pipeline: pool, config: { workers: 2 } });
});
after(async () => {
  await h.svc.close();
  await pool.close();
});

/** The harness acting as another key. */
const as = (key: string): Harness => ({ ...h, api: (m, p, b, hd) => h.api(m, p, b, { authorization: `Bearer ${key}`, ...hd }) });

test('per-key concurrency: a key at its limit waits in queued while another key uses the free worker', async () => {
  const limited = as(h.newKey({ maxConcurrency: 1 }));
  const a1 = await limited.api('POST', T2I, long);
  const a2 = await limited.api('POST', T2I, long);
  await pollUntil(limited, a1.json.id, (r) => r.progress?.step >= 1, 120_000);
  // a worker is free, but the key is at its limit
  assert.equal((await limited.api('GET', `/v1/runs/${a2.json.id}`)).json.status_code, 'queued');
  assert.equal(((await (await fetch(`${h.url}/v1/health`)).json()) as any).queue.running, 1);

  // another key's run takes the free worker at once
  const b1 = await h.api('POST', T2I, long);
  await pollUntil(h, b1.json.id, (r) => r.progress?.step >= 1, 120_000);
  assert.equal((await limited.api('GET', `/v1/runs/${a2.json.id}`)).json.status_code, 'queued');

  // when the key's run ends, its next one starts
  await limited.api('POST', `/v1/runs/${a1.json.id}/cancellation`);
  await pollUntil(limited, a2.json.id, (r) => r.status_code === 'running', 60_000);
  for (const [who, id] of [[limited, a2.json.id], [h, b1.json.id]] as const) {
    assert.equal((await who.api('POST', `/v1/runs/${id}/cancellation`)).json.status_code, 'cancelled');
  }
});
