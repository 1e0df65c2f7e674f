// Transparent backgrounds through the service: the Runflow runs API, the OpenAI-compatible images API and the MCP
// tool, on a real server on 127.0.0.1 running the real pipeline on a tiny model folder (tiny klein + the tiny
// BiRefNet it carries in matting/). Images are decoded back with sharp; refusals are checked to leave nothing
// stored or charged; a server without matting weights says so, naming the pull command.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import OpenAI from 'openai';
import sharp from 'sharp';
import { openPipeline } from '../../src/pipeline/pipeline.ts';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { mattingProbe } from '../../src/service/background.ts';
import { type Harness, modelFolderWithoutMatting, pollUntil, realPipeline, startService, tempDir, terminal } from './helpers.ts';
import { cpuTarget } from '../../src/runtime/target.ts';

const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';
const EDIT = '/v1/models/black-forest-labs/flux-2-klein-4b/edit/runs';

/** Channels, alpha presence and the alpha plane's range of an encoded image. */
async function pixels(bytes: Buffer) {
  const img = sharp(bytes);
  const meta = await img.metadata();
  const stats = await img.stats();
  const a = meta.channels === 4 ? stats.channels[3] : null;
  return { format: meta.format, width: meta.width, height: meta.height, channels: meta.channels, hasAlpha: meta.hasAlpha, alphaMin: a?.min, alphaMax: a?.max };
}

const download = async (url: string) => Buffer.from(await (await fetch(url)).arrayBuffer());

/** Everything a refused request could have left behind: runs, usage rows, output folders. */
async function footprint(h: Harness) {
  const runs = (await h.api('GET', '/v1/runs?limit=100')).json.data.length;
  const usage = h.svc.store.db.prepare('SELECT COUNT(*) AS n FROM usage').get() as { n: number };
  const outputs = fs.readdirSync(path.join(h.dataDir, 'outputs')).length;
  return { runs, usage: usage.n, outputs };
}

