// The MCP tools, driven by the SDK's own client: over streamable HTTP on /mcp of a real server (API keys), and over
// stdio by spawning `klein mcp`. The real pipeline runs a tiny model; images come back as MCP image content, decoded.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import sharp from 'sharp';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { Store } from '../../src/service/store.ts';
import { type Harness, realPipeline, startService, tempDir } from './helpers.ts';

const ROOT = path.resolve(import.meta.dirname, '../..');

type Content = { type: string; text?: string; data?: string; mimeType?: string };
type ToolResult = { content: Content[]; isError?: boolean };

const images = (r: ToolResult) => r.content.filter((c) => c.type === 'image');
const summary = (r: ToolResult) => JSON.parse(r.content.find((c) => c.type === 'text')!.text!);
const errorText = (r: ToolResult) => {
  assert.equal(r.isError, true, JSON.stringify(r));
  return r.content.map((c) => c.text ?? '').join(' ');
};

async function decode(b64: string) {
  const meta = await sharp(Buffer.from(b64, 'base64')).metadata();
  return [meta.format, meta.width, meta.height];
}

async function httpClient(url: string, key: string): Promise<Client> {
  const client = new Client({ name: 'klein-test', version: '1.0.0' });
  await client.connect(new StreamableHTTPClientTransport(new URL(`${url}/mcp`), { requestInit: { headers: { authorization: `Bearer ${key}` } } }));
  return client;
}

