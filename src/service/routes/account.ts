// Who am I, and what have I spent.
import { createRoute, z } from '@hono/zod-openapi';
import { type App, type Deps, route } from '../context.ts';
import { publicKey } from '../auth.ts';
import { formatUsd } from '../pricing.ts';
import { errorResponses } from '../schemas.ts';

const Day = z.string().regex(/^\d{4}-\d{2}-\d{2}$/, 'a day as YYYY-MM-DD');

export function registerAccount(app: App, deps: Deps): void {
  route(app, createRoute({
    method: 'get', path: '/v1/auth/me', operationId: 'getCurrentKey', tags: ['Account'], summary: 'Check the API key',
    description: 'The key this request authenticated with (its id, name, prefix, admin flag; never the secret) and the limits that apply to it: run creations and requests per minute, runs at once.',
    security: [{ bearer: [] }],
    responses: {
      200: { description: 'The key and its limits', content: { 'application/json': { schema: z.object({ key: z.record(z.string(), z.unknown()), limits: z.record(z.string(), z.number()) }) } } },
      ...errorResponses(401),
    },
  }), (c) => {
    const k = c.get('key');
    return c.json({
      key: publicKey(k),
      limits: {
        run_creations_per_minute: k.rate_limit_per_min ?? deps.cfg.rateLimit.createsPerMinute,
        requests_per_minute: deps.cfg.rateLimit.requestsPerMinute,
        concurrent_runs: k.max_concurrency ?? deps.cfg.perKeyConcurrency,
      },
    });
  });

  const UsageRow = z.object({ day: z.string(), key_id: z.string(), model_id: z.string(), runs: z.number().int(), images: z.number().int(), output_mp: z.number().int(), input_mp: z.number().int(), lora_mp: z.number().int().openapi({ description: 'Output megapixels of runs with LoRAs (billed with the LoRA surcharge).' }), cost: z.string() });
  route(app, createRoute({
    method: 'get', path: '/v1/usage', operationId: 'getUsage', tags: ['Account'], summary: 'Usage ledger per key and day (succeeded runs only)',
    description: 'Runs, images, megapixels and cost per day, key and model, from the billed (succeeded) runs, with the total. `from` and `to` are inclusive UTC days. Admin keys see every key, or one with `key_id`.',
    security: [{ bearer: [] }],
    request: { query: z.object({ from: Day.optional(), to: Day.optional(), key_id: z.string().optional().openapi({ description: 'Admin keys: one key (default: all keys)' }) }) },
    responses: {
      200: { description: 'Rows per day, key and model, and the total', content: { 'application/json': { schema: z.object({ currency: z.literal('USD'), data: z.array(UsageRow), total_cost: z.string() }) } } },
      ...errorResponses(401, 422),
    },
  }), (c) => {
    const q = c.req.valid('query');
    const k = c.get('key');
    const rows = deps.store.usage({ keyId: k.is_admin ? q.key_id : k.id, from: q.from, to: q.to });
    const total = rows.reduce((s, r) => s + r.cost_micros, 0);
    return c.json({
      currency: 'USD' as const,
      data: rows.map(({ cost_micros, ...r }) => ({ ...r, cost: formatUsd(cost_micros) })),
      total_cost: formatUsd(total),
    });
  });
}
