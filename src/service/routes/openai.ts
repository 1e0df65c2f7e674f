// OpenAI-compatible images API: POST /v1/images/generations (JSON) and /v1/images/edits (multipart), so code written
// for OpenAI's images API runs against klein by changing its base URL and key. Every request is an ordinary klein run
// (same queue, pricing, ledger, storage and keys), awaited before answering; errors on these routes are in OpenAI's
// shape, {error: {message, type, param, code}}.
import { createRoute, z } from '@hono/zod-openapi';
import type { Context, MiddlewareHandler } from 'hono';
import sharp from 'sharp';
import { type App, type AppEnv, type Deps } from '../context.ts';
import { transparentPrompt } from '../../pipeline/background.ts';
import { BACKGROUND_DESCRIPTION, BACKGROUNDS, MATTING_UNAVAILABLE, UNSUPPORTED_COMBINATION } from '../background.ts';
import { ApiError, type FieldError } from '../errors.ts';
import { LIMITS, SIZE_RULE } from '../../pipeline/limits.ts';
import { findModel, type ModelEntry, servedModel } from '../models.ts';
import type { StoredOutput } from '../present.ts';
import { formatUsd } from '../pricing.ts';
import type { KeyRow, RunRow } from '../store.ts';
import { isoToMs } from '../time.ts';
import { awaitRun, submitRun, takeCreateToken, type RunDeps } from '../submit.ts';
import { LORAS_DESCRIPTION, LoraWeight } from '../loras.ts';

/** OpenAI's own model names all mean "the model this server runs", so existing code runs without edits. */
const OPENAI_MODEL = /^(gpt-image|dall-e|chatgpt-image)/;
const SIZE = /^(\d{1,5})x(\d{1,5})$/;

/** A parameter error: 400 on these routes, `param` naming the OpenAI field. */
const paramError = (param: string, message: string, code = 'invalid_value') =>
  new ApiError(400, code, message, [{ loc: ['body', param], message, type: code }], { 'x-should-retry': 'false' });

/** Runflow field names (error locations from the klein schemas) → the OpenAI parameter the client sent. */
const PARAM_OF: Record<string, string> = { image_size: 'size', num_images: 'n', image_urls: 'image', output_format: 'output_format', prompt: 'prompt', seed: 'seed' };

function paramOf(errors: FieldError[] | null | undefined): string | null {
  const loc = errors?.[0]?.loc;
  if (!loc) return null;
  const names = loc.filter((p): p is string => typeof p === 'string' && !['body', 'input', 'query', 'header', 'path'].includes(p));
  return names.length ? (PARAM_OF[names[0]] ?? names[0]) : null;
}

function openAIType(status: number): string {
  if (status === 401) return 'authentication_error';
  if (status === 403) return 'permission_error';
  if (status === 404) return 'not_found_error';
  if (status === 429) return 'rate_limit_error';
  if (status >= 500) return 'server_error';
  return 'invalid_request_error';
}

const CODE_OF: Record<string, string> = {
  UNAUTHENTICATED: 'invalid_api_key', RATE_LIMITED: 'rate_limit_exceeded', MODEL_NOT_FOUND: 'model_not_found', NOT_FOUND: 'not_found',
  VALIDATION_ERROR: 'invalid_value', BAD_REQUEST: 'invalid_request', INTERNAL: 'internal_error',
};

/**
 * Rewrites the service's error envelope ({code, message, errors}) into OpenAI's on /v1/images/*: auth and rate-limit
 * errors come from the service's middleware, so this must wrap it (registered before it). 422 becomes 400, as
 * OpenAI answers parameter errors, except for a transparent background in jpeg: klein's issue asks for 422 there on
 * every API (OpenAI itself says 400), so clients see one status for one mistake.
 */
export const openAIErrors: MiddlewareHandler<AppEnv> = async (c, next) => {
  await next();
  const res = c.res;
  if (res.status < 400 || !res.headers.get('content-type')?.includes('application/json')) return;
  const body = (await res.clone().json().catch(() => null)) as { code?: string; message?: string; errors?: FieldError[] | null } | null;
  if (!body || typeof body.code !== 'string' || typeof body.message !== 'string') return;
  const status = res.status === 422 && body.code !== UNSUPPORTED_COMBINATION ? 400 : res.status;
  const code = CODE_OF[body.code] ?? body.code.toLowerCase();
  const param = paramOf(body.errors);
  // a klein schema's field error says more than its summary ("invalid input for …"); name the OpenAI field
  const message = body.code === 'VALIDATION_ERROR' && body.errors?.[0] ? `Invalid '${param ?? 'body'}': ${body.errors[0].message}` : body.message;
  const headers = new Headers(res.headers);
  headers.delete('content-length');
  c.res = undefined as unknown as Response; // replace, not merge: Hono would copy the old headers back
  c.res = new Response(JSON.stringify({ error: { message, type: openAIType(status), param, code } }), { status, headers });
};

