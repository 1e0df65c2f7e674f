// Runs: create (any model path, greedy), get, list with cursor pagination, statuses, server-sent events, cancel.
import { createRoute, z } from '@hono/zod-openapi';
import type { Context } from 'hono';
import { streamSSE } from 'hono/streaming';
import { type App, type AppEnv, type Deps, route } from '../context.ts';
import { ApiError, fieldError, notFound, validation, zodIssues } from '../errors.ts';
import { requireKnownModel, requireModel, servedModels } from '../models.ts';
import { presentRun } from '../present.ts';
import { type RunRow, RUN_STATUSES, type RunStatus, TERMINAL } from '../store.ts';
import { isoNow, sha256Hex } from '../time.ts';
import { CreateRunBody, errorResponses, ProgressSchema, RunListSchema, RunSchema } from '../schemas.ts';
import type { RunEvent } from '../queue.ts';
import { submitRun, takeCreateToken } from '../submit.ts';

const Envelope = z
  .object({
    input: z.record(z.string(), z.unknown()),
    callback_url: z.string().max(2048).optional(),
    metadata: z.record(z.string(), z.unknown()).optional(),
    client_ref: z.string().max(256).optional(),
  })
  .strict();

/** Canonical JSON (sorted keys) so that the same body hashes the same whatever its key order. */
function canonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  if (v && typeof v === 'object') return `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${canonical((v as Record<string, unknown>)[k])}`).join(',')}}`;
  return JSON.stringify(v);
}

export function canSee(c: Context<AppEnv>, r: RunRow | undefined): r is RunRow {
  const key = c.get('key');
  return !!r && (key.is_admin === 1 || r.key_id === key.id);
}

export function runOr404(c: Context<AppEnv>, deps: Deps, id: string): RunRow {
  const r = deps.store.getRun(id);
  if (!canSee(c, r)) throw notFound(`run ${id}`, 'RUN_NOT_FOUND');
  return r;
}

function parsePreferWait(h: string | undefined): number | null {
  const m = h?.match(/(?:^|[;,\s])wait=(\d+)/);
  return m ? Number(m[1]) : null;
}

async function createRun(c: Context<AppEnv>, deps: Deps, modelParam: string): Promise<Response> {
  const { cfg, queue } = deps;
  const key = c.get('key');
  const model = requireModel(cfg, modelParam);
  const rl = takeCreateToken(deps, key);
  c.header('X-RateLimit-Limit', String(rl.limit));
  c.header('X-RateLimit-Remaining', String(rl.remaining));
  c.header('X-RateLimit-Reset', String(rl.resetS));

  let body: unknown;
  try {
    body = await c.req.json();
  } catch {
    throw new ApiError(400, 'BAD_REQUEST', 'the request body must be a JSON object: {"input": {...}}');
  }
  const env = Envelope.safeParse(body);
  if (!env.success) throw validation('invalid request body', zodIssues('body', env.error.issues));
  const idemKey = c.req.header('Idempotency-Key');
  if (idemKey !== undefined && (idemKey.length < 1 || idemKey.length > 255)) throw fieldError(['header', 'Idempotency-Key'], 'Idempotency-Key must be 1–255 characters');

  const { run, replayed } = await submitRun(deps, key, model, env.data.input, {
    metadata: env.data.metadata, clientRef: env.data.client_ref, callbackUrl: env.data.callback_url,
    ...(idemKey ? { idempotency: { key: idemKey, requestHash: sha256Hex(canonical({ model: model.id, body })) } } : {}),
  });
  const inline = (JSON.parse(run.input) as { sync_mode?: boolean }).sync_mode === true;
  if (replayed) {
    // the same run, in its current state (URLs freshly signed), never a second run
    c.header('Idempotent-Replayed', 'true');
    return c.json(presentRun(run, { files: deps.files, baseUrl: deps.baseUrl(c), inline: inline && run.status === 'succeeded' }), 201);
  }
  const preferWait = parsePreferWait(c.req.header('Prefer'));
  const waitS = inline ? cfg.maxWaitS : preferWait !== null ? Math.min(preferWait, cfg.maxWaitS) : 0;
  if (preferWait !== null) c.header('Preference-Applied', `wait=${Math.min(preferWait, cfg.maxWaitS)}`);
  // without a wait, answer with the run as accepted (queued), even if a worker picked it up in the meantime
  const final = waitS > 0 ? await queue.waitFor(run.id, waitS * 1000) : run;
  return c.json(presentRun(final, { files: deps.files, baseUrl: deps.baseUrl(c), inline: inline && final.status === 'succeeded' }), 201);
}

const RunId = z.object({ id: z.string().openapi({ param: { name: 'id', in: 'path' }, example: '01JD2X8K3M4N5P6Q7R8S9T0V1W' }) });

export function registerRuns(app: App, deps: Deps): void {
  registerCreateRun(app, deps);
  registerRunStatuses(app);
  registerListRuns(app, deps);
  registerGetAndCancel(app, deps);
  registerRunEvents(app, deps);
}

function registerCreateRun(app: App, deps: Deps): void {
  // documented with a plain {model_id}; routed with a greedy pattern so owner/slug/… paths resolve
  const served = servedModels(deps.cfg);
  const createDoc = createRoute({
    method: 'post',
    path: '/v1/models/{model_id}/runs',
    operationId: 'createRun',
    tags: ['Runs'],
    summary: 'Create a run',
    description:
      `Queue a generation. \`model_id\` is the slash-delimited model path of a model this server runs (${served.flatMap((m) => [m.id, ...m.aliases]).map((id) => `\`${id}\``).join(', ')}). ` +
      'Returns 201 with the Run. `sync_mode: true` in the input, or `Prefer: wait=N`, waits for the result (N seconds at most).',
    security: [{ bearer: [] }],
    request: {
      params: z.object({ model_id: z.string().openapi({ param: { name: 'model_id', in: 'path' }, example: served[0].id }) }),
      headers: z.object({
        'idempotency-key': z.string().optional().openapi({ description: 'Same key + same body replays the first run; a different body gets 409.' }),
        prefer: z.string().optional().openapi({ description: '`wait=N`: wait up to N seconds for the run to finish.', example: 'wait=30' }),
      }),
      body: { content: { 'application/json': { schema: CreateRunBody } }, required: true },
    },
    responses: { 201: { description: 'The run', content: { 'application/json': { schema: RunSchema } } }, ...errorResponses(400, 401, 404, 409, 413, 422, 429, 503) },
  });
  app.openAPIRegistry.registerPath(createDoc);
  app.post('/v1/models/:model_id{.+}/runs', (c) => createRun(c, deps, c.req.param('model_id')));
}

function registerRunStatuses(app: App): void {
  route(app, createRoute({
    method: 'get', path: '/v1/runs/statuses', operationId: 'listRunStatuses', tags: ['Runs'], summary: 'List run statuses',
    description: 'Every `status_code` a run can have, whether it is terminal, and what it means.',
    security: [{ bearer: [] }],
    responses: { 200: { description: 'Statuses', content: { 'application/json': { schema: z.object({ data: z.array(z.object({ code: z.string(), terminal: z.boolean(), description: z.string() })) }) } } }, ...errorResponses(401) },
  }), (c) => c.json({ data: RUN_STATUSES.map((s) => ({ code: s, terminal: TERMINAL.has(s), description: STATUS_TEXT[s] })) }));
}

const ListQuery = z.object({
  status: z.enum(RUN_STATUSES as [RunStatus, ...RunStatus[]]).optional(),
  model_id: z.string().optional(),
  client_ref: z.string().optional(),
  created_after: z.string().datetime({ offset: true }).optional(),
  created_before: z.string().datetime({ offset: true }).optional(),
  limit: z.coerce.number().int().min(1).max(100).default(20),
  cursor: z.string().optional().openapi({ description: '`next_cursor` of the previous page' }),
  key_id: z.string().optional().openapi({ description: 'Admin keys only: runs of one key.' }),
});

function registerListRuns(app: App, deps: Deps): void {
  route(app, createRoute({
    method: 'get', path: '/v1/runs', operationId: 'listRuns', tags: ['Runs'], summary: 'List runs (newest first)',
    description: 'A page of this key\'s runs (admin keys: every key\'s, or one with `key_id`), filtered by status, model, `client_ref` and creation time. Pass `next_cursor` as `cursor` for the next page while `has_more` is true.',
    security: [{ bearer: [] }],
    request: { query: ListQuery },
    responses: { 200: { description: 'A page of runs', content: { 'application/json': { schema: RunListSchema } } }, ...errorResponses(401, 422) },
  }), (c) => listRuns(c, deps, c.req.valid('query')));
}

/** A page of the runs the key may see, newest first, filtered by the query. */
function listRuns(c: Context<AppEnv>, deps: Deps, q: z.infer<typeof ListQuery>): Response {
  const key = c.get('key');
  let before: string | undefined;
  if (q.cursor) {
    try {
      before = JSON.parse(Buffer.from(q.cursor, 'base64url').toString('utf8')).before;
    } catch { /* fall through */ }
    if (typeof before !== 'string') throw fieldError(['query', 'cursor'], 'invalid cursor');
  }
  const modelId = q.model_id ? requireKnownModel(q.model_id).id : undefined;
  const norm = (s?: string) => (s ? isoNow(Date.parse(s)) : undefined);
  const rows = deps.store.listRuns({
    keyId: key.is_admin ? q.key_id : key.id, status: q.status, modelId, clientRef: q.client_ref,
    createdAfter: norm(q.created_after), createdBefore: norm(q.created_before), before, limit: q.limit + 1,
  });
  const page = rows.slice(0, q.limit);
  const more = rows.length > q.limit;
  return c.json({
    data: page.map((r) => presentRun(r, { files: deps.files, baseUrl: deps.baseUrl(c) })),
    next_cursor: more ? Buffer.from(JSON.stringify({ before: page[page.length - 1].id })).toString('base64url') : null,
    has_more: more,
  });
}

function registerGetAndCancel(app: App, deps: Deps): void {
  route(app, createRoute({
    method: 'get', path: '/v1/runs/{id}', operationId: 'getRun', tags: ['Runs'], summary: 'Get a run (poll)',
    description: 'The run as it is now: status, progress, output with freshly signed image URLs once it succeeded, cost, failure details. Poll until `status_code` is terminal, or stream `/events` instead.',
    security: [{ bearer: [] }],
    request: { params: RunId },
    responses: { 200: { description: 'The run', content: { 'application/json': { schema: RunSchema } } }, ...errorResponses(401, 404) },
  }), (c) => c.json(presentRun(runOr404(c, deps, c.req.valid('param').id), { files: deps.files, baseUrl: deps.baseUrl(c) })));

  route(app, createRoute({
    method: 'post', path: '/v1/runs/{id}/cancellation', operationId: 'cancelRun', tags: ['Runs'], summary: 'Cancel a run',
    description: 'A queued run is cancelled at once; a running one stops between denoising steps. 201 when this call cancelled it, 200 when the run had already ended (no-op), 202 when the stop is still in progress. Cancelled runs cost nothing.',
    security: [{ bearer: [] }], request: { params: RunId },
    responses: {
      201: { description: 'Cancelled', content: { 'application/json': { schema: RunSchema } } },
      200: { description: 'Already terminal; unchanged', content: { 'application/json': { schema: RunSchema } } },
      202: { description: 'Stop requested, still settling', content: { 'application/json': { schema: RunSchema } } },
      ...errorResponses(401, 404),
    },
  }), async (c) => {
    const r = runOr404(c, deps, c.req.valid('param').id);
    const wasTerminal = TERMINAL.has(r.status);
    const changed = wasTerminal ? false : await deps.queue.cancel(r.id);
    const now = deps.store.getRun(r.id)!;
    const status = changed ? 201 : TERMINAL.has(now.status) ? 200 : 202;
    return c.json(presentRun(now, { files: deps.files, baseUrl: deps.baseUrl(c) }), status);
  });
}

function registerRunEvents(app: App, deps: Deps): void {
  route(app, createRoute({
    method: 'get', path: '/v1/runs/{id}/events', operationId: 'streamRunEvents', tags: ['Runs'], summary: 'Stream run events (server-sent events)',
    description: 'Events: `queued` and `running` (data: the Run), `progress` (data: Progress with run_id; one per denoising step), and `done` (data: the final Run), after which the stream ends.',
    security: [{ bearer: [] }], request: { params: RunId },
    responses: { 200: { description: 'text/event-stream', content: { 'text/event-stream': { schema: ProgressSchema } } }, ...errorResponses(401, 404) },
  }), (c) => streamRunEvents(c, deps, c.req.valid('param').id));
}

/** The run's events as server-sent events until it ends (or the client goes away). */
function streamRunEvents(c: Context<AppEnv>, deps: Deps, runId: string): Response {
  const run = runOr404(c, deps, runId);
  const ctx = { files: deps.files, baseUrl: deps.baseUrl(c) };
  return streamSSE(c, async (stream) => {
    let seq = 0;
    const send = (event: string, data: unknown) => stream.writeSSE({ event, data: JSON.stringify(data), id: String(++seq) });
    await new Promise<void>((resolve) => {
      const finish = () => {
        deps.queue.off('event', on);
        clearInterval(ping);
        resolve();
      };
      const on = (id: string, e: RunEvent) => {
        if (id !== run.id) return;
        if (e.type === 'progress') void send('progress', { run_id: id, ...e.progress });
        else if (TERMINAL.has(e.run.status)) void send('done', presentRun(e.run, ctx)).then(finish, finish);
        else void send(e.run.status, presentRun(e.run, ctx));
      };
      const ping = setInterval(() => void stream.writeSSE({ event: 'ping', data: '{}' }), 15_000);
      stream.onAbort(finish);
      deps.queue.on('event', on);
      // the state as of subscribing (after subscribing, so no transition falls in between)
      const now = deps.store.getRun(run.id)!;
      if (TERMINAL.has(now.status)) void send('done', presentRun(now, ctx)).then(finish, finish);
      else void send(now.status, presentRun(now, ctx));
    });
  });
}

const STATUS_TEXT: Record<RunStatus, string> = {
  queued: 'accepted, waiting for a worker',
  running: 'generating',
  succeeded: 'outputs ready',
  failed: 'see failure_code, failure_stage and failure_message; not billed',
  cancelled: 'cancelled by the client; not billed',
};
