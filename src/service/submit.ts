// Creating a run, for every way in (the Runflow runs route, the OpenAI-compatible routes, the MCP tools): the input is
// validated against the model's own schema, its price quoted, the run stored (with its idempotency key, atomically)
// and handed to the queue. Each caller maps the errors back to its own field names.
import crypto from 'node:crypto';
import sharp from 'sharp';
import { checkBackgroundFormat, checkMattingAvailable } from './background.ts';
import type { Deps } from './context.ts';
import { ApiError, fieldError, validation, zodIssues } from './errors.ts';
import { precheckImageUrls } from './inputs.ts';
import { type ModelEntry, type ModelInput, requestedSize } from './models.ts';
import { checkUrl, FetchError, parseDataUri } from './net.ts';
import { priceRun } from './pricing.ts';
import { resolveRunLoras, servedTransformerConfig } from './loras.ts';
import type { KeyRow, RunRow } from './store.ts';
import { isoNow, ulid } from './time.ts';

/** The parts of Deps that creating and awaiting a run needs (the stdio MCP server has no HTTP context). */
export type RunDeps = Pick<Deps, 'store' | 'queue' | 'cfg' | 'limiter' | 'log' | 'files' | 'matting' | 'modelDir'>;

const MAX_METADATA_BYTES = 16 * 1024;

export interface SubmitOptions {
  /** jpeg/webp quality 1–100, outside the Runflow schema (which has no such field); the queue passes it on. */
  outputQuality?: number;
  /** Echoed in the run and its callbacks; at most 16 KiB of JSON. */
  metadata?: Record<string, unknown>;
  clientRef?: string;
  /** Where the signed callback goes when the run ends (checked against the SSRF policy here). */
  callbackUrl?: string;
  /** Same key + same request hash replays the first run; a different hash is a 409. */
  idempotency?: { key: string; requestHash: string };
}

export interface Submitted {
  run: RunRow;
  /** The run was created by an earlier request with the same idempotency key (nothing new stored). */
  replayed: boolean;
}

/** Takes one run creation from the key's budget: the figures for X-RateLimit-* headers, or the 429 when spent. */
export function takeCreateToken(deps: RunDeps, key: KeyRow): { limit: number; remaining: number; resetS: number } {
  const limit = key.rate_limit_per_min ?? deps.cfg.rateLimit.createsPerMinute;
  const rl = deps.limiter.take(`create:${key.id}`, limit);
  if (!rl.ok) {
    throw new ApiError(429, 'RATE_LIMITED', `Rate limit exceeded: ${limit} run creations per minute for this key; retry in ${rl.retryAfterS} s`, null, { 'Retry-After': String(rl.retryAfterS), 'X-RateLimit-Limit': String(limit), 'X-RateLimit-Remaining': '0', 'X-RateLimit-Reset': String(rl.resetS) });
  }
  return { limit, remaining: rl.remaining, resetS: rl.resetS };
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
  const quote = size ? priceRun(deps.cfg.pricing[model.id], { ...size, count: input.num_images }, known, { loras: input.loras?.length }) : null;
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

/** The options that name places or sizes the client chose: refused before anything is stored. */
function checkOptions(deps: Pick<RunDeps, 'cfg'>, opts: SubmitOptions): string | null {
  if (opts.callbackUrl) {
    try {
      checkUrl(opts.callbackUrl, deps.cfg.inputs);
    } catch (e) {
      if (e instanceof FetchError) throw fieldError(['body', 'callback_url'], e.message, e.code === 'BLOCKED' ? 'ssrf_blocked' : 'invalid_url');
      throw e;
    }
  }
  const metadata = opts.metadata ? JSON.stringify(opts.metadata) : null;
  if (metadata && Buffer.byteLength(metadata) > MAX_METADATA_BYTES) throw fieldError(['body', 'metadata'], `metadata is limited to ${MAX_METADATA_BYTES} bytes of JSON`, 'too_large');
  return metadata;
}

/**
 * Validate `input` for `model`, store a queued run for `key` and start the queue; with an idempotency key already
 * used for the same request, the earlier run instead. Validation errors are the Runflow 422 (locations under
 * `input`), so every caller can map them back to its own field names.
 */
export async function submitRun(deps: RunDeps, key: KeyRow, model: ModelEntry, rawInput: unknown, opts: SubmitOptions = {}): Promise<Submitted> {
  const input = parseInput(deps, model, rawInput);
  const urls = 'image_urls' in input ? input.image_urls : [];
  await precheckImageUrls(urls, deps.cfg);
  const metadata = checkOptions(deps, opts);
  const idem = opts.idempotency;
  if (idem) {
    const prior = deps.store.getIdempotency(key.id, idem.key);
    if (prior) {
      if (prior.request_hash !== idem.requestHash) throw new ApiError(409, 'IDEMPOTENCY_CONFLICT', 'this Idempotency-Key was already used with a different request body');
      return { run: deps.store.getRun(prior.run_id)!, replayed: true };
    }
  }

  // downloaded (or found) and checked against the model before anything is stored: a bad LoRA is a 4xx
  const loraFiles = await resolveRunLoras(deps.cfg, servedTransformerConfig(deps.modelDir, deps.cfg.variant), input.loras);
  const quote = await quoteRun(deps, model, input, urls);
  const stored: Record<string, unknown> = { ...input, ...(opts.outputQuality !== undefined ? { output_quality: opts.outputQuality } : {}), ...(loraFiles.length ? { lora_files: loraFiles } : {}) };
  const id = ulid();
  const row: RunRow = {
    id, key_id: key.id, model_id: model.id, status: 'queued', input: JSON.stringify(stored), output: null,
    progress: JSON.stringify({ stage: 'queued', percent: 0 }), cost_micros: quote?.micros ?? null,
    cost_breakdown: quote ? JSON.stringify(quote.breakdown) : null, metadata, client_ref: opts.clientRef ?? null,
    callback_url: opts.callbackUrl ?? null, seed: input.seed ?? crypto.randomInt(0, 2 ** 32 - 1), attempts: 0,
    created_at: isoNow(), started_at: null, completed_at: null, failure_code: null, failure_stage: null, failure_message: null,
  };
  deps.store.tx(() => {
    deps.store.insertRun(row);
    if (idem) deps.store.insertIdempotency(key.id, idem.key, idem.requestHash, id);
  });
  deps.log.info({ run: id, model: model.id, key: key.id }, 'run created');
  deps.queue.kick();
  return { run: row, replayed: false };
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