function pickModel(cfg: Deps['cfg'], name: string | null | undefined, kind: ModelEntry['kind']): ModelEntry {
  const wanted = name ?? '';
  const m = !wanted || OPENAI_MODEL.test(wanted) ? servedModel(cfg, kind) : findModel(cfg, wanted);
  if (!m) throw new ApiError(404, 'model_not_found', `The model '${wanted}' is not served here; use a model id from GET /v1/models (or an OpenAI image model name, which means the served model)`, [{ loc: ['body', 'model'], message: 'unknown model', type: 'model_not_found' }], { 'x-should-retry': 'false' });
  // the text-to-image id on the edits route (and the reverse) means the same variant's other entry
  return m.kind === kind ? m : servedModel(cfg, kind);
}

/** `WxH` → {width, height} (the klein schema checks the limits); `auto` or nothing → the model's choice. */
function parseSize(size: string | null | undefined, kind: ModelEntry['kind']): { width: number; height: number } | undefined {
  if (!size || size === 'auto') return kind === 'edit' ? undefined : { width: 1024, height: 1024 };
  const m = SIZE.exec(size);
  if (!m) throw paramError('size', `Invalid size '${size}': use 'WIDTHxHEIGHT' (e.g. '1024x1024'; ${SIZE_RULE}) or 'auto'`);
  return { width: Number(m[1]), height: Number(m[2]) };
}

// Fields OpenAI defines that klein accepts. `quality`, `style`, `moderation`, `user` and `input_fidelity` change
// nothing here (one quality level, no moderation model); unknown fields are refused, as OpenAI refuses them.
const common = {
  prompt: z.string().openapi({ description: 'What to draw (or, for edits, what to change).' }),
  model: z.string().nullish().openapi({ description: 'A model id from GET /v1/models. OpenAI image model names (`gpt-image-1`, `dall-e-3`, …) mean the model this server runs, as does leaving it out.' }),
  n: z.coerce.number().int().min(1).max(LIMITS.maxImages).nullish().openapi({ description: `Images, 1–${LIMITS.maxImages}; image i uses seed + i.` }),
  size: z.string().nullish().openapi({ description: `\`WIDTHxHEIGHT\` (${SIZE_RULE}) or \`auto\` (1024x1024; for edits, the first image's aspect at up to 1 MP).`, example: '1024x1024' }),
  response_format: z.enum(['b64_json', 'url']).nullish().openapi({ description: '`b64_json` (default) or `url` (a signed, expiring URL of the stored image).' }),
  output_format: z.enum(['png', 'jpeg', 'webp']).nullish().openapi({ description: 'Default png.' }),
  output_compression: z.coerce.number().int().min(0).max(100).nullish().openapi({ description: 'jpeg/webp quality 0–100 (default: the encoder default).' }),
  seed: z.coerce.number().int().min(0).max(LIMITS.maxSeed).nullish().openapi({ description: 'klein extension: the random seed (random if omitted).' }),
  background: z.enum(BACKGROUNDS).nullish().openapi({ description: `${BACKGROUND_DESCRIPTION} The response echoes the background of the images.` }),
  quality: z.enum(['auto', 'low', 'medium', 'high', 'standard', 'hd']).nullish().openapi({ description: 'Accepted; no effect.' }),
  moderation: z.enum(['auto', 'low']).nullish().openapi({ description: 'Accepted; klein serve runs no moderation model.' }),
  user: z.string().nullish().openapi({ description: 'Kept in the run metadata.' }),
  stream: z.union([z.boolean(), z.enum(['true', 'false'])]).nullish().openapi({ description: 'Streaming is not supported; only false.' }),
  partial_images: z.coerce.number().int().min(0).max(0).nullish().openapi({ description: 'Only 0 (no streaming).' }),
  loras: z.union([z.array(LoraWeight).max(LIMITS.maxLoras), z.string().max(64 * 1024)]).nullish().openapi({ description: `klein extension: ${LORAS_DESCRIPTION} In a multipart edit, the same list as a JSON string.` }),
};

