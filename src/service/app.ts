// The service: wires the store, queue, callbacks and files to the HTTP routes. The pipeline is injected, so nothing
// here knows how images are made.
import type { AddressInfo } from 'node:net';
import crypto from 'node:crypto';
import { createRoute, OpenAPIHono, z } from '@hono/zod-openapi';
import { serve, type ServerType } from '@hono/node-server';
import { bodyLimit } from 'hono/body-limit';
import { HTTPException } from 'hono/http-exception';
import type { Context } from 'hono';
import type { Logger } from 'pino';
import type { ImagePipeline } from '../pipeline/types.ts';
import { authenticate, RateLimiter } from './auth.ts';
import type { MattingProbe } from './background.ts';
import { Callbacks } from './callbacks.ts';
import type { ServiceConfig } from './config.ts';
import { type App, type AppEnv, type Deps, route } from './context.ts';
import { ApiError, envelope, sendError, validation, zodIssues } from './errors.ts';
import { FileStore } from './files.ts';
import { createLogger } from './logger.ts';
import { RunQueue } from './queue.ts';
import { Store } from './store.ts';
import { LIMITS } from './models.ts';
import { ErrorSchema, errorResponses } from './schemas.ts';
import { type EngineProcessStats, ServiceMetrics } from './metrics.ts';
import { registerAccount } from './routes/account.ts';
import { registerCallbacks } from './routes/callbacks.ts';
import { registerDiscovery } from './routes/discovery.ts';
import { registerFiles } from './routes/files.ts';
import { registerRuns } from './routes/runs.ts';
import { openAIErrors, registerOpenAI } from './routes/openai.ts';
import { registerMcp } from './mcp.ts';
import { registerPlayground } from './routes/playground.ts';
import type { ScaleExtension } from './scale/api.ts';

export interface CreateAppOptions {
  pipeline: ImagePipeline;
  config: ServiceConfig;
  /** default: <data>/klein.db */
  store?: Store;
  logger?: Logger;
  /** shown by /v1/health */
  modelDir?: string;
  /** scale-out (Redis queue): worker routes, its figures on /metrics, and its part of /v1/health */
  scale?: ScaleExtension;
  /**
   * Whether transparent backgrounds can be served (the matting weights resolve): checked when a run is created, so a
   * server without them refuses at once (503 MATTING_UNAVAILABLE). Without a probe the run itself fails with that code.
   */
  matting?: MattingProbe;
  /** The engine processes behind the pipeline (engine-host.ts), for their crash and start counts on /metrics. */
  engines?: EngineProcessStats[];
}

export interface Service {
  app: OpenAPIHono<AppEnv>;
  store: Store;
  queue: RunQueue;
  callbacks: Callbacks;
  files: FileStore;
  config: ServiceConfig;
  log: Logger;
  metrics: ServiceMetrics;
  /** Recover interrupted runs, start the workers and the callback poller, then listen. */
  listen(port: number, host?: string): Promise<{ port: number; url: string }>;
  /**
   * Graceful: stop accepting, put running runs back in the queue, close the database. Scaled out, runs on remote
   * workers first get the extension's drain time to finish.
   */
  close(): Promise<void>;
  /** Stop as a killed process would: no state written (restart tests). */
  crash(): Promise<void>;
}