describe('transparent backgrounds through the API', () => {
  let h: Harness;
  let engine: ImagePipeline & { modelDir: string };
  let openai: OpenAI;
  before(async () => {
    engine = await realPipeline();
    // as klein serve wires it: the service asks where the pipeline would find its matting model
    h = await startService({ pipeline: engine, matting: mattingProbe({ modelRoot: engine.modelDir }) });
    openai = new OpenAI({ apiKey: h.key, baseURL: `${h.url}/v1`, maxRetries: 0 });
  });
  after(async () => {
    await h.svc.close();
    await engine.close();
  });

  test('Runflow: transparent png and webp are RGBA with a matted (non-constant) alpha, the pipeline\'s own bytes', async () => {
    const input = { prompt: 'a red apple', image_size: { width: 64, height: 64 }, seed: 11, num_inference_steps: 2 };
    const c = await h.api('POST', T2I, { input: { ...input, background: 'transparent' } });
    assert.equal(c.status, 201, JSON.stringify(c.json));
    // no output_format with a transparent background: png, which carries alpha
    assert.equal(c.json.input.output_format, 'png');
    assert.equal(c.json.input.background, 'transparent');
    const run = await pollUntil(h, c.json.id, terminal, 120_000);
    assert.equal(run.status_code, 'succeeded', run.failure_message);
    assert.equal(run.output.background, 'transparent');
    const img = run.output.images[0];
    assert.deepEqual([img.content_type, img.has_alpha, img.width, img.height], ['image/png', true, 64, 64]);
    const png = await download(img.url);
    const p = await pixels(png);
    assert.deepEqual([p.format, p.channels, p.hasAlpha], ['png', 4, true]);
    assert.ok(p.alphaMax! > p.alphaMin!, `alpha is constant (${p.alphaMin})`);
    assert.ok(run.output.timings.matting > 0, JSON.stringify(run.output.timings));
    // the service hands out exactly what the pipeline makes for the same request
    const direct = await engine.generate({ prompt: 'a red apple', width: 64, height: 64, seed: 11, steps: 2, numImages: 1, outputFormat: 'png', background: 'transparent' });
    assert.ok(png.equals(Buffer.from(direct.images[0].data)), 'same request, same bytes');
    // same price as an opaque image of that size
    assert.equal(run.cost, '0.014');

    const w = await h.api('POST', T2I, { input: { ...input, background: 'transparent', output_format: 'webp' } }, { Prefer: 'wait=120' });
    assert.equal(w.json.status_code, 'succeeded', w.json.failure_message);
    assert.deepEqual([w.json.output.images[0].content_type, w.json.output.images[0].has_alpha], ['image/webp', true]);
    const q = await pixels(await download(w.json.output.images[0].url));
    assert.deepEqual([q.format, q.channels, q.hasAlpha], ['webp', 4, true]);
    assert.ok(q.alphaMax! > q.alphaMin!, `webp alpha is constant (${q.alphaMin})`);
  });

  test('Runflow: opaque is the image as before (3 channels, byte-identical to a run without background)', async () => {
    const input = { prompt: 'a blue boat', image_size: { width: 64, height: 64 }, seed: 5, num_inference_steps: 2 };
    const plain = await h.api('POST', T2I, { input }, { Prefer: 'wait=120' });
    const opaque = await h.api('POST', T2I, { input: { ...input, background: 'opaque' } }, { Prefer: 'wait=120' });
    for (const r of [plain, opaque]) {
      assert.equal(r.json.status_code, 'succeeded', r.json.failure_message);
      assert.equal(r.json.output.background, 'opaque');
      assert.equal(r.json.output.images[0].has_alpha, false);
      assert.equal(r.json.output.timings.matting, undefined);
    }
    // the default is recorded, so a stored run says what it asked for
    assert.equal(plain.json.input.background, 'auto');
    const a = await download(plain.json.output.images[0].url);
    const b = await download(opaque.json.output.images[0].url);
    assert.ok(a.equals(b), 'opaque and the default give the same bytes');
    const p = await pixels(a);
    assert.deepEqual([p.format, p.channels, p.hasAlpha], ['png', 3, false]);
  });

  test('Runflow: an edit with a transparent background cuts out the edited image', async () => {
    const ref = await sharp({ create: { width: 64, height: 64, channels: 4, background: { r: 30, g: 160, b: 90, alpha: 0.5 } } }).png().toBuffer();
    const r = await h.api('POST', EDIT, { input: { prompt: 'make it red', image_urls: [`data:image/png;base64,${ref.toString('base64')}`], seed: 2, num_inference_steps: 1, background: 'transparent', output_format: 'webp' } }, { Prefer: 'wait=120' });
    assert.equal(r.json.status_code, 'succeeded', r.json.failure_message);
    const p = await pixels(await download(r.json.output.images[0].url));
    assert.deepEqual([p.format, p.width, p.height, p.channels], ['webp', 64, 64, 4]);
    assert.ok(p.alphaMax! > p.alphaMin!);
  });

  test('transparent + jpeg: 422 on the runs API and the OpenAI API; nothing stored, queued or charged', async () => {
    const before = await footprint(h);
    const r = await h.api('POST', T2I, { input: { prompt: 'a logo', image_size: 'square', background: 'transparent', output_format: 'jpeg' } });
    assert.equal(r.status, 422);
    assert.equal(r.json.code, 'UNSUPPORTED_COMBINATION');
    assert.match(r.json.message, /transparent background needs png or webp.*jpeg has no alpha/);
    assert.deepEqual(r.json.errors[0].loc, ['body', 'input', 'output_format']);
    // sync_mode and the edit model refuse it the same way
    const s = await h.api('POST', EDIT, { input: { prompt: 'x', image_urls: ['https://example.com/a.png'], background: 'transparent', output_format: 'jpeg', sync_mode: true } });
    assert.equal(s.status, 422);
    assert.equal(s.json.code, 'UNSUPPORTED_COMBINATION');

    const raw = await fetch(`${h.url}/v1/images/generations`, { method: 'POST', headers: { authorization: `Bearer ${h.key}`, 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'a logo', size: '64x64', background: 'transparent', output_format: 'jpeg' }) });
    assert.equal(raw.status, 422);
    const body = (await raw.json()) as { error: { code: string; param: string; type: string; message: string } };
    assert.deepEqual([body.error.code, body.error.param, body.error.type], ['unsupported_combination', 'output_format', 'invalid_request_error']);
    assert.match(body.error.message, /jpeg has no alpha channel/);
    // an unknown background is an ordinary parameter error
    const bad = await h.api('POST', T2I, { input: { prompt: 'x', background: 'clear' } });
    assert.equal(bad.status, 422);
    assert.deepEqual(bad.json.errors[0].loc, ['body', 'input', 'background']);
    assert.deepEqual(await footprint(h), before);
  });

  test('OpenAI images API: background transparent is accepted (png, webp) and echoed; opaque and auto echo opaque', async () => {
    const res = await openai.images.generate({ prompt: 'a green bottle', size: '64x64' as never, background: 'transparent', seed: 3 } as OpenAI.ImageGenerateParamsNonStreaming & { seed: number });
    assert.equal(res.background, 'transparent');
    assert.equal(res.output_format, 'png');
    assert.match(res.data![0].revised_prompt!, /^a green bottle, .*plain uniform light-grey studio background/);
    const p = await pixels(Buffer.from(res.data![0].b64_json!, 'base64'));
    assert.deepEqual([p.format, p.channels, p.hasAlpha], ['png', 4, true]);
    assert.ok(p.alphaMax! > p.alphaMin!);

    const webp = await openai.images.generate({ prompt: 'a green bottle', size: '64x64' as never, background: 'transparent', output_format: 'webp', response_format: 'url', seed: 3 } as OpenAI.ImageGenerateParamsNonStreaming & { seed: number });
    assert.equal(webp.background, 'transparent');
    const q = await pixels(await download(webp.data![0].url!));
    assert.deepEqual([q.format, q.channels], ['webp', 4]);

    for (const background of ['opaque', 'auto'] as const) {
      const o = await openai.images.generate({ prompt: 'a green bottle', size: '64x64' as never, background, seed: 3 } as OpenAI.ImageGenerateParamsNonStreaming & { seed: number });
      assert.equal(o.background, 'opaque');
      assert.equal(o.data![0].revised_prompt, undefined);
      assert.equal((await pixels(Buffer.from(o.data![0].b64_json!, 'base64'))).channels, 3);
    }
    const e = await openai.images.generate({ prompt: 'x', background: 'transparent', output_format: 'jpeg' }).catch((err: unknown) => err);
    assert.ok(e instanceof OpenAI.APIError);
    assert.equal(e.status, 422);
    assert.equal(e.param, 'output_format');
  });

  test('MCP generate_image takes background; jpeg + transparent is a tool error naming the fix', async () => {
    const client = new Client({ name: 'klein-test', version: '1.0.0' });
    await client.connect(new StreamableHTTPClientTransport(new URL(`${h.url}/mcp`), { requestInit: { headers: { authorization: `Bearer ${h.key}` } } }));
    try {
      const { tools } = await client.listTools();
      const props = tools.find((t) => t.name === 'generate_image')!.inputSchema.properties as Record<string, { enum?: string[] }>;
      assert.deepEqual(props.background.enum, ['auto', 'opaque', 'transparent']);
      const bad = (await client.callTool({ name: 'generate_image', arguments: { prompt: 'x', background: 'transparent', output_format: 'jpeg' } })) as { isError?: boolean; content: { text?: string }[] };
      assert.equal(bad.isError, true);
      assert.match(bad.content[0].text!, /^UNSUPPORTED_COMBINATION: .*png or webp/);
      const ok = (await client.callTool({ name: 'generate_image', arguments: { prompt: 'a cup', size: '64x64', seed: 1, background: 'transparent' } })) as { content: { type: string; data?: string; mimeType?: string; text?: string }[] };
      const img = ok.content.find((c) => c.type === 'image')!;
      assert.equal(img.mimeType, 'image/png');
      assert.equal((await pixels(Buffer.from(img.data!, 'base64'))).channels, 4);
      assert.equal(JSON.parse(ok.content.find((c) => c.type === 'text')!.text!).images[0].has_alpha, true);
    } finally {
      await client.close();
    }
  });

  test('/v1/health says whether transparent backgrounds are available', async () => {
    const health = (await (await fetch(`${h.url}/v1/health`)).json()) as { transparent_backgrounds: unknown };
    assert.deepEqual(health.transparent_backgrounds, { status: 'available' });
  });

  test('the OpenAPI document, llms.txt and SKILL.md describe the field', async () => {
    const doc = (await (await fetch(`${h.url}/openapi.json`)).json()) as { components: { schemas: Record<string, { properties: Record<string, { enum?: string[]; default?: string; description?: string }> }> } };
    for (const name of ['TextToImageInput', 'EditInput']) {
      const bg = doc.components.schemas[name].properties.background;
      assert.deepEqual(bg.enum, ['auto', 'opaque', 'transparent'], name);
      assert.equal(bg.default, 'auto');
      assert.match(bg.description!, /matting model/);
    }
    assert.ok(doc.components.schemas.Image.properties.has_alpha);
    const llms = await (await fetch(`${h.url}/v1/models/black-forest-labs/flux-2-klein-4b/llms.txt`)).text();
    assert.match(llms, /### `background` \(string, optional\)/);
    assert.match(llms, /\*\*Options\*\*: `auto`, `opaque`, `transparent`/);
    assert.match(await (await fetch(`${h.url}/llms.txt`)).text(), /UNSUPPORTED_COMBINATION/);
    assert.match(await (await fetch(`${h.url}/.well-known/agent-skills/klein/SKILL.md`)).text(), /"background": "transparent"/);
  });
});

