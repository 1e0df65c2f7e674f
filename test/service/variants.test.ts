// The served model ids and prices follow the variant `klein serve` loaded: a tiny model folder written as each of
// klein 4B, 9B, base 4B and base 9B, served by the real CLI, and what /v1/models, the OpenAPI document, llms.txt, the
// agent skill, the runs route and the OpenAI route say and accept.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type { VariantId } from '../../src/weights/model-folder.ts';
import { writeTinyModel } from '../../src/fixtures/tiny-model.ts';
import { startServe, stopProcess, tmpDir } from '../cli/helpers.ts';

const children: ChildProcess[] = [];
after(async () => {
  for (const c of children) await stopProcess(c);
});

const EXPECTED: Record<VariantId, { id: string; alias: string; title: string; first: string }> = {
  'klein-4b': { id: 'black-forest-labs/flux-2-klein-4b', alias: 'flux-2-klein-4b', title: 'FLUX.2 [klein] 4B', first: '0.014' },
  'klein-9b': { id: 'black-forest-labs/flux-2-klein-9b', alias: 'flux-2-klein-9b', title: 'FLUX.2 [klein] 9B', first: '0.015' },
  'klein-base-4b': { id: 'black-forest-labs/flux-2-klein-base-4b', alias: 'flux-2-klein-base-4b', title: 'FLUX.2 [klein] Base 4B', first: '0.014' },
  'klein-base-9b': { id: 'black-forest-labs/flux-2-klein-base-9b', alias: 'flux-2-klein-base-9b', title: 'FLUX.2 [klein] Base 9B', first: '0.015' },
};

