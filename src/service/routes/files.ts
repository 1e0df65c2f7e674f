// Output files behind signed, expiring URLs (no API key needed: the signature is the capability).
import fs from 'node:fs';
import { createRoute, z } from '@hono/zod-openapi';
import { type App, type Deps, route } from '../context.ts';
import { ApiError } from '../errors.ts';
import { errorResponses } from '../schemas.ts';

const TYPES: Record<string, string> = { png: 'image/png', jpg: 'image/jpeg', webp: 'image/webp' };

export function registerFiles(app: App, deps: Deps): void {
  route(app, createRoute({
    method: 'get', path: '/v1/files/{run_id}/{file}', operationId: 'getFile', tags: ['Files'], summary: 'Download an output image (signed URL from the run output)',
    description: 'No API key: the `expires` and `signature` query parameters of the URL in the run output are the credential. 410 once the URL has expired (GET the run again for a fresh one), 404 once retention removed the file.',
    request: {
      params: z.object({ run_id: z.string().openapi({ param: { name: 'run_id', in: 'path' } }), file: z.string().openapi({ param: { name: 'file', in: 'path' } }) }),
      query: z.object({ expires: z.string().optional(), signature: z.string().optional() }),
    },
    responses: {
      200: { description: 'The image', content: Object.fromEntries(Object.values(TYPES).map((t) => [t, { schema: z.string().openapi({ format: 'binary' }) }])) },
      ...errorResponses(403, 404, 410),
    },
  }), (c) => {
    const { run_id, file } = c.req.valid('param');
    const { expires, signature } = c.req.valid('query');
    const r = deps.files.resolve(run_id, file, expires, signature);
    if ('error' in r) {
      if (r.error === 'expired') throw new ApiError(410, 'URL_EXPIRED', 'this file URL has expired; GET the run again for a fresh one');
      if (r.error === 'gone') throw new ApiError(404, 'FILE_NOT_FOUND', 'the file no longer exists (retention period over)');
      throw new ApiError(403, 'INVALID_SIGNATURE', 'missing or invalid file URL signature');
    }
    const ext = file.split('.').pop() ?? '';
    c.header('Content-Type', TYPES[ext] ?? 'application/octet-stream');
    c.header('Cache-Control', 'private, max-age=3600');
    return c.body(fs.readFileSync(r.path));
  });
}
