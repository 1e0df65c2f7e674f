// The service's rules for `background`: which formats can carry a transparent background, and whether this server
// can cut subjects out at all (the matting weights are a separate download). Both are checked when a run is created,
// so a request that can only fail is refused before anything is stored, queued or quoted.
import fs from 'node:fs';
import path from 'node:path';
import { z } from '@hono/zod-openapi';
import { BUNDLED_MATTING_DIR, defaultMattingDir, MattingModelError } from '../weights/matting-folder.ts';
import { resolveMattingModel } from '../pipeline/matting-model.ts';
import { ApiError } from './errors.ts';

export const BACKGROUNDS = ['auto', 'opaque', 'transparent'] as const;
export type BackgroundT = (typeof BACKGROUNDS)[number];

export const BACKGROUND_DESCRIPTION =
  '`transparent`: the subject is cut out by a matting model (BiRefNet) after generation and the image is returned as ' +
  'RGBA (png or webp; jpeg is refused with 422). A plain-backdrop hint is added to the prompt. The alpha is estimated: ' +
  'cast shadows are removed, glass and smoke are approximated; results are deterministic for a seed. `opaque`: the ' +
  'RGB image as drawn. `auto` (default) is `opaque` for klein. Same price either way.';

export const BackgroundField = z.enum(BACKGROUNDS).default('auto').openapi({ description: BACKGROUND_DESCRIPTION });

/**
 * Whether transparent backgrounds can be served: `null` when they can, else the reason for the operator, naming the
 * command that installs the weights. Supplied by whoever built the pipeline (the service cannot see its files).
 */
export type MattingProbe = () => string | null;

/**
 * The probe of a server whose pipeline finds its matting model the way `KleinPipeline` does (`explicit`: its
 * `mattingModel` option, `modelRoot`: the klein model folder). Every `ttlMs` it looks at the places the lookup
 * searches (a few stat calls) and resolves again (a safetensors header read and check, 2-36 ms on the API's event
 * loop while an engine computes) only when one of them changed, so weights pulled while the server runs are picked
 * up without a restart, and /v1/health, which asks on every request, stays cheap.
 */
export function mattingProbe(where: { explicit?: string; modelRoot?: string }, ttlMs = 2000): MattingProbe {
  let last: { at: number; places: string; answer: string | null } | undefined;
  return () => {
    const now = Date.now();
    if (last && now - last.at < ttlMs) return last.answer;
    const places = mattingPlaces(where);
    if (last && places === last.places) {
      last.at = now;
      return last.answer;
    }
    let answer: string | null = null;
    try {
      resolveMattingModel(where);
    } catch (e) {
      if (!(e instanceof MattingModelError)) throw e;
      answer = e.message;
    }
    last = { at: now, places, answer };
    return answer;
  };
}

/** The state of every place findMattingModel searches: each path's kind, mtime and size, and a folder's files'. */
function mattingPlaces(where: { explicit?: string; modelRoot?: string }): string {
  const candidates = [where.explicit, process.env.KLEIN_MATTING_MODEL, where.modelRoot && path.join(where.modelRoot, BUNDLED_MATTING_DIR), defaultMattingDir()];
  const stamp = (p: string) => {
    const s = fs.statSync(p, { throwIfNoEntry: false });
    return s ? `${s.isDirectory() ? 'd' : 'f'}${s.mtimeMs}:${s.size}` : '-';
  };
  return candidates.map((p) => {
    if (!p) return '';
    const self = stamp(p);
    const files = self.startsWith('d') ? fs.readdirSync(p).sort().map((name) => `${name}=${stamp(path.join(p, name))}`) : [];
    return `${p}=${self}[${files.join(',')}]`;
  }).join('|');
}

/** The pipeline's "no usable matting model" error (thrown before generating when no probe refused the run). */
export const isMattingUnavailable = (e: unknown): e is MattingModelError => e instanceof MattingModelError;

export const UNSUPPORTED_COMBINATION = 'UNSUPPORTED_COMBINATION';
export const MATTING_UNAVAILABLE = 'MATTING_UNAVAILABLE';

export const JPEG_NEEDS_OPAQUE = 'a transparent background needs png or webp output: jpeg has no alpha channel';

/** 422 for `transparent` + `jpeg`; `loc` is where output_format sits in the caller's request. */
export function checkBackgroundFormat(input: { background?: BackgroundT; output_format?: string }, loc: (string | number)[] = ['body', 'input', 'output_format']): void {
  if (input.background === 'transparent' && input.output_format === 'jpeg') {
    throw new ApiError(422, UNSUPPORTED_COMBINATION, JPEG_NEEDS_OPAQUE, [{ loc, message: `${JPEG_NEEDS_OPAQUE}; use png or webp, or background opaque`, type: 'unsupported_combination' }]);
  }
}

/**
 * 503 when a transparent background is asked of a server without the matting weights: the request is fine, the
 * server lacks a part, and retrying will not help until its operator installs it (hence no Retry-After).
 */
export function checkMattingAvailable(background: BackgroundT | undefined, probe: MattingProbe | undefined): void {
  if (background !== 'transparent' || !probe) return;
  const missing = probe();
  if (missing) throw mattingUnavailable(missing);
}

export function mattingUnavailable(reason: string): ApiError {
  // x-should-retry: OpenAI's clients retry 5xx by default, and a retry cannot succeed until the weights are installed
  return new ApiError(503, MATTING_UNAVAILABLE, `transparent backgrounds are not available on this server: ${reason}`, [{ loc: ['body', 'input', 'background'], message: reason, type: 'matting_unavailable' }], { 'x-should-retry': 'false' });
}
