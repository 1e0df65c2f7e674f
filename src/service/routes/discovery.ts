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
  precision: z.enum(['exact', 'fast']).openapi({ description: 'How this server runs the model: exact (fp32, matches the reference) or fast (int8 products; error stated in docs/benchmarks.md). Chosen when the server starts (klein serve --precision; default fast on the CPU, exact on GPUs).' }),
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

/** The document's tags, in the order generated clients and /docs list them. */
const TAGS = [
  { name: 'Runs', description: 'Create, poll, stream and cancel generations (Runflow-compatible runs API).' },
  { name: 'OpenAI-compatible', description: "OpenAI's images API (generations, edits), each request an ordinary run." },
  { name: 'Callbacks', description: 'Signed run callbacks: signing secrets, delivery history, redelivery.' },
  { name: 'Account', description: 'The API key in use, its limits and its usage.' },
  { name: 'Files', description: 'Output images behind signed, expiring URLs.' },
  { name: 'Discovery', description: 'Health, the served models with prices, this document, and texts for people and agents.' },
  { name: 'Playground', description: 'The web playground.' },
];

/** TAGS, then any tag a route registered elsewhere uses (scale-out routes), so every tag is declared. */
function declaredTags(doc: { paths?: Record<string, Record<string, { tags?: string[] }>> }): { name: string; description?: string }[] {
  const used = new Set(Object.values(doc.paths ?? {}).flatMap((ops) => Object.values(ops).flatMap((op) => op.tags ?? [])));
  return [...TAGS, ...[...used].filter((t) => !TAGS.some((d) => d.name === t)).map((name) => ({ name }))];
}

