// Bearer API keys. Keys are 192-bit random tokens, so a plain SHA-256 of the key is a safe stored form (no slow hash
// needed: there is nothing to brute-force); the plain key is shown once, at creation.
import crypto from 'node:crypto';
import type { KeyRow, Store } from './store.ts';
import { ApiError } from './errors.ts';
import { isoNow, sha256Hex, ulid } from './time.ts';

export const KEY_PREFIX = 'kl_live_';

export interface CreatedKey {
  key: string;
  row: KeyRow;
}

export function createKey(store: Store, opts: { name: string; admin?: boolean; rateLimitPerMin?: number; maxConcurrency?: number }): CreatedKey {
  const secret = crypto.randomBytes(24).toString('base64url');
  const key = KEY_PREFIX + secret;
  const row: KeyRow = {
    id: 'key_' + ulid().toLowerCase(),
    name: opts.name,
    prefix: key.slice(0, KEY_PREFIX.length + 6),
    hash: sha256Hex(key),
    is_admin: opts.admin ? 1 : 0,
    rate_limit_per_min: opts.rateLimitPerMin ?? null,
    max_concurrency: opts.maxConcurrency ?? null,
    created_at: isoNow(),
    last_used_at: null,
    revoked_at: null,
  };
  store.insertKey(row);
  return { key, row };
}

/**
 * On the server's first start, create an admin key; the caller prints it once. A flag rather than "no keys yet",
 * so a key made with `klein keys create` before the server first came up does not suppress it.
 */
export function ensureAdminKey(store: Store): CreatedKey | null {
  return store.tx(() => {
    if (store.getMeta('admin_key_issued')) return null;
    store.setMeta('admin_key_issued', new Date().toISOString());
    return createKey(store, { name: 'admin', admin: true });
  });
}

export function authenticate(store: Store, header: string | undefined): KeyRow {
  const m = header?.match(/^Bearer\s+(\S+)\s*$/i);
  if (!m) throw new ApiError(401, 'UNAUTHENTICATED', 'missing API key: send Authorization: Bearer <key>', null, { 'WWW-Authenticate': 'Bearer' });
  const row = store.keyByHash(sha256Hex(m[1]));
  if (!row || row.revoked_at) throw new ApiError(401, 'UNAUTHENTICATED', 'invalid or revoked API key', null, { 'WWW-Authenticate': 'Bearer' });
  return row;
}

export function publicKey(k: KeyRow) {
  return {
    id: k.id, name: k.name, prefix: k.prefix, is_admin: k.is_admin === 1,
    rate_limit_per_minute: k.rate_limit_per_min, max_concurrency: k.max_concurrency,
    created_at: k.created_at, last_used_at: k.last_used_at, revoked_at: k.revoked_at,
  };
}

/**
 * A token bucket per key: `limit` requests per minute, refilled continuously, burst up to `limit`. In memory on
 * purpose: limits protect this process, and a restart forgiving a minute of history harms no one.
 */
export class RateLimiter {
  private buckets = new Map<string, { tokens: number; at: number }>();

  take(id: string, limit: number, now = Date.now()): { ok: boolean; remaining: number; retryAfterS: number; resetS: number } {
    const rate = limit / 60_000;
    const b = this.buckets.get(id) ?? { tokens: limit, at: now };
    b.tokens = Math.min(limit, b.tokens + (now - b.at) * rate);
    b.at = now;
    this.buckets.set(id, b);
    const resetS = Math.ceil((now + (limit - b.tokens) / rate) / 1000);
    if (b.tokens < 1) return { ok: false, remaining: 0, retryAfterS: Math.max(1, Math.ceil((1 - b.tokens) / rate / 1000)), resetS };
    b.tokens -= 1;
    return { ok: true, remaining: Math.floor(b.tokens), retryAfterS: 0, resetS };
  }
}