/** Routes that need no API key: discovery, health, and files (their URL signature is the credential). */
const PUBLIC = [/^\/v1\/health$/, /^\/v1\/models(\/.*)?$/, /^\/v1\/files\//];

export function createApp(opts: CreateAppOptions): Service {
  const cfg = opts.config;
  const log = opts.logger ?? createLogger();
  const store = opts.store ?? Store.open(cfg.dataDir);
  const files = new FileStore(cfg.dataDir, store, cfg.files.urlTtlS, cfg.files.retentionS);
  let listenUrl = cfg.publicUrl ?? 'http://127.0.0.1';
  const bgCtx = () => ({ files, baseUrl: cfg.publicUrl ?? listenUrl });
  const callbacks = new Callbacks(store, cfg, log.child({ part: 'callbacks' }), bgCtx);
  const metrics = new ServiceMetrics(store, opts.engines);
  opts.scale?.registerMetrics(metrics.registry);
  const queue = new RunQueue(store, metrics.wrap(opts.pipeline), files, callbacks, cfg, log.child({ part: 'queue' }), (id) => cfg.pricing[id]);
  const limiter = new RateLimiter();
  const deps: Deps = {
    store, queue, callbacks, files, cfg, log, limiter, startedAt: Date.now(), modelDir: opts.modelDir ?? '',
    baseUrl: (c: Context) => cfg.publicUrl ?? new URL(c.req.url).origin,
    ...(opts.scale ? { healthExtra: () => opts.scale!.health() } : {}),
    ...(opts.matting ? { matting: opts.matting } : {}),
  };

  const app = new OpenAPIHono<AppEnv>({
    defaultHook: (result) => {
      if (!result.success) {
        const where = result.target === 'json' ? 'body' : result.target === 'param' ? 'path' : result.target;
        throw validation(`invalid ${where}`, zodIssues(where, result.error.issues));
      }
    },
  });
  useMiddleware(app, deps, metrics);
  registerRoutes(app, deps, metrics, opts.scale);
  handleErrors(app, log);

  let server: ServerType | null = null;
  let cleanupTimer: NodeJS.Timeout | null = null;
  const stopServer = async () => {
    const s = server;
    server = null;
    if (s) await closeServer(s);
  };

  return {
    app, store, queue, callbacks, files, config: cfg, log, metrics,
    async listen(port, host = '127.0.0.1') {
      queue.recover();
      files.cleanup(store);
      cleanupTimer = setInterval(() => files.cleanup(store), cfg.files.cleanupIntervalS * 1000);
      cleanupTimer.unref();
      const started = await startServer(app, port, host);
      server = started.server;
      listenUrl = started.url;
      queue.start();
      callbacks.start();
      log.info({ url: listenUrl }, 'listening');
      return { port: started.port, url: listenUrl };
    },
    async close() {
      if (cleanupTimer) clearInterval(cleanupTimer);
      // scaled out, runs on remote workers may finish: the server keeps answering their uploads (and clients) until
      // they do or the drain time is up; jobs no worker took go back to the run queue at once
      if (opts.scale) await queue.drain(opts.scale.drainMs, () => opts.scale!.withdrawWaiting());
      callbacks.stop();
      await stopServer();
      await queue.stop();
      store.close();
    },
    async crash() {
      if (cleanupTimer) clearInterval(cleanupTimer);
      callbacks.stop();
      const settled = queue.crash(); // flags the queue at once, so nothing below is recorded
      await stopServer();
      await settled;
      store.close();
    },
  };
}

/** What every request goes through: metrics, a request id and its log line, the body cap, and the API key check. */
function useMiddleware(app: App, deps: Deps, metrics: ServiceMetrics): void {
  const { cfg, log, store, limiter } = deps;
  app.use('*', metrics.middleware());
  app.use('*', async (c, next) => {
    const id = c.req.header('x-request-id')?.slice(0, 100) || crypto.randomUUID();
    c.set('requestId', id);
    const t0 = performance.now();
    // set before the handler, so the response is made with it: set after, Hono rebuilds the finished response
    c.header('X-Request-Id', id);
    await next();
    if (!c.res.headers.has('X-Request-Id')) c.header('X-Request-Id', id); // a handler's own Response object
    log.info({ req: id, method: c.req.method, path: c.req.path, status: c.res.status, ms: Math.round(performance.now() - t0) }, 'request');
  });

  // nothing reads an unbounded body into memory: the cap holds the most data-URI references allowed, and a
  // larger body is refused while it streams in
  const maxBody = cfg.maxBodyBytes ?? LIMITS.maxRefs * Math.ceil((cfg.inputs.maxBytes * 4) / 3) + 1024 * 1024;
  const limitBody = bodyLimit({ maxSize: maxBody, onError: (c) => c.json(envelope('PAYLOAD_TOO_LARGE', `the request body is larger than ${maxBody} bytes`), 413) });
  // GET and HEAD carry no body; asking for one makes the Node adapter build a full Request (streams and all)
  app.use('*', (c, next) => (c.req.method === 'GET' || c.req.method === 'HEAD' ? next() : limitBody(c, next)));

  app.use('/v1/images/*', openAIErrors); // before auth: its errors too get OpenAI's shape on these routes
  app.use('/v1/*', async (c, next) => {
    if (PUBLIC.some((re) => re.test(c.req.path)) && !(c.req.method === 'POST' && c.req.path.endsWith('/runs'))) return next();
    const key = authenticate(store, c.req.header('authorization'));
    const rl = limiter.take(`all:${key.id}`, cfg.rateLimit.requestsPerMinute);
    if (!rl.ok) throw new ApiError(429, 'RATE_LIMITED', `Rate limit exceeded: ${cfg.rateLimit.requestsPerMinute} requests per minute for this key; retry in ${rl.retryAfterS} s`, null, { 'Retry-After': String(rl.retryAfterS) });
    c.set('key', key);
    // last_used_at is for humans auditing keys: minute precision is plenty and spares a write per request
    if (!key.last_used_at || Date.now() - Date.parse(key.last_used_at) > 60_000) store.touchKey(key.id);
    return next();
  });
}

function registerRoutes(app: App, deps: Deps, metrics: ServiceMetrics, scale: ScaleExtension | undefined): void {
  registerDiscovery(app, deps);
  registerRuns(app, deps);
  registerCallbacks(app, deps);
  registerAccount(app, deps);
  registerFiles(app, deps);
  registerOpenAI(app, deps);
  registerMcp(app, deps);
  registerPlayground(app, deps);
  scale?.register(app);
  // Prometheus text; an admin key's, like the rest of the operator's view (usage of every key), unless config.json
  // says the server sits on a private network where the scraper has no key (`metrics.public`)
  route(app, createRoute({
    method: 'get', path: '/metrics', operationId: 'getMetrics', tags: ['Discovery'], summary: 'Prometheus metrics (admin key)',
    description: 'Prometheus text format: request latency per route, event-loop lag and process figures, engine busy time, outcomes and seconds per stage, runs by status, and the Redis queue when scaled out. Needs an admin API key unless config.json sets `metrics.public`.',
    security: [{ bearer: [] }],
    responses: {
      200: { description: 'Prometheus text exposition format 0.0.4', content: { 'text/plain': { schema: z.string() } } },
      ...errorResponses(401),
      403: { description: 'The API key is not an admin key (FORBIDDEN)', content: { 'application/json': { schema: ErrorSchema } } },
    },
  }), async (c) => {
    if (!deps.cfg.metrics.public) {
      const key = authenticate(deps.store, c.req.header('authorization'));
      if (key.is_admin !== 1) throw new ApiError(403, 'FORBIDDEN', '/metrics needs an admin API key (or `"metrics": {"public": true}` in config.json)');
    }
    const m = await metrics.text();
    return c.body(m.body, 200, { 'content-type': m.contentType });
  });
}

/** Every error as the API's envelope: unknown routes 404, a full disk 507, anything unexpected 500 (and logged). */
function handleErrors(app: App, log: Logger): void {
  app.notFound((c) => c.json(envelope('NOT_FOUND', `no route for ${c.req.method} ${c.req.path}`), 404));
  app.onError((e, c) => {
    if (e instanceof ApiError) return sendError(c, e);
    // a full data disk is the operator's to fix, not a bug: a code that says so rather than a bare 500
    const errno = (e as { code?: unknown }).code;
    if (errno === 'SQLITE_FULL' || errno === 'ENOSPC') {
      log.error({ err: e, path: c.req.path }, 'data folder is full');
      return c.json(envelope('STORAGE_FULL', 'the server is out of disk space; try again later', null), 507);
    }
    if (e instanceof HTTPException) {
      const status = e.status;
      return c.json(envelope(status === 401 ? 'UNAUTHENTICATED' : status >= 500 ? 'INTERNAL' : 'BAD_REQUEST', e.message || 'bad request'), status);
    }
    log.error({ err: e, path: c.req.path }, 'unhandled error');
    return c.json(envelope('INTERNAL', 'internal error; see the server log', null), 500);
  });
}

/** Listens on `host:port`; the URL names the port actually bound (port 0: the one the system chose). */
async function startServer(app: App, port: number, host: string): Promise<{ server: ServerType; port: number; url: string }> {
  const server = await new Promise<ServerType>((resolve) => {
    const s: ServerType = serve({ fetch: app.fetch, port, hostname: host }, () => resolve(s));
  });
  // idle keep-alive sockets outlive clients' own idle timeouts (undici: 4 s), so a client never sends a request
  // on a socket the server is closing at that moment ("other side closed")
  (server as unknown as { keepAliveTimeout: number; headersTimeout: number }).keepAliveTimeout = 65_000;
  (server as unknown as { keepAliveTimeout: number; headersTimeout: number }).headersTimeout = 66_000;
  const addr = server.address() as AddressInfo;
  const shownHost = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host;
  return { server, port: addr.port, url: `http://${shownHost.includes(':') ? `[${shownHost}]` : shownHost}:${addr.port}` };
}

/** Stops listening and drops the open connections (idle keep-alive ones too). */
function closeServer(server: ServerType): Promise<void> {
  return new Promise<void>((resolve) => {
    server.close(() => resolve());
    (server as unknown as { closeAllConnections?: () => void }).closeAllConnections?.();
  });
}
