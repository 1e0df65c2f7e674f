// The served OpenAPI document as client generators and linters see it: Stoplight Spectral's `spectral:oas` ruleset
// finds nothing (no error, warning, info or hint), and a typed client generated from it with openapi-typescript +
// openapi-fetch type-checks, refuses a wrongly typed input, and runs a generation against the real server.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import sharp from 'sharp';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { type Harness, realPipeline, startService, tempDir } from './helpers.ts';

const run = promisify(execFile);
const ROOT = path.resolve(import.meta.dirname, '../..');
const bin = (name: string) => path.join(ROOT, 'node_modules', '.bin', name);

describe('the OpenAPI document as clients use it', () => {
  let h: Harness;
  let engine: ImagePipeline;
  let dir: string;
  let doc: any;
  before(async () => {
    engine = await realPipeline();
    h = await startService({ pipeline: engine });
    dir = tempDir('klein-openapi-');
    doc = await (await fetch(`${h.url}/openapi.json`)).json();
    fs.writeFileSync(path.join(dir, 'openapi.json'), JSON.stringify(doc));
  });
  after(async () => {
    await h.svc.close();
    await engine.close();
  });

  test("spectral lint with the spectral:oas ruleset: no findings of any severity", async () => {
    fs.writeFileSync(path.join(dir, '.spectral.yaml'), 'extends: ["spectral:oas"]\n');
    // exit code 0 only when nothing at or above `hint` was found; the JSON says what, if anything
    const r = await run(bin('spectral'), ['lint', path.join(dir, 'openapi.json'), '--ruleset', path.join(dir, '.spectral.yaml'), '--format', 'json', '--fail-severity', 'hint', '--quiet'], { env: { ...process.env, SCARF_ANALYTICS: 'false' } }).catch((e) => e as { stdout: string; code: number });
    const findings = JSON.parse(r.stdout || '[]') as Array<{ code: string; path: string[]; message: string }>;
    assert.deepEqual(findings.map((f) => `${f.code} ${f.path.join('.')}: ${f.message}`), []);
    assert.equal((r as { code?: number }).code ?? 0, 0);
    // what the ruleset checks, stated here too: unique operation ids everywhere, and every tag declared
    const ops = Object.values(doc.paths).flatMap((p: any) => Object.values(p)) as Array<{ operationId?: string; tags?: string[] }>;
    assert.ok(ops.length >= 28);
    const ids = ops.map((o) => o.operationId);
    assert.ok(ids.every((id) => typeof id === 'string' && /^[a-z][A-Za-z]+$/.test(id)), JSON.stringify(ids));
    assert.equal(new Set(ids).size, ids.length);
    const declared = new Set(doc.tags.map((t: { name: string }) => t.name));
    for (const o of ops) for (const t of o.tags ?? []) assert.ok(declared.has(t), `tag ${t} declared`);
  });

  test('openapi-typescript + openapi-fetch: the generated client type-checks and runs a generation', { timeout: 300_000 }, async () => {
    await run(bin('openapi-typescript'), [path.join(dir, 'openapi.json'), '--output', path.join(dir, 'schema.d.ts')]);
    const types = fs.readFileSync(path.join(dir, 'schema.d.ts'), 'utf8');
    assert.match(types, /createRun: \{/);
    assert.match(types, /TextToImageInput: \{/);
    fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(dir, 'node_modules'));
    fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ type: 'module' }));
    fs.writeFileSync(path.join(dir, 'client.ts'), `
import createClient from 'openapi-fetch';
import type { paths } from './schema.d.ts';

const client = createClient<paths>({ baseUrl: process.env.KLEIN_URL!, headers: { Authorization: \`Bearer \${process.env.KLEIN_API_KEY}\` } });
const models = await client.GET('/v1/models');
if (!models.data) throw new Error(JSON.stringify(models.error));
const created = await client.POST('/v1/models/{model_id}/runs', {
  params: { path: { model_id: models.data.data[0].id }, header: { prefer: 'wait=120' } },
  body: { input: { prompt: 'a red fox in the snow', image_size: { width: 64, height: 80 }, num_inference_steps: 2, seed: 11 } },
});
if (!created.data) throw new Error(JSON.stringify(created.error));
const polled = await client.GET('/v1/runs/{id}', { params: { path: { id: created.data.id } } });
if (!polled.data) throw new Error(JSON.stringify(polled.error));
const image: { url: string | null; width: number; content_type: string } | undefined = polled.data.output?.images[0];
const missing = await client.GET('/v1/runs/{id}', { params: { path: { id: 'no-such-run' } } });
console.log(JSON.stringify({ model: models.data.data[0].id, status: polled.data.status_code, seed: polled.data.output?.seed, cost: polled.data.cost, image, missing: missing.error?.code }));

function neverCalled() {
  // @ts-expect-error num_images is a number in the generated input type
  void client.POST('/v1/models/{model_id}/runs', { params: { path: { model_id: 'x' } }, body: { input: { prompt: 'x', num_images: 'four' } } });
}
void neverCalled;
`);
    fs.writeFileSync(path.join(dir, 'tsconfig.json'), JSON.stringify({ compilerOptions: { strict: true, noEmit: true, target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', allowImportingTsExtensions: true, skipLibCheck: false, types: ['node'] }, files: ['client.ts'] }));
    const tsc = await run(bin('tsc'), ['-p', path.join(dir, 'tsconfig.json')], { cwd: dir }).catch((e) => e as { stdout: string; code: number });
    assert.equal((tsc as { code?: number }).code ?? 0, 0, `the generated client does not type-check:\n${tsc.stdout}`);

    const out = await run(bin('tsx'), [path.join(dir, 'client.ts')], { cwd: dir, env: { ...process.env, KLEIN_URL: h.url, KLEIN_API_KEY: h.key }, timeout: 240_000 });
    const r = JSON.parse(out.stdout.trim().split('\n').pop()!) as { model: string; status: string; seed: number; cost: string; image: { url: string; width: number; content_type: string }; missing: string };
    assert.equal(r.model, 'black-forest-labs/flux-2-klein-4b');
    assert.equal(r.status, 'succeeded');
    assert.equal(r.seed, 11);
    assert.equal(r.cost, '0.014');
    assert.equal(r.missing, 'RUN_NOT_FOUND');
    assert.equal(r.image.content_type, 'image/png');
    const png = Buffer.from(await (await fetch(r.image.url)).arrayBuffer());
    const meta = await sharp(png).metadata();
    assert.deepEqual([meta.format, meta.width, meta.height], ['png', 64, 80]);
  });
});
