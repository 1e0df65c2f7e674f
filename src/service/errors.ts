// One error shape everywhere, Runflow's envelope: {code, message, errors}. `errors` carries per-field details (422).
import type { Context } from 'hono';
import type { ContentfulStatusCode } from 'hono/utils/http-status';

export interface FieldError {
  loc: (string | number)[];
  message: string;
  type: string;
}

export class ApiError extends Error {
  constructor(
    readonly status: ContentfulStatusCode,
    readonly code: string,
    message: string,
    readonly errors: FieldError[] | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

export const notFound = (what: string, code = 'NOT_FOUND') => new ApiError(404, code, `${what} not found`);
export const validation = (message: string, errors: FieldError[]) => new ApiError(422, 'VALIDATION_ERROR', message, errors);
export const fieldError = (loc: (string | number)[], message: string, type = 'value_error') =>
  validation(message, [{ loc, message, type }]);

export function envelope(code: string, message: string, errors: FieldError[] | null = null) {
  return { code, message, errors };
}

export function sendError(c: Context, e: ApiError): Response {
  for (const [k, v] of Object.entries(e.headers)) c.header(k, v);
  return c.json(envelope(e.code, e.message, e.errors), e.status);
}

/** Zod issues → field errors under a location prefix (`body`, `query`, `path`, `header`). */
export function zodIssues(prefix: string, issues: readonly { path: PropertyKey[]; message: string; code: string }[]): FieldError[] {
  return issues.map((i) => ({
    loc: [prefix, ...i.path.map((p) => (typeof p === 'number' ? p : String(p)))],
    message: i.message,
    type: i.code,
  }));
}