async function serve(variant: VariantId, config?: unknown) {
  const dir = tmpDir(`variant-${variant}`);
  const model = path.join(dir, 'model');
  // 9B folders are told from 4B by their BFL file name (flux-2-klein-9b.safetensors); the tiny weights are the same
  writeTinyModel(model, { variant, layout: variant.endsWith('9b') ? 'bfl' : 'diffusers', matting: false, seed: 3 });
  const data = path.join(dir, 'data');
  fs.mkdirSync(data);
  if (config) fs.writeFileSync(path.join(data, 'config.json'), JSON.stringify(config));
  const s = await startServe(['--model', model, '--data', data, '--port', '0'], { track: children, timeoutMs: 120_000 });
  const key = s.lines[s.lines.length - 1];
  const get = async (p: string) => {
    const r = await fetch(`${s.url}${p}`, { headers: { authorization: `Bearer ${key}` } });
    return { status: r.status, text: await r.text() };
  };
  const post = async (p: string, body: unknown) => {
    const r = await fetch(`${s.url}${p}`, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', prefer: 'wait=120' }, body: JSON.stringify(body) });
    return { status: r.status, json: (await r.json()) as any };
  };
  return { ...s, get, post };
}

for (const variant of Object.keys(EXPECTED) as VariantId[]) {
  test(`a ${variant} model is served under its own ids and prices, everywhere the API describes itself`, { timeout: 300_000 }, async () => {
    const want = EXPECTED[variant];
    // base 9B's price comes from config.json, the others' from the defaults
    const custom = variant === 'klein-base-9b' ? { firstMpUsd: 0.05, extraMpUsd: 0.01, inputMpUsd: 0 } : undefined;
    const s = await serve(variant, custom ? { pricing: { [want.id]: custom } } : undefined);
    try {
      const models = JSON.parse((await s.get('/v1/models')).text).data as Array<{ id: string; aliases: string[]; title: string; kind: string; price_label: string; example_cost_1mp: string }>;
      assert.deepEqual(models.map((m) => [m.id, m.aliases, m.kind]), [[want.id, [want.alias], 'text-to-image'], [`${want.id}/edit`, [`${want.alias}/edit`], 'edit']]);
      assert.equal(models[0].title, want.title);
      const first = custom ? '0.050' : want.first;
      assert.ok(models[0].price_label.startsWith(`$${first}`), models[0].price_label);
      assert.equal(models[0].example_cost_1mp, first);

      // every other variant's ids (4B's included) are not served here, and the 404 says what is
      for (const [other, o] of Object.entries(EXPECTED)) {
        if (other === variant) continue;
        const r = await s.get(`/v1/models/${o.alias}`);
        assert.equal(r.status, 404, `${o.alias} on a ${variant} server`);
        assert.match(r.text, new RegExp(`does not run; it serves ${want.id.replace(/[/.[\]]/g, '\\$&')}`));
      }
      assert.equal((await s.get(`/v1/models/${want.alias}/edit`)).status, 200);

      const doc = JSON.parse((await s.get('/openapi.json')).text);
      const create = doc.paths['/v1/models/{model_id}/runs'].post;
      assert.equal(create.parameters.find((p: any) => p.name === 'model_id').schema.example, want.id);
      assert.ok(create.description.includes(`\`${want.alias}/edit\``));
      const others = Object.values(EXPECTED).filter((o) => o.id !== want.id);
      for (const o of others) assert.ok(!JSON.stringify(doc).includes(o.alias), `the OpenAPI document names ${o.alias}`);

      const llms = (await s.get('/llms.txt')).text;
      assert.ok(llms.includes(`/v1/models/${want.id}/llms.txt): \`${want.id}\`, $${first}`), llms);
      const modelTxt = (await s.get(`/v1/models/${want.id}/llms.txt`)).text;
      assert.match(modelTxt, new RegExp(`^# ${want.title.replace(/[[\].]/g, '\\$&')}\\n`));
      const skill = (await s.get('/.well-known/agent-skills/klein/SKILL.md')).text;
      assert.ok(skill.includes(`This server runs ${want.title}: text to image \`${want.id}\``), skill);
      assert.ok(skill.includes(`POST $KLEIN_URL/v1/models/${want.id}/runs`));
      if (variant !== 'klein-4b') assert.ok(!skill.includes('flux-2-klein-4b'), 'the skill names no 4B id');
      const page = (await s.get('/')).text;
      assert.ok(page.includes(`"t2i":"${want.id}"`), 'the playground creates runs on the served id');
    } finally {
      await stopProcess(s.proc);
    }
  });
}

test('a klein 9B server generates under its alias, bills the 9B price, and OpenAI model names mean 9B there', { timeout: 300_000 }, async () => {
  const s = await serve('klein-9b');
  try {
    const r = await s.post('/v1/models/flux-2-klein-9b/runs', { input: { prompt: 'a fox', image_size: { width: 64, height: 64 }, num_inference_steps: 1, seed: 5 } });
    assert.equal(r.status, 201, JSON.stringify(r.json));
    assert.equal(r.json.model_id, 'black-forest-labs/flux-2-klein-9b');
    assert.equal(r.json.status_code, 'succeeded', JSON.stringify(r.json));
    assert.equal(r.json.cost, '0.015');
    assert.equal(r.json.cost_breakdown.price.extra_mp_usd, '0.002');
    const four = await s.post('/v1/models/black-forest-labs/flux-2-klein-4b/runs', { input: { prompt: 'a fox' } });
    assert.equal(four.status, 404);
    assert.equal(four.json.code, 'MODEL_NOT_FOUND');
    // OpenAI model names and no model at all mean the served model; a 4B id does not
    const oa = await s.post('/v1/images/generations', { prompt: 'a fox', model: 'gpt-image-1', size: '64x64', seed: 2 });
    assert.equal(oa.status, 200, JSON.stringify(oa.json));
    const run = JSON.parse((await s.get(`/v1/runs/${oa.json.run_id}`)).text);
    assert.equal(run.model_id, 'black-forest-labs/flux-2-klein-9b');
    const wrong = await s.post('/v1/images/generations', { prompt: 'a fox', model: 'flux-2-klein-4b', size: '64x64' });
    assert.equal(wrong.status, 404);
    assert.equal(wrong.json.error.code, 'model_not_found');
  } finally {
    await stopProcess(s.proc);
  }
});