export const GenerationsBody = z.object({ ...common, style: z.enum(['vivid', 'natural']).nullish().openapi({ description: 'Accepted; no effect.' }) }).strict().openapi('OpenAIImageGenerationRequest');
export const EditsBody = z
  .object({
    ...common,
    input_fidelity: z.enum(['high', 'low']).nullish().openapi({ description: 'Accepted; no effect.' }),
    image: z.union([z.string(), z.array(z.string())]).openapi({ type: 'string', format: 'binary', description: 'The image(s) to edit: `image` or `image[]`, 1–4 PNG, JPEG or WebP files.' }),
  })
  .strict()
  .openapi('OpenAIImageEditRequest');
type OpenAIRequest = z.infer<typeof GenerationsBody> & { input_fidelity?: unknown };

const ImagesResponse = z.object({
  created: z.number().int(),
  data: z.array(z.object({ b64_json: z.string().optional(), url: z.string().optional(), revised_prompt: z.string().optional().openapi({ description: 'With a transparent background: the prompt the model drew, with its plain-backdrop hint.' }) })),
  output_format: z.enum(['png', 'jpeg', 'webp']),
  size: z.string(),
  quality: z.string(),
  background: z.enum(['opaque', 'transparent']).openapi({ description: 'The background of the images: `transparent` (RGBA png/webp) or `opaque`.' }),
  usage: z.object({
    input_tokens: z.number().int(), output_tokens: z.number().int(), total_tokens: z.number().int(),
    input_tokens_details: z.object({ image_tokens: z.number().int() }),
    cost_usd: z.string().openapi({ description: 'klein extension: what the run was billed.' }),
  }).openapi({ description: 'Tokens are 16×16-pixel image patches (the transformer\'s image tokens); text tokens are not counted. Billing is per megapixel: `cost_usd`.' }),
  run_id: z.string().openapi({ description: 'klein extension: the run (GET /v1/runs/{id}).' }),
  seed: z.number().int().openapi({ description: 'klein extension: the seed used.' }),
}).openapi('OpenAIImagesResponse');

const OpenAIError = z.object({ error: z.object({ message: z.string(), type: z.string(), param: z.string().nullable(), code: z.string().nullable() }) }).openapi('OpenAIError');
const errorDocs = Object.fromEntries(
  [[400, 'Invalid parameter'], [401, 'Missing or invalid API key'], [404, 'Unknown model'], [409, 'The run was cancelled'], [422, 'background transparent with output_format jpeg (unsupported_combination): jpeg has no alpha channel'], [429, 'Rate limited (Retry-After)'], [500, 'The generation failed (not billed)'], [503, 'background transparent, but this server has no matting weights (matting_unavailable)'], [504, 'Not finished in time; the run goes on (see its id)']]
    .map(([s, d]) => [s, { description: d as string, content: { 'application/json': { schema: OpenAIError } } }]),
);

function firstProblem(issues: readonly { path: PropertyKey[]; message: string; code: string }[]) {
  const i = issues[0];
  const param = i.path.length ? String(i.path[0]) : null;
  if (i.code === 'unrecognized_keys') {
    const keys = (i as unknown as { keys: string[] }).keys;
    return paramError(keys[0], `Unknown parameter: '${keys[0]}'.`, 'unknown_parameter');
  }
  if (i.code === 'invalid_type' && param && /received undefined/.test(i.message)) return paramError(param, `Missing required parameter: '${param}'.`, 'missing_required_parameter');
  return paramError(param ?? 'body', `Invalid '${param ?? 'body'}': ${i.message}`);
}

/** `loras` as a multipart text field: a JSON list, checked by the klein schema afterwards. */
function parseLorasField(v: string): unknown {
  try {
    return JSON.parse(v);
  } catch {
    throw paramError('loras', 'loras must be a JSON list of {"path": …, "scale": …}');
  }
}

/** The klein input and options of a validated OpenAI request (references added by the edits route). */
function toKlein(cfg: Deps['cfg'], req: OpenAIRequest, kind: ModelEntry['kind']) {
  if (req.stream === true || req.stream === 'true') throw paramError('stream', 'Streaming is not supported by klein serve; omit stream or set it to false', 'unsupported_value');
  const format = req.output_format ?? 'png';
  if (req.output_compression != null && format === 'png') throw paramError('output_compression', 'output_compression applies to jpeg and webp only', 'unsupported_value');
  const size = parseSize(req.size, kind);
  const input: Record<string, unknown> = {
    prompt: req.prompt,
    num_images: req.n ?? 1,
    output_format: format,
    ...(req.background ? { background: req.background } : {}),
    ...(size ? { image_size: size } : {}),
    ...(req.seed != null ? { seed: req.seed } : {}),
    ...(req.loras != null ? { loras: typeof req.loras === 'string' ? parseLorasField(req.loras) : req.loras } : {}),
  };
  return {
    model: pickModel(cfg, req.model, kind),
    input,
    // jpeg/webp encoders take 1–100; OpenAI's 0 (smallest) maps to 1
    opts: { outputQuality: req.output_compression != null ? Math.max(1, req.output_compression) : undefined, metadata: { api: 'openai', ...(req.user ? { user: req.user } : {}) } },
    responseFormat: req.response_format ?? 'b64_json',
  };
}

