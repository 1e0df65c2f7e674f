// Creating a run from code rather than from a Runflow request: the OpenAI-compatible routes and the MCP tools build a
// klein model input, and this validates it against the model's own schema, quotes its price the way the runs route
// does, stores it and hands it to the queue. The run is then an ordinary run (GET /v1/runs, ledger, callbacks none).
import crypto from 'node:crypto';
import sharp from 'sharp';
import { checkBackgroundFormat, checkMattingAvailable } from './background.ts';
import type { Deps } from './context.ts';
import { ApiError, validation, zodIssues } from './errors.ts';
import { precheckImageUrls } from './inputs.ts';
import { type ModelEntry, type ModelInput, requestedSize } from './models.ts';
import { parseDataUri } from './net.ts';
import { priceRun } from './pricing.ts';
import type { KeyRow, RunRow } from './store.ts';
import { isoNow, ulid } from './time.ts';

/** The parts of Deps that creating and awaiting a run needs (the stdio MCP server has no HTTP context). */
export type RunDeps = Pick<Deps, 'store' | 'queue' | 'cfg' | 'limiter' | 'log' | 'files' | 'matting'>;

export interface SubmitOptions {
  /** jpeg/webp quality 1–100, outside the Runflow schema (which has no such field); the queue passes it on. */
  outputQuality?: number;
  metadata?: Record<string, unknown>;
  clientRef?: string;
}

/** Throws the rate-limit error of run creation when the key has used up its creations for now. */
export function takeCreateToken(deps: RunDeps, key: KeyRow): void {
  const limit = key.rate_limit_per_min ?? deps.cfg.rateLimit.createsPerMinute;
  const rl = deps.limiter.take(`create:${key.id}`, limit);
  if (!rl.ok) {
    throw new ApiError(429, 'RATE_LIMITED', `Rate limit exceeded: ${limit} run creations per minute for this key; retry in ${rl.retryAfterS} s`, null, { 'Retry-After': String(rl.retryAfterS) });
  }
}

/**
 * The price quoted at creation: output size plus the sizes of inline (data URI) references. Edits without
 * image_size, and URL references, learn their sizes when fetched; the breakdown says so.
 */
export async function quoteRun(deps: Pick<Deps, 'cfg'>, model: ModelEntry, input: ModelInput, urls: string[]): Promise<ReturnType<typeof priceRun> | null> {
  const size = requestedSize(input);
  const known: { width: number; height: number }[] = [];
  let allKnown = true;
  for (const u of urls) {
    const d = parseDataUri(u);
    const meta = d ? await sharp(d.bytes).metadata().catch(() => null) : null;
    if (meta?.width && meta.height) known.push({ width: meta.width, height: meta.height });
    else allKnown = false;
  }
  const quote = size ? priceRun(deps.cfg.pricing[model.id], { ...size, count: input.num_images }, known) : null;
  if (quote && !allKnown) (quote.breakdown as unknown as Record<string, unknown>).note = 'input megapixels of URL images are added when they are fetched';
  return quote;
}

/**
 * A model input as the run will use it: the model's schema (defaults filled), then the rules between fields that
 * the schema cannot state (a transparent background needs an alpha format) and what this server can do (matting
 * weights installed). Every refusal happens here, before anything is stored or quoted.
 */
export function parseInput(deps: Pick<RunDeps, 'matting'>, model: ModelEntry, rawInput: unknown): ModelInput {
  const parsed = model.schema.safeParse(rawInput);
  if (!parsed.success) throw validation(`invalid input for ${model.id}`, zodIssues('body', parsed.error.issues.map((i) => ({ ...i, path: ['input', ...i.path] }))));
  const input = parsed.data as ModelInput;
  checkBackgroundFormat(input);
  checkMattingAvailable(input.background, deps.matting);
  return input;
}

/**
 * Validate `input` for `model`, store a queued run for `key` and start the queue. Validation errors are the
 * Runflow 422 (locations under `input`), so every caller can map them back to its own field names.
 */
export async function submitRun(deps: RunDeps, key: KeyRow, model: ModelEntry, rawInput: Record<string, unknown>, opts: SubmitOptions = {}): Promise<RunRow> {
  const input = parseInput(deps, model, rawInput);
  const urls = 'image_urls' in input ? input.image_urls : [];
  await precheckImageUrls(urls, deps.cfg);

  const quote = await quoteRun(deps, model, input, urls);

  const stored: Record<string, unknown> = { ...input, ...(opts.outputQuality !== undefined ? { output_quality: opts.outputQuality } : {}) };
  const id = ulid();
  const row: RunRow = {
    id, key_id: key.id, model_id: model.id, status: 'queued', input: JSON.stringify(stored), output: null,
    progress: JSON.stringify({ stage: 'queued', percent: 0 }), cost_micros: quote?.micros ?? null,
    cost_breakdown: quote ? JSON.stringify(quote.breakdown) : null, metadata: opts.metadata ? JSON.stringify(opts.metadata) : null,
    client_ref: opts.clientRef ?? null, callback_url: null, seed: input.seed ?? crypto.randomInt(0, 2 ** 32 - 1), attempts: 0,
    created_at: isoNow(), started_at: null, completed_at: null, failure_code: null, failure_stage: null, failure_message: null,
  };
  deps.store.insertRun(row);
  deps.log.info({ run: id, model: model.id, key: key.id }, 'run created');
  deps.queue.kick();
  return row;
}

/**
 * Wait for a run to end, at most `timeoutS`; when `signal` aborts first (the HTTP client went away), the run is
 * cancelled, since nobody is left to receive its images.
 */
export async function awaitRun(deps: RunDeps, id: string, timeoutS: number, signal?: AbortSignal): Promise<RunRow> {
  if (!signal) return deps.queue.waitFor(id, timeoutS * 1000);
  const onAbort = () => void deps.queue.cancel(id).catch(() => undefined);
  if (signal.aborted) onAbort();
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    return await deps.queue.waitFor(id, timeoutS * 1000);
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}
