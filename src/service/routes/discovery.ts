// Public discovery routes: models, health, OpenAPI, docs, llms.txt, agent skills.
import { createRoute, z } from '@hono/zod-openapi';
import type { Context } from 'hono';
import { type App, type Deps, route } from '../context.ts';
import { requireModel, servedModel } from '../models.ts';
import { modelCatalogue, modelLlmsTxt, siteLlmsTxt, skillIndex, skillMd } from '../discovery.ts';
import { DOCS_HTML } from '../docs-page.ts';
import { errorResponses } from '../schemas.ts';

const Model = z.object({
  id: z.string(), aliases: z.array(z.string()), kind: z.enum(['text-to-image', 'edit']), title: z.string(), description: z.string(),
  price_label: z.string().nullable(), price_unit: z.string(), example_cost_1mp: z.string().nullable(), llms_txt: z.string(), runs_endpoint: z.string(),
  precision: z.enum(['exact', 'fast']).openapi({ description: 'How this server runs the model: exact (fp32, matches the reference) or fast (int8 products; error stated in docs/benchmarks.md). Chosen when the server starts (klein serve --precision).' }),
}).openapi('Model');

const GpuDtype = z.enum(['fp16', 'fp32']).openapi({ description: 'Only when the server\'s own pipeline runs on a GPU device: what its text encoder, transformer and VAE compute in where they have a GPU fp16 path (klein serve --gpu-dtype). Absent on the CPU, which computes in fp32.' });

const TransparentBackgrounds = z.object({
  status: z.enum(['available', 'unavailable', 'unknown']),
  message: z.string().optional(),
}).openapi({ description: '`background: "transparent"` on this server: `available` (matting weights found), `unavailable` (`message` says how to install them; such requests get 503 MATTING_UNAVAILABLE), or `unknown` (scaled out: each worker finds out).' });

/** Asked on each health request, so weights installed while the server runs show up at once. */
function mattingState(deps: Deps): z.infer<typeof TransparentBackgrounds> {
  if (!deps.matting) return { status: 'unknown' };
  const missing = deps.matting();
  return missing ? { status: 'unavailable', message: missing } : { status: 'available' };
}

export const VERSION = '0.1.0';

export function registerDiscovery(app: App, deps: Deps): void {
  route(app, createRoute({
    method: 'get', path: '/v1/health', tags: ['Discovery'], summary: 'Health and queue depth',
    responses: { 200: { description: 'OK', content: { 'application/json': { schema: z.object({ status: z.literal('ok'), version: z.string(), uptime_s: z.number(), queue: z.record(z.string(), z.number()), model_dir: z.string(), precision: z.enum(['exact', 'fast']), gpu_dtype: GpuDtype.optional(), transparent_backgrounds: TransparentBackgrounds }) } } } },
  }), (c) => {
    const counts = deps.store.countByStatus();
    return c.json({ status: 'ok' as const, version: VERSION, uptime_s: Math.round((Date.now() - deps.startedAt) / 1000), queue: { queued: counts.queued, running: counts.running }, model_dir: deps.modelDir, precision: deps.cfg.precision ?? 'exact', ...(deps.cfg.gpuDtype ? { gpu_dtype: deps.cfg.gpuDtype } : {}), transparent_backgrounds: mattingState(deps), ...(deps.healthExtra?.() ?? {}) });
  });

  route(app, createRoute({
    method: 'get', path: '/v1/models', tags: ['Discovery'], summary: 'Model catalogue with prices',
    responses: { 200: { description: 'Models', content: { 'application/json': { schema: z.object({ data: z.array(Model) }) } } } },
  }), (c) => c.json({ data: modelCatalogue(deps.cfg) }));

  // greedy model paths, documented with a plain {model_id}
  const llmsDoc = createRoute({
    method: 'get', path: '/v1/models/{model_id}/llms.txt', tags: ['Discovery'], summary: "A model's fields, defaults, limits, prices and curl examples",
    request: { params: z.object({ model_id: z.string().openapi({ param: { name: 'model_id', in: 'path' }, example: servedModel(deps.cfg, 'text-to-image').id }) }) },
    responses: { 200: { description: 'Markdown', content: { 'text/plain': { schema: z.string() } } }, ...errorResponses(404) },
  });
  app.openAPIRegistry.registerPath(llmsDoc);
  app.get('/v1/models/:model_id{.+}/llms.txt', (c) => c.text(modelLlmsTxt(requireModel(deps.cfg, c.req.param('model_id')), deps.cfg, deps.baseUrl(c))));
  const modelDoc = createRoute({
    method: 'get', path: '/v1/models/{model_id}', tags: ['Discovery'], summary: 'One model',
    request: { params: z.object({ model_id: z.string().openapi({ param: { name: 'model_id', in: 'path' }, example: servedModel(deps.cfg, 'text-to-image').aliases[0] }) }) },
    responses: { 200: { description: 'The model', content: { 'application/json': { schema: Model } } }, ...errorResponses(404) },
  });
  app.openAPIRegistry.registerPath(modelDoc);
  app.get('/v1/models/:model_id{.+}', (c) => {
    const m = requireModel(deps.cfg, c.req.param('model_id'));
    return c.json(modelCatalogue(deps.cfg).find((x) => x.id === m.id)!);
  });

  const text = (path: string, summary: string, type: string, body: (c: Context) => string) => {
    app.openAPIRegistry.registerPath(createRoute({ method: 'get', path, tags: ['Discovery'], summary, responses: { 200: { description: summary, content: { [type]: { schema: z.string() } } } } }));
    app.get(path, (c) => {
      c.header('Content-Type', `${type}; charset=utf-8`);
      return c.body(body(c));
    });
  };
  text('/llms.txt', 'Site index for language models', 'text/plain', (c) => siteLlmsTxt(deps.cfg, deps.baseUrl(c)));
  text('/.well-known/agent-skills/klein/SKILL.md', 'Agent skill: how to use this API', 'text/markdown', () => skillMd(deps.cfg));
  text('/docs', 'Interactive API reference (self-contained)', 'text/html', () => DOCS_HTML);

  route(app, createRoute({
    method: 'get', path: '/.well-known/agent-skills/index.json', tags: ['Discovery'], summary: 'Agent skills index (with sha256 digests)',
    responses: { 200: { description: 'Index', content: { 'application/json': { schema: z.object({ $schema: z.string(), skills: z.array(z.object({ name: z.string(), type: z.string(), description: z.string(), url: z.string(), digest: z.string() })) }) } } } },
  }), (c) => c.json(skillIndex(deps.cfg)));

  app.openAPIRegistry.registerPath(createRoute({ method: 'get', path: '/openapi.json', tags: ['Discovery'], summary: 'This OpenAPI 3.1 document', responses: { 200: { description: 'OpenAPI document', content: { 'application/json': { schema: z.record(z.string(), z.unknown()) } } } } }));
  app.get('/openapi.json', (c) =>
    c.json(app.getOpenAPI31Document({
      openapi: '3.1.0',
      info: { title: 'klein serve', version: VERSION, description: 'Self-hosted FLUX.2 [klein] runs API, compatible with Runflow. Errors are {code, message, errors}.' },
      servers: [{ url: deps.baseUrl(c) }],
    })),
  );
  app.openAPIRegistry.registerComponent('securitySchemes', 'bearer', { type: 'http', scheme: 'bearer', description: 'API key: klein keys create' });
}
