// What every route module gets: the service parts and a typed way to register documented routes.
import type { Context } from 'hono';
import type { OpenAPIHono, RouteConfig, RouteHandler } from '@hono/zod-openapi';
import type { Logger } from 'pino';
import type { MattingProbe } from './background.ts';
import type { Callbacks } from './callbacks.ts';
import type { ServiceConfig } from './config.ts';
import type { FileStore } from './files.ts';
import type { RunQueue } from './queue.ts';
import type { KeyRow, Store } from './store.ts';
import type { RateLimiter } from './auth.ts';

export interface AppEnv {
  Variables: { key: KeyRow; requestId: string };
}

export interface Deps {
  store: Store;
  queue: RunQueue;
  callbacks: Callbacks;
  files: FileStore;
  cfg: ServiceConfig;
  log: Logger;
  limiter: RateLimiter;
  startedAt: number;
  /** Public origin for URLs in responses: the configured one, else the request's. */
  baseUrl(c: Context): string;
  modelDir: string;
  /** Whether transparent backgrounds can be served (matting weights present); absent: not checked at creation. */
  matting?: MattingProbe;
  /** more /v1/health fields (the Redis queue and its workers when scaled out) */
  healthExtra?: () => Record<string, unknown>;
}

export type App = OpenAPIHono<AppEnv>;

/**
 * Register a documented route whose handler returns a plain Response. Responses are built by present.ts and the
 * error envelope; the route's zod schemas document them, and validate what comes in.
 */
export function route<R extends RouteConfig>(app: App, config: R, handler: (c: Parameters<RouteHandler<R, AppEnv>>[0]) => Response | Promise<Response>): void {
  app.openapi(config, handler as never);
}