/** Create the run, wait for it, and answer in OpenAI's shape (or its error). */
async function runAndRespond(c: Context<AppEnv>, deps: Deps, k: ReturnType<typeof toKlein>, refTokens: number): Promise<Response> {
  const key: KeyRow = c.get('key');
  takeCreateToken(deps, key);
  const { run } = await submitRun(deps as RunDeps, key, k.model, k.input, k.opts);
  c.header('X-Klein-Run-Id', run.id);
  const done = await awaitRun(deps, run.id, deps.cfg.maxWaitS, c.req.raw.signal);
  return c.json(openAIResult(done, deps, deps.baseUrl(c), k.responseFormat, refTokens), 200);
}

/** The OpenAI response of a finished run; the error (not billed, not worth retrying) of any other state. */
export function openAIResult(r: RunRow, deps: Pick<Deps, 'files'>, baseUrl: string, format: 'b64_json' | 'url', refTokens: number) {
  const noRetry = { 'x-should-retry': 'false' };
  if (r.status === 'failed') {
    if (r.failure_code === MATTING_UNAVAILABLE) throw new ApiError(503, MATTING_UNAVAILABLE, `run ${r.id} failed (not billed): ${r.failure_message ?? 'no matting weights'}`, [{ loc: ['body', 'background'], message: r.failure_message ?? '', type: 'matting_unavailable' }], noRetry);
    const input = r.failure_code?.startsWith('INPUT_') ?? false;
    throw new ApiError(input ? 400 : 500, (r.failure_code ?? 'generation_failed').toLowerCase(), `run ${r.id} failed (not billed): ${r.failure_message ?? 'unknown error'}`, input ? [{ loc: ['body', 'image'], message: r.failure_message ?? '', type: 'invalid_image' }] : null, noRetry);
  }
  if (r.status === 'cancelled') throw new ApiError(409, 'run_cancelled', `run ${r.id} was cancelled (not billed)`, null, noRetry);
  if (r.status !== 'succeeded') throw new ApiError(504, 'timeout', `run ${r.id} did not finish within the wait limit; it goes on: GET /v1/runs/${r.id}`, null, noRetry);
  const out = JSON.parse(r.output!) as StoredOutput;
  const first = out.images[0];
  // OpenAI's field for "the prompt the model actually drew": a transparent request gets the plain-backdrop hint
  const revised = out.background === 'transparent' ? { revised_prompt: transparentPrompt(out.prompt) } : {};
  const patches = out.images.reduce((s, i) => s + (i.width / 16) * (i.height / 16), 0);
  return {
    created: Math.floor(isoToMs(r.created_at) / 1000),
    data: out.images.map((img) => ({ ...(format === 'url' ? { url: deps.files.url(baseUrl, r.id, img.file) } : { b64_json: deps.files.read(r.id, img.file).toString('base64') }), ...revised })),
    output_format: (first.content_type.split('/')[1] ?? 'png') as 'png' | 'jpeg' | 'webp',
    size: `${first.width}x${first.height}`,
    quality: 'auto',
    background: out.background ?? 'opaque',
    usage: {
      input_tokens: refTokens, output_tokens: patches, total_tokens: refTokens + patches,
      input_tokens_details: { image_tokens: refTokens },
      cost_usd: formatUsd(r.cost_micros ?? 0),
    },
    run_id: r.id,
    seed: out.seed,
  };
}

