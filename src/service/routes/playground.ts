// The web playground at `/`: web/index.html with the service's size presets and limits injected, the TypeScript
// under web/ bundled by esbuild on first request (so `npm ci` + `klein serve` is all it takes: no build step to
// forget, nothing fetched from a CDN), and the stylesheet.
import fs from 'node:fs/promises';
import path from 'node:path';
import { createRoute, z } from '@hono/zod-openapi';
import { build } from 'esbuild';
import type { App, Deps } from '../context.ts';
import { ApiError } from '../errors.ts';
import { LIMITS, SIZE_PRESETS } from '../../pipeline/limits.ts';
import type { ServiceConfig } from '../config.ts';
import { servedModel } from '../models.ts';
import { errorResponses } from '../schemas.ts';

export const WEB_DIR = path.resolve(import.meta.dirname, '../../../web');

interface Assets {
  html: string;
  js: string;
  css: string;
}

/** The page's config: the presets, limits and model ids the API validates with. `<` is escaped so it stays inside the script tag. */
function configTag(cfg: ServiceConfig): string {
  const config = {
    presets: SIZE_PRESETS,
    limits: LIMITS,
    models: { t2i: servedModel(cfg, 'text-to-image').id, edit: servedModel(cfg, 'edit').id },
  };
  return `<script type="application/json" id="klein-config">${JSON.stringify(config).replace(/</g, '\\u003c')}</script>`;
}

export async function buildPlayground(cfg: ServiceConfig): Promise<Assets> {
  const [template, css, bundle] = await Promise.all([
    fs.readFile(path.join(WEB_DIR, 'index.html'), 'utf8'),
    fs.readFile(path.join(WEB_DIR, 'styles.css'), 'utf8'),
    build({
      entryPoints: [path.join(WEB_DIR, 'app.ts')],
      bundle: true,
      format: 'esm',
      target: 'es2022',
      minify: true,
      write: false,
      logLevel: 'silent',
    }),
  ]);
  return { html: template.replace('<!--KLEIN_CONFIG-->', configTag(cfg)), css, js: bundle.outputFiles[0].text };
}

export function registerPlayground(app: App, deps: Deps): void {
  let assets: Promise<Assets> | null = null;
  const get = () => {
    // built once per process; a failed build is retried on the next request rather than cached
    assets ??= buildPlayground(deps.cfg).catch((e) => {
      assets = null;
      deps.log.error({ err: e }, 'playground build failed');
      throw new ApiError(500, 'INTERNAL', `the playground could not be built: ${(e as Error).message.split('\n')[0]}`);
    });
    return assets;
  };
  const send = (body: string, type: string) =>
    new Response(body, { headers: { 'Content-Type': `${type}; charset=utf-8`, 'Cache-Control': 'no-cache' } });

  // documented like /docs (every route the server answers is in /openapi.json)
  const page = (p: string, operationId: string, summary: string, description: string, type: string, pick: (a: Assets) => string) => {
    app.openAPIRegistry.registerPath(createRoute({
      method: 'get', path: p, operationId, tags: ['Playground'], summary, description,
      responses: { 200: { description: summary, content: { [type]: { schema: z.string() } } }, ...errorResponses(500) },
    }));
    app.get(p, async () => send(pick(await get()), type));
  };
  page('/', 'getPlayground', 'Web playground: generate and edit images in the browser', 'The page, with the size presets, limits and model ids of this server; it asks for an API key and calls the runs API.', 'text/html', (a) => a.html);
  page('/playground/app.js', 'getPlaygroundScript', "The playground's script (web/*.ts bundled)", 'Bundled by esbuild on the first request and kept for the life of the process.', 'text/javascript', (a) => a.js);
  page('/playground/app.css', 'getPlaygroundStylesheet', "The playground's stylesheet", 'web/styles.css as it is.', 'text/css', (a) => a.css);
}
