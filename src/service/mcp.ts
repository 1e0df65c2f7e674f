// The MCP server: tools `generate_image`, `edit_image` and `get_run` for agents, on the same runs, queue, pricing and
// storage as the HTTP APIs. Served over streamable HTTP on /mcp of `klein serve` (same API keys; stateless, one MCP
// server per request, so the key of each request is the key its tools act as) and over stdio by `klein mcp`.
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { WebStandardStreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/webStandardStreamableHttp.js';
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js';
import { z } from 'zod';
import { authenticate } from './auth.ts';
import type { App, Deps } from './context.ts';
import { BACKGROUNDS } from './background.ts';
import { ApiError } from './errors.ts';
import { isPresetName, LIMITS, PRESET_NAMES, SIZE_RULE } from '../pipeline/limits.ts';
import { type ModelEntry, servedModel } from './models.ts';
import { presentRun, type StoredOutput } from './present.ts';
import type { RunEvent } from './queue.ts';
import type { KeyRow, RunRow } from './store.ts';
import { TERMINAL } from './store.ts';
import { submitRun, takeCreateToken, type RunDeps } from './submit.ts';

export const MCP_VERSION = '0.1.0';

/** What the tools act with: the service parts, the key they act as, and the origin for image URLs. */
export interface McpContext {
  deps: RunDeps;
  key: KeyRow;
  baseUrl: string;
}

/**
 * MCP clients time a request out after 60 s by default, so a tool waits less than that and otherwise returns the
 * run's state; `get_run` with `wait_s` picks up from there. Progress notifications go out meanwhile.
 */
const DEFAULT_WAIT_S = 50;

const common = {
  prompt: z.string().min(1).describe('What to draw, or for edit_image what to change.'),
  size: z.string().optional().describe(`"WIDTHxHEIGHT" (${SIZE_RULE}) or a preset: ${PRESET_NAMES.join(', ')}. Default: 1024x768 for generate_image, the first image's aspect at up to 1 MP for edit_image.`),
  n: z.number().int().min(1).max(LIMITS.maxImages).optional().describe(`Number of images, 1–${LIMITS.maxImages} (image i uses seed + i). Default 1.`),
  seed: z.number().int().min(0).max(LIMITS.maxSeed).optional().describe('Random seed; random if omitted. The result reports it.'),
  output_format: z.enum(['png', 'jpeg', 'webp']).optional().describe('Default png.'),
  background: z.enum(BACKGROUNDS).optional().describe('transparent: the subject cut out on a transparent background (RGBA png or webp; not jpeg), by a matting model after generation. opaque or auto (default): the image as drawn.'),
  loras: z.array(z.object({ path: z.string().min(1), scale: z.number().min(-LIMITS.maxLoraScale).max(LIMITS.maxLoraScale).optional() })).max(LIMITS.maxLoras).optional().describe(`Up to ${LIMITS.maxLoras} FLUX.2 [klein] LoRAs: path = a Hub reference owner/name[/file.safetensors], an https URL or a file in the server's LoRA folder; scale default 1. Costs more per megapixel.`),
  wait_s: z.number().int().min(0).max(300).optional().describe(`Seconds to wait for the images (default ${DEFAULT_WAIT_S}); when the run is not done by then, call get_run with its run_id.`),
};

const text = (t: string): CallToolResult['content'][number] => ({ type: 'text', text: t });
const toolError = (message: string): CallToolResult => ({ isError: true, content: [text(message)] });

/** The service's errors become tool errors the model can read and act on (field names included). */
function asToolError(e: unknown): CallToolResult {
  if (e instanceof ApiError) {
    const details = e.errors?.map((f) => `${f.loc.filter((p) => p !== 'body' && p !== 'input').join('.')}: ${f.message}`).join('; ');
    return toolError(`${e.code}: ${e.message}${details ? ` (${details})` : ''}`);
  }
  throw e;
}

function sizeInput(size: string | undefined): Record<string, unknown> {
  if (!size || size === 'auto') return {};
  const m = /^(\d{1,5})x(\d{1,5})$/.exec(size);
  if (m) return { image_size: { width: Number(m[1]), height: Number(m[2]) } };
  if (isPresetName(size)) return { image_size: size };
  throw new ApiError(422, 'VALIDATION_ERROR', `invalid size '${size}': use WIDTHxHEIGHT or one of ${PRESET_NAMES.join(', ')}`);
}

/**
 * An image this server made, named by its signed URL, is read from storage: the URL points at this very server, which
 * the input fetcher's SSRF guard rightly refuses to call (loopback), and chaining generate → edit should just work.
 */
function ownFileAsDataUri(ctx: McpContext, ref: string): string {
  let u: URL;
  try {
    u = new URL(ref);
  } catch {
    return ref;
  }
  const m = /^\/v1\/files\/([^/]+)\/([^/]+)$/.exec(u.pathname);
  if (!m || !['http:', 'https:'].includes(u.protocol)) return ref;
  const r = ctx.deps.files.resolve(m[1], m[2], u.searchParams.get('expires') ?? undefined, u.searchParams.get('signature') ?? undefined);
  if (!('path' in r)) return ref;
  const type = m[2].endsWith('.jpg') ? 'image/jpeg' : m[2].endsWith('.webp') ? 'image/webp' : 'image/png';
  return `data:${type};base64,${ctx.deps.files.read(m[1], m[2]).toString('base64')}`;
}

/** The run's state as text, and each image as MCP image content when it succeeded. */
export function runContent(ctx: McpContext, r: RunRow, withImages = true): CallToolResult {
  const pub = presentRun(r, { files: ctx.deps.files, baseUrl: ctx.baseUrl });
  const summary = {
    run_id: r.id, model_id: r.model_id, status: r.status, progress: pub.progress, cost: pub.cost, seed: r.seed,
    images: pub.output?.images.map((i) => ({ url: i.url, width: i.width, height: i.height, content_type: i.content_type, ...(i.has_alpha ? { has_alpha: true } : {}) })) ?? [],
    ...(pub.output?.prompt_truncated ? { prompt_truncated: true } : {}),
    ...(r.status === 'failed' ? { failure_code: r.failure_code, failure_message: r.failure_message } : {}),
    ...(!TERMINAL.has(r.status) ? { next: `not finished yet: call get_run with run_id ${r.id} (and wait_s)` } : {}),
  };
  const content: CallToolResult['content'] = [];
  if (withImages && r.status === 'succeeded' && r.output) {
    const out = JSON.parse(r.output) as StoredOutput;
    if (!out.expired) for (const img of out.images) content.push({ type: 'image', data: ctx.deps.files.read(r.id, img.file).toString('base64'), mimeType: img.content_type });
  }
  content.push(text(JSON.stringify(summary, null, 2)));
  return { content, ...(r.status === 'failed' ? { isError: true } : {}) };
}

type Extra = { _meta?: { progressToken?: string | number }; sendNotification: (n: { method: 'notifications/progress'; params: { progressToken: string | number; progress: number; total: number; message?: string } }) => Promise<void>; signal: AbortSignal };

/** Wait for a run, forwarding its progress as MCP progress notifications when the client asked for them. */
async function waitWithProgress(ctx: McpContext, id: string, waitS: number, extra: Extra): Promise<RunRow> {
  const token = extra._meta?.progressToken;
  // MCP requires progress to increase; the pipeline's stages can step back (a component loads between stages)
  let last = -1;
  const on = (rid: string, e: RunEvent) => {
    if (rid !== id || e.type !== 'progress' || token === undefined || e.progress.percent <= last) return;
    const p = e.progress;
    last = p.percent;
    void extra.sendNotification({ method: 'notifications/progress', params: { progressToken: token, progress: p.percent, total: 100, message: p.step !== undefined ? `${p.stage} ${p.step}/${p.total}` : p.stage } }).catch(() => undefined);
  };
  ctx.deps.queue.on('event', on);
  try {
    return await ctx.deps.queue.waitFor(id, waitS * 1000);
  } finally {
    ctx.deps.queue.off('event', on);
  }
}

async function createAndWait(ctx: McpContext, kind: ModelEntry['kind'], input: Record<string, unknown>, waitS: number | undefined, extra: Extra): Promise<CallToolResult> {
  try {
    takeCreateToken(ctx.deps, ctx.key);
    const { run } = await submitRun(ctx.deps, ctx.key, servedModel(ctx.deps.cfg, kind), input, { metadata: { api: 'mcp' } });
    return runContent(ctx, await waitWithProgress(ctx, run.id, waitS ?? DEFAULT_WAIT_S, extra));
  } catch (e) {
    return asToolError(e);
  }
}

export function createMcpServer(ctx: McpContext): McpServer {
  const title = servedModel(ctx.deps.cfg, 'text-to-image').title;
  const server = new McpServer({ name: 'klein', version: MCP_VERSION }, { instructions: 'FLUX.2 [klein] image generation. generate_image draws from a prompt; edit_image changes or combines 1–4 images (URLs or data: URIs, including image URLs this server returned). Both wait for the images; when a result says it is not finished, call get_run with its run_id.' });

  server.registerTool('generate_image', {
    title: 'Generate an image',
    description: `Text to image with ${title}. Returns the images and their (signed, expiring) URLs, the seed and the cost.`,
    inputSchema: common,
    annotations: { readOnlyHint: false, openWorldHint: false },
  }, async (a, extra) => {
    try {
      const input = { prompt: a.prompt, ...sizeInput(a.size), ...(a.n ? { num_images: a.n } : {}), ...(a.seed !== undefined ? { seed: a.seed } : {}), ...(a.output_format ? { output_format: a.output_format } : {}), ...(a.background ? { background: a.background } : {}), ...(a.loras?.length ? { loras: a.loras } : {}) };
      return await createAndWait(ctx, 'text-to-image', input, a.wait_s, extra as Extra);
    } catch (e) {
      return asToolError(e);
    }
  });

  server.registerTool('edit_image', {
    title: 'Edit images',
    description: `Edit an image, or combine up to ${LIMITS.maxRefs} reference images, following the prompt (${title}). Images are https URLs, data: URIs, or image URLs this server returned.`,
    inputSchema: { ...common, images: z.array(z.string().min(1)).min(1).max(LIMITS.maxRefs).describe(`1–${LIMITS.maxRefs} images: https URLs, data: URIs (PNG, JPEG, WebP) or URLs from earlier results.`) },
    annotations: { readOnlyHint: false, openWorldHint: true },
  }, async (a, extra) => {
    try {
      const input = { prompt: a.prompt, image_urls: a.images.map((u) => ownFileAsDataUri(ctx, u)), ...sizeInput(a.size), ...(a.n ? { num_images: a.n } : {}), ...(a.seed !== undefined ? { seed: a.seed } : {}), ...(a.output_format ? { output_format: a.output_format } : {}), ...(a.background ? { background: a.background } : {}), ...(a.loras?.length ? { loras: a.loras } : {}) };
      return await createAndWait(ctx, 'edit', input, a.wait_s, extra as Extra);
    } catch (e) {
      return asToolError(e);
    }
  });

  server.registerTool('get_run', {
    title: 'Get a run',
    description: 'The state of a run (queued, running, succeeded, failed, cancelled) with its images when it succeeded. wait_s waits for it to finish.',
    inputSchema: {
      run_id: z.string().min(1).describe('The run_id of an earlier result.'),
      wait_s: z.number().int().min(0).max(300).optional().describe('Seconds to wait for the run to finish (default 0).'),
      include_images: z.boolean().optional().describe('Return the images as image content (default true); URLs are always listed.'),
    },
    annotations: { readOnlyHint: true, openWorldHint: false },
  }, async (a, extra) => {
    const r = ctx.deps.store.getRun(a.run_id);
    if (!r || (ctx.key.is_admin !== 1 && r.key_id !== ctx.key.id)) return toolError(`RUN_NOT_FOUND: run ${a.run_id} not found`);
    const now = a.wait_s ? await waitWithProgress(ctx, r.id, a.wait_s, extra as Extra) : r;
    return runContent(ctx, now, a.include_images ?? true);
  });

  return server;
}

/** Inline images of four outputs plus four references can be large; the SDK's 4 MiB default would refuse them. */
const maxBody = (deps: Deps) => LIMITS.maxRefs * Math.ceil((deps.cfg.inputs.maxBytes * 4) / 3) + 1024 * 1024;

/** Streamable HTTP on /mcp, authenticated with the service's API keys (Bearer), stateless. */
export function registerMcp(app: App, deps: Deps): void {
  app.all('/mcp', async (c) => {
    const key = authenticate(deps.store, c.req.header('authorization'));
    const rl = deps.limiter.take(`all:${key.id}`, deps.cfg.rateLimit.requestsPerMinute);
    if (!rl.ok) throw new ApiError(429, 'RATE_LIMITED', `Rate limit exceeded: ${deps.cfg.rateLimit.requestsPerMinute} requests per minute for this key; retry in ${rl.retryAfterS} s`, null, { 'Retry-After': String(rl.retryAfterS) });
    const server = createMcpServer({ deps, key, baseUrl: deps.baseUrl(c) });
    const transport = new WebStandardStreamableHTTPServerTransport({ sessionIdGenerator: undefined, maxRequestBodySize: maxBody(deps) });
    await server.connect(transport);
    return transport.handleRequest(c.req.raw);
  });
}
