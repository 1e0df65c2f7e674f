// The /v1 API as the page uses it: JSON calls that turn the error envelope into an ApiError, and the run's
// server-sent events read from a fetch stream (EventSource cannot send the Authorization header).

export interface Progress { stage: string; step?: number; total?: number; percent: number; message?: string }
export interface Image { url: string | null; width: number; height: number; content_type: string; file_size: number; has_alpha?: boolean }
export interface Run {
  id: string;
  model_id: string;
  status_code: 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled';
  input: Record<string, unknown>;
  output: { images: Image[]; seed: number; prompt: string; background?: 'opaque' | 'transparent'; timings: Record<string, number>; prompt_truncated?: boolean } | null;
  cost: string | null;
  progress: Progress | null;
  duration_ms: number | null;
  failure_code: string | null;
  failure_message: string | null;
}
export interface FieldError { loc: (string | number)[]; message: string; type: string }

export class ApiError extends Error {
  constructor(readonly status: number, readonly code: string, message: string, readonly errors: FieldError[] = []) {
    super(message);
  }
}

function headers(key: string, json: boolean): Record<string, string> {
  const h: Record<string, string> = {};
  if (key) h.authorization = `Bearer ${key}`;
  if (json) h['content-type'] = 'application/json';
  return h;
}

/** Any non-2xx answer becomes an ApiError carrying the envelope's code, message and field errors. */
async function failure(res: Response): Promise<ApiError> {
  const text = await res.text();
  try {
    const body = JSON.parse(text) as { code?: string; message?: string; errors?: FieldError[] | null };
    if (body && typeof body.message === 'string') return new ApiError(res.status, body.code ?? `HTTP_${res.status}`, body.message, body.errors ?? []);
  } catch { /* not JSON: fall through */ }
  return new ApiError(res.status, `HTTP_${res.status}`, `the server answered ${res.status} ${res.statusText}${text ? `: ${text.slice(0, 200)}` : ''}`);
}

async function call<T>(method: string, path: string, key: string, body?: unknown): Promise<T> {
  let res: Response;
  try {
    res = await fetch(path, { method, headers: headers(key, body !== undefined), body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, 'NETWORK', `could not reach the server (${(e as Error).message})`);
  }
  if (!res.ok) throw await failure(res);
  return (await res.json()) as T;
}

export const createRun = (key: string, modelId: string, body: unknown) => call<Run>('POST', `/v1/models/${modelId}/runs`, key, body);
export const getRun = (key: string, id: string) => call<Run>('GET', `/v1/runs/${id}`, key);
export const cancelRun = (key: string, id: string) => call<Run>('POST', `/v1/runs/${id}/cancellation`, key);
export const listModels = () => call<{ data: { id: string; price_label: string | null }[] }>('GET', '/v1/models', '');
export interface Health { transparent_backgrounds?: { status: 'available' | 'unavailable' | 'unknown'; message?: string } }
export const getHealth = () => call<Health>('GET', '/v1/health', '');

export type RunEvent = { event: 'progress'; data: Progress } | { event: 'queued' | 'running' | 'done'; data: Run };

/** Follow /v1/runs/{id}/events until `done`; calls onEvent for each event and resolves with the final run. */
export async function followRun(key: string, id: string, onEvent: (e: RunEvent) => void, signal?: AbortSignal): Promise<Run> {
  const res = await fetch(`/v1/runs/${id}/events`, { headers: headers(key, false), signal });
  if (!res.ok || !res.body) throw await failure(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    // events are separated by a blank line; a partial one stays in the buffer
    let cut: number;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const ev = parseEvent(block);
      if (!ev || ev.event === 'ping') continue;
      onEvent(ev as RunEvent);
      if (ev.event === 'done') {
        void reader.cancel();
        return ev.data as Run;
      }
    }
  }
  // the stream ended without `done` (server restart, proxy timeout): the run itself knows how it went
  return getRun(key, id);
}

function parseEvent(block: string): { event: string; data: unknown } | null {
  let event = 'message';
  const data: string[] = [];
  for (const line of block.split('\n')) {
    if (line.startsWith('event:')) event = line.slice(6).trim();
    else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
  }
  if (!data.length) return null;
  try {
    return { event, data: JSON.parse(data.join('\n')) };
  } catch {
    return null;
  }
}
