// Callback signing secrets (shown once; two active during a rotation), delivery history and redelivery.
import { createRoute, z } from '@hono/zod-openapi';
import { type App, type Deps, route } from '../context.ts';
import { notFound } from '../errors.ts';
import { publicSecret } from '../callbacks.ts';
import { errorResponses } from '../schemas.ts';
import { runOr404 } from './runs.ts';

const Secret = z.object({ id: z.string(), label: z.string().nullable(), key_prefix: z.string(), is_current: z.boolean(), created_at: z.string(), revoked_at: z.string().nullable() }).openapi('CallbackSecret');
const Attempt = z.object({ attempt_number: z.number().int(), status_code: z.number().int().nullable(), response_body: z.string().nullable(), response_time_ms: z.number().int(), error_message: z.string().nullable(), attempted_at: z.string() });
const Delivery = z.object({
  id: z.string(), event: z.string(), url: z.string(), status: z.enum(['pending', 'succeeded', 'failed']), attempt_count: z.number().int(), max_attempts: z.number().int(),
  next_attempt_at: z.string().nullable(), failure_reason_code: z.string().nullable(), created_at: z.string(), completed_at: z.string().nullable(), attempts: z.array(Attempt),
}).openapi('CallbackDelivery');
const RunId = z.object({ id: z.string().openapi({ param: { name: 'id', in: 'path' } }) });

export function registerCallbacks(app: App, deps: Deps): void {
  route(app, createRoute({
    method: 'post', path: '/v1/callback-secrets', operationId: 'createCallbackSecret', tags: ['Callbacks'], summary: 'Create a callback signing secret',
    description: 'The new secret becomes current and signs `Runflow-Signature` (hex HMAC-SHA256 of the raw body). The previous one stays valid and signs `Runflow-Signature-Previous` until revoked or until a third is created. `plain_secret` is shown only in this response.',
    security: [{ bearer: [] }],
    request: { body: { content: { 'application/json': { schema: z.object({ label: z.string().max(100).optional() }) } }, required: false } },
    responses: { 201: { description: 'The secret, shown once', content: { 'application/json': { schema: Secret.extend({ plain_secret: z.string() }) } } }, ...errorResponses(401, 422) },
  }), async (c) => {
    const key = c.get('key');
    let label: string | null = null;
    if ((c.req.header('content-type') ?? '').includes('json')) label = ((await c.req.json().catch(() => ({}))) as { label?: string }).label ?? null;
    const { row, plain } = deps.callbacks.createSecret(key.id, label);
    return c.json({ ...publicSecret(row, row.id), plain_secret: plain }, 201);
  });

  route(app, createRoute({
    method: 'get', path: '/v1/callback-secrets', operationId: 'listCallbackSecrets', tags: ['Callbacks'], summary: 'List callback secrets (never their values)',
    description: 'The secrets of this key, newest first: which one is current (signs `Runflow-Signature`), which is previous (signs `Runflow-Signature-Previous`) and which are revoked.',
    security: [{ bearer: [] }],
    responses: { 200: { description: 'Secrets, newest first', content: { 'application/json': { schema: z.object({ data: z.array(Secret) }) } } }, ...errorResponses(401) },
  }), (c) => {
    const key = c.get('key');
    const current = deps.store.activeSecrets(key.id)[0]?.id;
    return c.json({ data: deps.store.listSecrets(key.id).map((s) => publicSecret(s, current)) });
  });

  route(app, createRoute({
    method: 'delete', path: '/v1/callback-secrets/{id}', operationId: 'revokeCallbackSecret', tags: ['Callbacks'], summary: 'Revoke a callback secret (ends a rotation)',
    description: 'Callbacks are no longer signed with this secret. Revoke the previous secret once receivers check the new one.',
    security: [{ bearer: [] }],
    request: { params: RunId },
    responses: { 200: { description: 'The revoked secret', content: { 'application/json': { schema: Secret } } }, ...errorResponses(401, 404) },
  }), (c) => {
    const key = c.get('key');
    const s = deps.store.revokeSecret(key.id, c.req.valid('param').id);
    if (!s) throw notFound('callback secret');
    return c.json(publicSecret(s, deps.store.activeSecrets(key.id)[0]?.id));
  });

  route(app, createRoute({
    method: 'get', path: '/v1/runs/{id}/callback', operationId: 'getRunCallback', tags: ['Callbacks'], summary: "A run's callback deliveries and their attempts",
    description: 'Every delivery of the run\'s callback (the first and any redeliveries), each with its attempts: HTTP status, response body excerpt, time taken, error, and when the next attempt is due.',
    security: [{ bearer: [] }],
    request: { params: RunId },
    responses: { 200: { description: 'Deliveries, oldest first', content: { 'application/json': { schema: z.object({ run_id: z.string(), callback_url: z.string().nullable(), deliveries: z.array(Delivery) }) } } }, ...errorResponses(401, 404) },
  }), (c) => {
    const r = runOr404(c, deps, c.req.valid('param').id);
    return c.json({ run_id: r.id, callback_url: r.callback_url, deliveries: deps.callbacks.history(r.id) });
  });

  route(app, createRoute({
    method: 'post', path: '/v1/runs/{id}/callback-redeliveries', operationId: 'redeliverRunCallback', tags: ['Callbacks'], summary: 'Send the callback again',
    description: 'Builds a fresh payload from the current run state and delivers it with the usual retries. 409 while a delivery is still pending or when the run has not ended.',
    security: [{ bearer: [] }], request: { params: RunId },
    responses: { 201: { description: 'The new delivery', content: { 'application/json': { schema: Delivery } } }, ...errorResponses(401, 404, 409, 422) },
  }), (c) => {
    const r = runOr404(c, deps, c.req.valid('param').id);
    const d = deps.callbacks.redeliver(r);
    return c.json(deps.callbacks.history(r.id).find((h) => h.id === d.id)!, 201);
  });
}