/** Form fields arrive as strings or files; `image[]` and `image` both name the images. */
async function readEditForm(c: Context<AppEnv>, deps: Deps): Promise<{ fields: Record<string, unknown>; images: File[] }> {
  const type = c.req.header('content-type') ?? '';
  if (!type.includes('multipart/form-data')) throw paramError('image', 'POST /v1/images/edits takes multipart/form-data with the image file(s) in `image` or `image[]`', 'invalid_request');
  // four images at the input size limit, plus room for the encoding and the other fields
  const cap = LIMITS.maxRefs * deps.cfg.inputs.maxBytes + 1024 * 1024;
  if (Number(c.req.header('content-length') ?? 0) > cap) throw new ApiError(413, 'request_too_large', `the request is larger than ${cap} bytes`);
  let form: Record<string, unknown>;
  try {
    form = await c.req.parseBody({ all: true });
  } catch {
    throw paramError('body', 'the multipart body could not be parsed', 'invalid_request');
  }
  const images: File[] = [];
  const fields: Record<string, unknown> = {};
  for (const [name, v] of Object.entries(form)) {
    const values = Array.isArray(v) ? v : [v];
    if (name === 'image' || name === 'image[]') {
      for (const x of values) {
        if (!(x instanceof File)) throw paramError('image', `'${name}' must be an uploaded file, not a text field`);
        images.push(x);
      }
    } else if (name === 'mask' || name === 'mask[]') {
      throw paramError('mask', 'masks are not supported: klein edits the whole image from the prompt', 'unsupported_value');
    } else {
      if (values.some((x) => x instanceof File)) throw paramError(name, `'${name}' must be a text field, not a file`);
      fields[name] = values.length === 1 ? values[0] : values;
    }
  }
  return { fields, images };
}

/** Uploaded files → data: URIs of their sniffed format, and their image tokens (16×16 patches). */
async function imagesToDataUris(images: File[]): Promise<{ uris: string[]; tokens: number }> {
  if (images.length === 0) throw paramError('image', 'at least one image is required (`image` or `image[]`)', 'missing_required_parameter');
  if (images.length > LIMITS.maxRefs) throw paramError('image', `at most ${LIMITS.maxRefs} images, got ${images.length}`);
  const uris: string[] = [];
  let tokens = 0;
  for (const [i, f] of images.entries()) {
    const bytes = Buffer.from(await f.arrayBuffer());
    const meta = await sharp(bytes).metadata().catch(() => null);
    if (!meta?.format || !['png', 'jpeg', 'webp'].includes(meta.format) || !meta.width || !meta.height) {
      throw paramError('image', `image ${i} (${f.name || 'unnamed'}) is not a PNG, JPEG or WebP image${meta?.format ? ` (it is ${meta.format})` : ''}`, 'invalid_image');
    }
    tokens += Math.ceil(meta.width / 16) * Math.ceil(meta.height / 16);
    uris.push(`data:image/${meta.format};base64,${bytes.toString('base64')}`);
  }
  return { uris, tokens };
}

export function registerOpenAI(app: App, deps: Deps): void {
  app.openAPIRegistry.registerPath(createRoute({
    method: 'post', path: '/v1/images/generations', operationId: 'createImage', tags: ['OpenAI-compatible'], summary: 'Create images (OpenAI images API)',
    description: 'OpenAI-compatible text to image. Creates a klein run (listed in GET /v1/runs, billed like any run) and waits for it. Errors use OpenAI\'s shape.',
    security: [{ bearer: [] }],
    request: { body: { content: { 'application/json': { schema: GenerationsBody } }, required: true } },
    responses: { 200: { description: 'The images', content: { 'application/json': { schema: ImagesResponse } } }, ...errorDocs },
  }));
  app.post('/v1/images/generations', async (c) => {
    let body: unknown;
    try {
      body = await c.req.json();
    } catch {
      throw paramError('body', 'the request body must be a JSON object', 'invalid_json');
    }
    const parsed = GenerationsBody.safeParse(body);
    if (!parsed.success) throw firstProblem(parsed.error.issues);
    return runAndRespond(c, deps, toKlein(deps.cfg, parsed.data, 'text-to-image'), 0);
  });

  app.openAPIRegistry.registerPath(createRoute({
    method: 'post', path: '/v1/images/edits', operationId: 'createImageEdit', tags: ['OpenAI-compatible'], summary: 'Edit images (OpenAI images API)',
    description: 'OpenAI-compatible editing with 1–4 reference images (`image` or `image[]`). Masks are not supported. Creates a klein edit run and waits for it.',
    security: [{ bearer: [] }],
    request: { body: { content: { 'multipart/form-data': { schema: EditsBody } }, required: true } },
    responses: { 200: { description: 'The images', content: { 'application/json': { schema: ImagesResponse } } }, ...errorDocs },
  }));
  app.post('/v1/images/edits', async (c) => {
    const { fields, images } = await readEditForm(c, deps);
    const parsed = EditsBody.omit({ image: true }).safeParse(fields);
    if (!parsed.success) throw firstProblem(parsed.error.issues);
    const k = toKlein(deps.cfg, parsed.data, 'edit');
    const refs = await imagesToDataUris(images);
    k.input.image_urls = refs.uris;
    return runAndRespond(c, deps, k, refs.tokens);
  });
}