describe('transparent backgrounds on a server without matting weights', () => {
  let engine: ImagePipeline;
  let probed: Harness;
  let unprobed: Harness;
  const saved = { home: process.env.KLEIN_HOME, matting: process.env.KLEIN_MATTING_MODEL };
  before(async () => {
    // nothing in the model folder, the environment or the cache
    process.env.KLEIN_HOME = tempDir('klein-home-');
    delete process.env.KLEIN_MATTING_MODEL;
    const tiny = await realPipeline();
    const modelDir = modelFolderWithoutMatting(tiny.modelDir);
    await tiny.close();
    engine = await openPipeline({ target: cpuTarget(), model: modelDir, keepLoaded: true });
    probed = await startService({ pipeline: engine, matting: mattingProbe({ modelRoot: modelDir }) });
    // a scaled-out API cannot see its workers' files: the run itself fails
    unprobed = await startService({ pipeline: engine });
  });
  after(async () => {
    await probed.svc.close();
    await unprobed.svc.close();
    await engine.close();
    if (saved.home === undefined) delete process.env.KLEIN_HOME;
    else process.env.KLEIN_HOME = saved.home;
    if (saved.matting !== undefined) process.env.KLEIN_MATTING_MODEL = saved.matting;
  });

  test('refused at creation with 503 MATTING_UNAVAILABLE naming `klein pull --matting`; nothing stored', async () => {
    const before = await footprint(probed);
    const r = await probed.api('POST', T2I, { input: { prompt: 'a sticker', image_size: 'square', background: 'transparent' } });
    assert.equal(r.status, 503);
    assert.equal(r.json.code, 'MATTING_UNAVAILABLE');
    assert.match(r.json.message, /klein pull --matting/);
    assert.deepEqual(r.json.errors[0].loc, ['body', 'input', 'background']);
    assert.equal(r.headers.get('retry-after'), null);

    const openai = new OpenAI({ apiKey: probed.key, baseURL: `${probed.url}/v1`, maxRetries: 2 });
    const e = await openai.images.generate({ prompt: 'a sticker', size: '64x64' as never, background: 'transparent' }).catch((err: unknown) => err);
    assert.ok(e instanceof OpenAI.APIError);
    assert.deepEqual([e.status, e.code, e.type, e.param], [503, 'matting_unavailable', 'server_error', 'background']);
    assert.match(e.message, /klein pull --matting/);
    assert.deepEqual(await footprint(probed), before, 'nothing stored, and x-should-retry kept the client from retrying');

    // /v1/health tells operators and the playground beforehand; without a probe the server cannot know
    const health = async (x: Harness) => ((await (await fetch(`${x.url}/v1/health`)).json()) as { transparent_backgrounds: { status: string; message?: string } }).transparent_backgrounds;
    const p = await health(probed);
    assert.equal(p.status, 'unavailable');
    assert.match(p.message!, /klein pull --matting/);
    assert.deepEqual(await health(unprobed), { status: 'unknown' });
  });

  test('without the probe the run fails fast with failure_code MATTING_UNAVAILABLE, not billed; opaque runs are unaffected by the check', async () => {
    const r = await unprobed.api('POST', T2I, { input: { prompt: 'a sticker', image_size: { width: 64, height: 64 }, background: 'transparent' } }, { Prefer: 'wait=60' });
    assert.equal(r.status, 201);
    assert.equal(r.json.status_code, 'failed');
    assert.equal(r.json.failure_code, 'MATTING_UNAVAILABLE');
    assert.equal(r.json.failure_stage, 'preprocess');
    assert.match(r.json.failure_message, /klein pull --matting/);
    assert.equal(r.json.cost, '0.000');
    // OpenAI's route maps the failed run to the same 503
    const e = await new OpenAI({ apiKey: unprobed.key, baseURL: `${unprobed.url}/v1`, maxRetries: 0 }).images.generate({ prompt: 'a sticker', size: '64x64' as never, background: 'transparent' }).catch((err: unknown) => err);
    assert.ok(e instanceof OpenAI.APIError);
    assert.deepEqual([e.status, e.code], [503, 'matting_unavailable']);
    // the probe answers only for transparent requests: an opaque one runs as always
    const ok = await probed.api('POST', T2I, { input: { prompt: 'a sticker', image_size: { width: 64, height: 64 }, background: 'opaque', num_inference_steps: 1 } }, { Prefer: 'wait=60' });
    assert.equal(ok.json.status_code, 'succeeded', ok.json.failure_message);
    assert.equal(ok.json.output.images[0].has_alpha, false);
  });
});