describe('MCP over streamable HTTP (/mcp of klein serve)', () => {
  let h: Harness;
  let engine: ImagePipeline;
  let client: Client;
  before(async () => {
    engine = await realPipeline();
    h = await startService({ pipeline: engine });
    client = await httpClient(h.url, h.key);
  });
  after(async () => {
    await client.close();
    await h.svc.close();
    await engine.close();
  });

  test('lists the three tools with their input schemas', async () => {
    const { tools } = await client.listTools();
    assert.deepEqual(tools.map((t) => t.name).sort(), ['edit_image', 'generate_image', 'get_run']);
    const gen = tools.find((t) => t.name === 'generate_image')!;
    assert.deepEqual((gen.inputSchema.required ?? []).sort(), ['prompt']);
    assert.ok(gen.inputSchema.properties && 'size' in gen.inputSchema.properties && 'seed' in gen.inputSchema.properties);
    assert.deepEqual(tools.find((t) => t.name === 'edit_image')!.inputSchema.required?.sort(), ['images', 'prompt']);
  });

  test('generate_image: image content, URLs, progress notifications, and a run in the runs API', async () => {
    const progress: number[] = [];
    const r = (await client.callTool({ name: 'generate_image', arguments: { prompt: 'a red cube', size: '64x64', n: 2, seed: 11, output_format: 'webp' } }, undefined, {
      onprogress: (p) => progress.push(p.progress),
    })) as ToolResult;
    assert.notEqual(r.isError, true, JSON.stringify(r));
    const imgs = images(r);
    assert.equal(imgs.length, 2);
    for (const i of imgs) {
      assert.equal(i.mimeType, 'image/webp');
      assert.deepEqual(await decode(i.data!), ['webp', 64, 64]);
    }
    const s = summary(r);
    assert.equal(s.status, 'succeeded');
    assert.equal(s.seed, 11);
    assert.equal(s.cost, '0.028');
    assert.equal(s.images.length, 2);
    const file = await fetch(s.images[0].url);
    assert.equal(file.status, 200);
    assert.ok(Buffer.from(await file.arrayBuffer()).equals(Buffer.from(imgs[0].data!, 'base64')), 'the URL serves the returned image');
    // the tiny model's 4 denoising steps are reported, in order
    assert.ok(progress.length >= 4, `progress: ${progress}`);
    assert.deepEqual([...progress].sort((a, b) => a - b), progress);

    const run = await h.api('GET', `/v1/runs/${s.run_id}`);
    assert.equal(run.json.status_code, 'succeeded');
    assert.equal(run.json.model_id, 'black-forest-labs/flux-2-klein-4b');
    assert.deepEqual(run.json.metadata, { api: 'mcp' });
    assert.equal(run.json.cost, '0.028');
  });

  test('edit_image takes an image URL this server returned and a data URI; get_run returns the finished run', async () => {
    const gen = summary((await client.callTool({ name: 'generate_image', arguments: { prompt: 'a cat', size: '64x64', seed: 1 } })) as ToolResult);
    const other = await sharp({ create: { width: 80, height: 64, channels: 3, background: { r: 0, g: 0, b: 255 } } }).png().toBuffer();
    const r = (await client.callTool({ name: 'edit_image', arguments: { prompt: 'the cat on the blue', images: [gen.images[0].url, `data:image/png;base64,${other.toString('base64')}`], seed: 2 } })) as ToolResult;
    assert.notEqual(r.isError, true, JSON.stringify(r));
    // size defaults to the first image's
    assert.deepEqual(await decode(images(r)[0].data!), ['png', 64, 64]);
    const s = summary(r);
    assert.equal(s.model_id, 'black-forest-labs/flux-2-klein-4b/edit');

    const got = (await client.callTool({ name: 'get_run', arguments: { run_id: s.run_id } })) as ToolResult;
    assert.equal(summary(got).status, 'succeeded');
    assert.equal(images(got)[0].data, images(r)[0].data);
    const noImages = (await client.callTool({ name: 'get_run', arguments: { run_id: s.run_id, include_images: false } })) as ToolResult;
    assert.equal(images(noImages).length, 0);
    assert.match(summary(noImages).images[0].url, /\/v1\/files\//);
  });

  test('wait_s 0 returns the run unfinished; get_run with wait_s picks it up', async () => {
    const r = (await client.callTool({ name: 'generate_image', arguments: { prompt: 'later', size: '64x64', wait_s: 0 } })) as ToolResult;
    const s = summary(r);
    assert.ok(['queued', 'running'].includes(s.status), s.status);
    assert.equal(images(r).length, 0);
    assert.match(s.next, /get_run/);
    const done = (await client.callTool({ name: 'get_run', arguments: { run_id: s.run_id, wait_s: 60 } })) as ToolResult;
    assert.equal(summary(done).status, 'succeeded');
    assert.equal(images(done).length, 1);
  });

  test('bad input is a tool error naming the field; runs of other keys are not found; no key is 401', async () => {
    assert.match(errorText((await client.callTool({ name: 'generate_image', arguments: { prompt: 'x', size: '100x100' } })) as ToolResult), /VALIDATION_ERROR.*image_size/);
    assert.match(errorText((await client.callTool({ name: 'generate_image', arguments: { prompt: 'x', size: 'huge' } })) as ToolResult), /invalid size 'huge'/);
    assert.match(errorText((await client.callTool({ name: 'edit_image', arguments: { prompt: 'x', images: ['data:text/plain;base64,aGk='] } })) as ToolResult), /image_urls\.0: data URIs must be/);
    // the SDK validates arguments against the tool's schema
    assert.match(errorText((await client.callTool({ name: 'generate_image', arguments: { prompt: 'x', n: 9 } })) as ToolResult), /n/);
    assert.match(errorText((await client.callTool({ name: 'get_run', arguments: { run_id: 'nope' } })) as ToolResult), /RUN_NOT_FOUND/);

    const mine = summary((await client.callTool({ name: 'generate_image', arguments: { prompt: 'mine', size: '64x64' } })) as ToolResult);
    const stranger = await httpClient(h.url, h.newKey());
    try {
      assert.match(errorText((await stranger.callTool({ name: 'get_run', arguments: { run_id: mine.run_id } })) as ToolResult), /RUN_NOT_FOUND/);
    } finally {
      await stranger.close();
    }

    const res = await fetch(`${h.url}/mcp`, { method: 'POST', headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream' }, body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'tools/list' }) });
    assert.equal(res.status, 401);
    assert.equal(((await res.json()) as { code: string }).code, 'UNAUTHENTICATED');
    await assert.rejects(httpClient(h.url, 'kl_live_wrong'));
  });
});

describe('MCP over stdio (klein mcp)', () => {
  test('spawned klein mcp: generate_image and get_run; the run is stored in the data folder under the local key', async () => {
    const engine = await realPipeline();
    const modelDir = (engine as ImagePipeline & { modelDir: string }).modelDir;
    await engine.close();
    const data = tempDir('klein-mcp-');
    const transport = new StdioClientTransport({
      command: process.execPath,
      args: [path.join(ROOT, 'bin/klein.js'), 'mcp', '--model', modelDir, '--data', data],
      env: { ...process.env, KLEIN_LOG_LEVEL: 'silent' } as Record<string, string>,
      stderr: 'pipe',
    });
    let stderr = '';
    transport.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    const client = new Client({ name: 'klein-test', version: '1.0.0' });
    let runId: string;
    try {
      await client.connect(transport);
      const { tools } = await client.listTools();
      assert.deepEqual(tools.map((t) => t.name).sort(), ['edit_image', 'generate_image', 'get_run']);
      const r = (await client.callTool({ name: 'generate_image', arguments: { prompt: 'a blue sphere', size: '64x80', seed: 4 } }, undefined, { timeout: 120_000 })) as ToolResult;
      assert.notEqual(r.isError, true, `${JSON.stringify(r)}\n${stderr}`);
      assert.deepEqual(await decode(images(r)[0].data!), ['png', 64, 80]);
      const s = summary(r);
      runId = s.run_id;
      // the URL is served by the process's loopback listener
      const file = await fetch(s.images[0].url);
      assert.equal(file.status, 200);
      assert.deepEqual(await decode(Buffer.from(await file.arrayBuffer()).toString('base64')), ['png', 64, 80]);
      const got = (await client.callTool({ name: 'get_run', arguments: { run_id: runId } })) as ToolResult;
      assert.equal(summary(got).status, 'succeeded');
      assert.match(stderr, /klein mcp: .*MCP on stdio/);
    } finally {
      await client.close();
    }
    const store = Store.open(data);
    try {
      const run = store.getRun(runId)!;
      assert.equal(run.status, 'succeeded');
      assert.equal(store.keyById(run.key_id)?.name, 'klein mcp (stdio)');
    } finally {
      store.close();
    }
  });

  test('klein mcp refuses a wrong --api-key and a missing model folder with a usage error', async () => {
    const { spawnSync } = await import('node:child_process');
    const engine = await realPipeline();
    const modelDir = (engine as ImagePipeline & { modelDir: string }).modelDir;
    await engine.close();
    const bad = spawnSync(process.execPath, [path.join(ROOT, 'bin/klein.js'), 'mcp', '--model', modelDir, '--data', tempDir('klein-mcp-'), '--api-key', 'kl_live_nope'], { encoding: 'utf8', input: '' });
    assert.equal(bad.status, 2, bad.stderr);
    assert.match(bad.stderr, /--api-key \/ KLEIN_API_KEY: invalid or revoked API key/);
    assert.equal(bad.stdout, '', 'stdout is reserved for MCP messages');
    const noModel = spawnSync(process.execPath, [path.join(ROOT, 'bin/klein.js'), 'mcp', '--model', path.join(tempDir(), 'none'), '--data', tempDir('klein-mcp-')], { encoding: 'utf8', input: '' });
    assert.equal(noModel.status, 2, noModel.stderr);
    assert.equal(noModel.stdout, '');
  });
});
