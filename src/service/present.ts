// Stored rows → the public JSON shapes (Run, callback payload). URLs are minted at read time, so every read hands out
// a fresh signed URL and nothing expiring is ever stored.
import type { FileStore, StoredImage } from './files.ts';
import type { RunRow } from './store.ts';
import { formatUsd } from './pricing.ts';
import { isoToMs } from './time.ts';

export interface StoredOutput {
  images: StoredImage[];
  seed: number;
  prompt: string;
  /** what the images are: `transparent` (RGBA) or `opaque`; absent on runs stored before backgrounds existed */
  background?: 'opaque' | 'transparent';
  timings: Record<string, number>;
  prompt_truncated?: boolean;
  expired?: boolean;
}

export interface PresentCtx {
  files: FileStore;
  baseUrl: string;
  /** images as data: URIs instead of URLs (sync_mode) */
  inline?: boolean;
}

export function presentOutput(runId: string, raw: string | null, ctx: PresentCtx) {
  if (!raw) return null;
  const o = JSON.parse(raw) as StoredOutput;
  return {
    images: o.images.map((img) => ({
      url: o.expired ? null : ctx.inline ? `data:${img.content_type};base64,${ctx.files.read(runId, img.file).toString('base64')}` : ctx.files.url(ctx.baseUrl, runId, img.file),
      width: img.width,
      height: img.height,
      content_type: img.content_type,
      file_size: img.bytes,
      has_alpha: img.has_alpha === true,
    })),
    seed: o.seed,
    prompt: o.prompt,
    background: o.background ?? 'opaque',
    timings: o.timings,
    ...(o.prompt_truncated ? { prompt_truncated: true } : {}),
    ...(o.expired ? { expired: true } : {}),
  };
}

/** A stored run input as clients see it: without the server's paths of the LoRA files it resolved. */
function publicInput(raw: string): Record<string, unknown> {
  const { lora_files: _files, ...input } = JSON.parse(raw) as Record<string, unknown>;
  return input;
}

export function durationMs(r: RunRow): number | null {
  return r.completed_at ? isoToMs(r.completed_at) - isoToMs(r.created_at) : null;
}

export function presentRun(r: RunRow, ctx: PresentCtx) {
  const base = `${ctx.baseUrl}/v1/runs/${r.id}`;
  return {
    id: r.id,
    object: 'run' as const,
    model_id: r.model_id,
    status_code: r.status,
    input: publicInput(r.input),
    output: presentOutput(r.id, r.output, ctx),
    cost: r.cost_micros === null ? null : formatUsd(r.cost_micros),
    cost_breakdown: r.cost_breakdown ? JSON.parse(r.cost_breakdown) : null,
    progress: r.progress ? JSON.parse(r.progress) : null,
    attempts: r.attempts,
    created_at: r.created_at,
    started_at: r.started_at,
    completed_at: r.completed_at,
    duration_ms: durationMs(r),
    failure_code: r.failure_code,
    failure_stage: r.failure_stage,
    failure_message: r.failure_message,
    metadata: r.metadata ? JSON.parse(r.metadata) : null,
    client_ref: r.client_ref,
    callback_url: r.callback_url,
    links: { self: base, events: `${base}/events`, cancel: `${base}/cancellation`, callback: `${base}/callback` },
  };
}

export const EVENT_FOR: Record<string, string> = { succeeded: 'run.completed', failed: 'run.failed', cancelled: 'run.cancelled' };

/** The callback body, frozen at delivery creation: the normalized output on success, the error envelope on failure. */
export function callbackPayload(r: RunRow, ctx: PresentCtx) {
  return {
    event: EVENT_FOR[r.status],
    run_id: r.id,
    model_id: r.model_id,
    status: r.status,
    output:
      r.status === 'succeeded'
        ? presentOutput(r.id, r.output, ctx)
        : r.status === 'failed'
          ? { code: r.failure_code, message: r.failure_message, errors: null, stage: r.failure_stage }
          : null,
    cost: r.cost_micros === null ? null : formatUsd(r.cost_micros),
    duration_ms: durationMs(r),
    created_at: r.created_at,
    completed_at: r.completed_at,
    metadata: r.metadata ? JSON.parse(r.metadata) : null,
    client_ref: r.client_ref,
  };
}
