import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import sharp from 'sharp';
import { formatUsd, priceRun } from '../../src/service/pricing.ts';
import { defaultConfig } from '../../src/service/config.ts';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { type Harness, pollUntil, realPipeline, startService, terminal } from './helpers.ts';

const PRICE = defaultConfig('/tmp').pricing['black-forest-labs/flux-2-klein-4b'];

test('prices: $0.014 first MP, $0.001 per further MP rounded up, $0.001 per input MP', () => {
  assert.equal(formatUsd(priceRun(PRICE, { width: 1024, height: 1024, count: 1 }).micros), '0.014');
  assert.equal(formatUsd(priceRun(PRICE, { width: 1024, height: 2048, count: 1 }).micros), '0.015'); // 2 MP
  assert.equal(formatUsd(priceRun(PRICE, { width: 1024, height: 1040, count: 1 }).micros), '0.015'); // just over 1 MP rounds up
  assert.equal(formatUsd(priceRun(PRICE, { width: 2048, height: 2048, count: 1 }).micros), '0.017'); // 4 MP
  assert.equal(formatUsd(priceRun(PRICE, { width: 64, height: 64, count: 4 }).micros), '0.056');
  // edit: 1 MP output + one 1 MP reference + one 2 MP reference = 0.014 + 0.001 + 0.002
  assert.equal(formatUsd(priceRun(PRICE, { width: 1024, height: 1024, count: 1 }, [{ width: 1024, height: 1024 }, { width: 2048, height: 1024 }]).micros), '0.017');
});

describe('costs on runs and the usage ledger', () => {
  let h: Harness;
  let engine: ImagePipeline;
  before(async () => {
    engine = await realPipeline();
    h = await startService({ pipeline: engine });
  });
  after(async () => {
    await h.svc.close();
    await engine.close();
  });

  test('quoted cost for 1 MP and 2 MP runs, billed only on success, ledger per day', async () => {
    // a long run holds the only worker, so the priced runs below stay queued
    const blocker = await h.api('POST', '/v1/models/flux-2-klein-4b/runs', { input: { prompt: 'x', image_size: { width: 64, height: 64 }, num_inference_steps: 50 } });
    await pollUntil(h, blocker.json.id, (r) => r.status_code === 'running', 120_000);
    const one = await h.api('POST', '/v1/models/flux-2-klein-4b/runs', { input: { prompt: 'x', image_size: 'square_hd' } });
    assert.equal(one.json.cost, '0.014');
    assert.equal(one.json.cost_breakdown.state, 'estimated');
    assert.equal(one.json.cost_breakdown.images[0].output_mp, 1);
    const two = await h.api('POST', '/v1/models/flux-2-klein-4b/runs', { input: { prompt: 'x', image_size: { width: 1024, height: 2048 }, num_images: 2 } });
    assert.equal(two.json.cost, '0.030');
    assert.equal(two.json.cost_breakdown.images[1].extra_mp_usd, '0.001');
    // neither finishes: cancelled runs cost nothing
    for (const r of [two, one, blocker]) assert.equal((await h.api('POST', `/v1/runs/${r.json.id}/cancellation`)).json.cost, '0.000');

    const small = await h.api('POST', '/v1/models/flux-2-klein-4b/runs', { input: { prompt: 'x', image_size: { width: 64, height: 64 }, num_inference_steps: 1 } });
    const done = await pollUntil(h, small.json.id, terminal, 120_000);
    assert.equal(done.status_code, 'succeeded');
    assert.equal(done.cost, '0.014');
    assert.equal(done.cost_breakdown.state, 'billed');

    const png = await sharp({ create: { width: 64, height: 64, channels: 3, background: 'white' } }).png().toBuffer();
    const edit = await h.api('POST', '/v1/models/black-forest-labs/flux-2-klein-4b/edit/runs', {
      input: { prompt: 'paint it', image_urls: [`data:image/png;base64,${png.toString('base64')}`], num_inference_steps: 1 },
    });
    assert.equal(edit.status, 201, JSON.stringify(edit.json));
    assert.equal(edit.json.model_id, 'black-forest-labs/flux-2-klein-4b/edit');
    const e = await pollUntil(h, edit.json.id, terminal, 120_000);
    assert.equal(e.status_code, 'succeeded', JSON.stringify(e));
    assert.equal(e.cost, '0.015');
    assert.equal(e.cost_breakdown.images[0].input_mp_usd, '0.001');
    assert.equal(e.output.images[0].width, 64, 'edit size defaults to the reference size');

    const usage = await h.api('GET', '/v1/usage');
    assert.equal(usage.status, 200);
    assert.equal(usage.json.total_cost, '0.029');
    const today = new Date().toISOString().slice(0, 10);
    assert.deepEqual(usage.json.data.map((r: any) => [r.day, r.model_id, r.runs, r.cost]), [
      [today, 'black-forest-labs/flux-2-klein-4b', 1, '0.014'],
      [today, 'black-forest-labs/flux-2-klein-4b/edit', 1, '0.015'],
    ]);
    const none = await h.api('GET', '/v1/usage?from=2000-01-01&to=2000-01-02');
    assert.equal(none.json.total_cost, '0.000');
    const models = await h.api('GET', '/v1/models');
    assert.match(models.json.data[0].price_label, /\$0\.014 first megapixel \+ \$0\.001 per further megapixel/);
  });
});
