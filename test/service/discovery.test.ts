import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { type Harness, realPipeline, startService } from './helpers.ts';

describe('discovery', () => {
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

  test('the OpenAPI document is well-formed and lists every route the server answers', async () => {
    const res = await fetch(`${h.url}/openapi.json`);
    assert.equal(res.status, 200);
    const doc = (await res.json()) as any;
    assert.equal(doc.openapi, '3.1.0');
    assert.ok(doc.info.title && doc.info.version);
    // every route registered in the app (middleware aside) is documented, with the same method
    const routes = new Set(
      h.svc.app.routes
        .filter((r) => r.method !== 'ALL')
        .map((r) => `${r.method.toLowerCase()} ${r.path.replace(/:(\w+)(\{[^}]*\})?/g, '{$1}')}`),
    );
    const documented = new Set(Object.entries(doc.paths).flatMap(([p, ops]) => Object.keys(ops as object).map((m) => `${m} ${p}`)));
    assert.deepEqual([...routes].filter((r) => !documented.has(r)), [], 'undocumented routes');
    assert.deepEqual([...documented].filter((r) => !routes.has(r)), [], 'documented routes the server lacks');
    for (const must of ['post /v1/models/{model_id}/runs', 'get /v1/runs/{id}/events', 'post /v1/runs/{id}/cancellation', 'post /v1/callback-secrets', 'get /v1/usage']) assert.ok(documented.has(must), must);
    // structural validation: responses everywhere, declared path parameters, every $ref resolves
    for (const [p, ops] of Object.entries(doc.paths) as [string, any][]) {
      for (const [m, op] of Object.entries(ops) as [string, any][]) {
        assert.ok(Object.keys(op.responses ?? {}).length > 0, `${m} ${p} has responses`);
        for (const name of [...p.matchAll(/\{(\w+)\}/g)].map((x) => x[1])) {
          assert.ok((op.parameters ?? []).some((q: any) => q.in === 'path' && q.name === name && q.required), `${m} ${p} declares {${name}}`);
        }
      }
    }
    const refs = [...JSON.stringify(doc).matchAll(/"\$ref":"#\/components\/(\w+)\/([^"]+)"/g)];
    assert.ok(refs.length > 5);
    for (const [, kind, name] of refs) assert.ok(doc.components[kind]?.[name], `$ref ${kind}/${name} resolves`);
    assert.equal(doc.components.securitySchemes.bearer.scheme, 'bearer');
  });

  test('llms.txt (site and per model), the skill index with matching digests, /docs without a CDN', async () => {
    const site = await fetch(`${h.url}/llms.txt`);
    assert.equal(site.status, 200);
    const siteText = await site.text();
    assert.match(siteText, /^# klein serve/);
    assert.ok(siteText.includes(`${h.url}/v1/models/black-forest-labs/flux-2-klein-4b/llms.txt`));

    for (const id of ['black-forest-labs/flux-2-klein-4b', 'flux-2-klein-4b', 'black-forest-labs/flux-2-klein-4b/edit']) {
      const r = await fetch(`${h.url}/v1/models/${id}/llms.txt`);
      assert.equal(r.status, 200, id);
      const t = await r.text();
      assert.match(t, /## Input Schema/);
      assert.match(t, /### `prompt` \(string, required\)/);
      assert.match(t, /### `num_images` \(integer, optional\)[\s\S]*?- \*\*Default\*\*: `1`[\s\S]*?- \*\*Min\*\*: 1[\s\S]*?- \*\*Max\*\*: 4/);
      assert.match(t, /\$0\.014 first megapixel/);
      assert.match(t, /curl -s -X POST/);
      if (id.endsWith('edit')) assert.match(t, /### `image_urls` \(array, required\)/);
    }
    assert.equal((await fetch(`${h.url}/v1/models/nope/llms.txt`)).status, 404);

    const idx = (await (await fetch(`${h.url}/.well-known/agent-skills/index.json`)).json()) as any;
    assert.equal(idx.skills.length, 1);
    const skill = idx.skills[0];
    const md = await fetch(h.url + skill.url);
    assert.equal(md.status, 200);
    const bytes = Buffer.from(await md.arrayBuffer());
    assert.equal(skill.digest, `sha256:${crypto.createHash('sha256').update(bytes).digest('hex')}`);
    assert.match(bytes.toString(), /^---\nname: klein\ndescription: /);

    const docs = await fetch(`${h.url}/docs`);
    assert.equal(docs.status, 200);
    const html = await docs.text();
    assert.match(html, /fetch\('\/openapi\.json'\)/);
    assert.ok(!/<script[^>]+src=|<link[^>]+href="http/.test(html), 'no external scripts or styles');

    const models = (await (await fetch(`${h.url}/v1/models`)).json()) as any;
    assert.deepEqual(models.data.map((m: any) => m.id), ['black-forest-labs/flux-2-klein-4b', 'black-forest-labs/flux-2-klein-4b/edit']);
    const health = (await (await fetch(`${h.url}/v1/health`)).json()) as any;
    assert.equal(health.status, 'ok');
  });
});