export function registerDiscovery(app: App, deps: Deps): void {
  route(app, createRoute({
    method: 'get', path: '/v1/health', operationId: 'getHealth', tags: ['Discovery'], summary: 'Health and queue depth',
    description: 'No API key. The version, uptime, runs queued and running, the model folder, precision (and GPU dtype), and whether transparent backgrounds can be served.',
    responses: { 200: { description: 'OK', content: { 'application/json': { schema: z.object({ status: z.literal('ok'), version: z.string(), uptime_s: z.number(), queue: z.record(z.string(), z.number()), model_dir: z.string(), precision: z.enum(['exact', 'fast']), gpu_dtype: GpuDtype.optional(), transparent_backgrounds: TransparentBackgrounds }) } } } },
  }), (c) => {
    return c.json({ status: 'ok' as const, version: VERSION, uptime_s: Math.round((Date.now() - deps.startedAt) / 1000), queue: deps.store.countActive(), model_dir: deps.modelDir, precision: deps.cfg.precision ?? 'exact', ...(deps.cfg.gpuDtype ? { gpu_dtype: deps.cfg.gpuDtype } : {}), transparent_backgrounds: mattingState(deps), ...(deps.healthExtra?.() ?? {}) });
  });

  route(app, createRoute({
    method: 'get', path: '/v1/models', operationId: 'listModels', tags: ['Discovery'], summary: 'Model catalogue with prices',
    description: 'No API key. The models this server runs (the variant it loaded: text to image and edit), with their aliases, prices per megapixel, the cost of a 1 MP image, and links to their llms.txt and runs endpoint.',
    responses: { 200: { description: 'Models', content: { 'application/json': { schema: z.object({ data: z.array(Model) }) } } } },
  }), (c) => c.json({ data: modelCatalogue(deps.cfg) }));

  // greedy model paths, documented with a plain {model_id}
  const llmsDoc = createRoute({
    method: 'get', path: '/v1/models/{model_id}/llms.txt', operationId: 'getModelLlmsTxt', tags: ['Discovery'], summary: "A model's fields, defaults, limits, prices and curl examples",
    description: 'Markdown for language models, generated from the same schema the API validates with.',
    request: { params: z.object({ model_id: z.string().openapi({ param: { name: 'model_id', in: 'path' }, example: servedModel(deps.cfg, 'text-to-image').id }) }) },
    responses: { 200: { description: 'Markdown', content: { 'text/plain': { schema: z.string() } } }, ...errorResponses(404) },
  });
  app.openAPIRegistry.registerPath(llmsDoc);
  app.get('/v1/models/:model_id{.+}/llms.txt', (c) => c.text(modelLlmsTxt(requireModel(deps.cfg, c.req.param('model_id')), deps.cfg, deps.baseUrl(c))));
  const modelDoc = createRoute({
    method: 'get', path: '/v1/models/{model_id}', operationId: 'getModel', tags: ['Discovery'], summary: 'One model',
    description: 'One entry of GET /v1/models, by id or alias; 404 names the models served here.',
    request: { params: z.object({ model_id: z.string().openapi({ param: { name: 'model_id', in: 'path' }, example: servedModel(deps.cfg, 'text-to-image').aliases[0] }) }) },
    responses: { 200: { description: 'The model', content: { 'application/json': { schema: Model } } }, ...errorResponses(404) },
  });
  app.openAPIRegistry.registerPath(modelDoc);
  app.get('/v1/models/:model_id{.+}', (c) => {
    const m = requireModel(deps.cfg, c.req.param('model_id'));
    return c.json(modelCatalogue(deps.cfg).find((x) => x.id === m.id)!);
  });

  const text = (path: string, operationId: string, summary: string, description: string, type: string, body: (c: Context) => string) => {
    app.openAPIRegistry.registerPath(createRoute({ method: 'get', path, operationId, tags: ['Discovery'], summary, description, responses: { 200: { description: summary, content: { [type]: { schema: z.string() } } } } }));
    app.get(path, (c) => {
      c.header('Content-Type', `${type}; charset=utf-8`);
      return c.body(body(c));
    });
  };
  text('/llms.txt', 'getLlmsTxt', 'Site index for language models', 'The models with their prices, where the documents are, and the essentials of the API in a page of markdown.', 'text/plain', (c) => siteLlmsTxt(deps.cfg, deps.baseUrl(c)));
  text('/.well-known/agent-skills/klein/SKILL.md', 'getAgentSkill', 'Agent skill: how to use this API', 'An Agent Skills SKILL.md: when to use this server, the flow of a run, and the rules that keep an agent out of trouble.', 'text/markdown', () => skillMd(deps.cfg));
  text('/docs', 'getDocsPage', 'Interactive API reference (self-contained)', 'A page that renders this OpenAPI document, with nothing loaded from a CDN.', 'text/html', () => DOCS_HTML);

  route(app, createRoute({
    method: 'get', path: '/.well-known/agent-skills/index.json', operationId: 'getAgentSkillsIndex', tags: ['Discovery'], summary: 'Agent skills index (with sha256 digests)',
    description: 'The Agent Skills discovery index: each skill with its URL and the sha256 digest of its text.',
    responses: { 200: { description: 'Index', content: { 'application/json': { schema: z.object({ $schema: z.string(), skills: z.array(z.object({ name: z.string(), type: z.string(), description: z.string(), url: z.string(), digest: z.string() })) }) } } } },
  }), (c) => c.json(skillIndex(deps.cfg)));

  app.openAPIRegistry.registerPath(createRoute({ method: 'get', path: '/openapi.json', operationId: 'getOpenApiDocument', tags: ['Discovery'], summary: 'This OpenAPI 3.1 document', description: 'Every route this server answers, with operation ids and declared tags for client generators.', responses: { 200: { description: 'OpenAPI document', content: { 'application/json': { schema: z.record(z.string(), z.unknown()) } } } } }));
  app.get('/openapi.json', (c) => {
    const base = deps.baseUrl(c);
    const doc = app.getOpenAPI31Document({
      openapi: '3.1.0',
      info: {
        title: 'klein serve', version: VERSION,
        description: `Self-hosted ${servedModel(deps.cfg, 'text-to-image').title} runs API, compatible with Runflow. Errors are {code, message, errors}.`,
        contact: { name: 'klein serve', url: `${base}/docs` },
      },
      servers: [{ url: base }],
    });
    return c.json({ ...doc, tags: declaredTags(doc as never) });
  });
  app.openAPIRegistry.registerComponent('securitySchemes', 'bearer', { type: 'http', scheme: 'bearer', description: 'API key: klein keys create' });
}
