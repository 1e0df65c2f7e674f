// Timestamps and ids. ISO 8601 with an explicit `+00:00` offset (not `Z`), as Runflow does, so that signed callback
// bytes are stable across languages that format UTC differently.
import crypto from 'node:crypto';

export function isoNow(ms = Date.now()): string {
  return new Date(ms).toISOString().replace('Z', '+00:00');
}

export function isoToMs(iso: string): number {
  return Date.parse(iso);
}

const CROCKFORD = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
let lastMs = -1;
let lastRand: number[] = [];

/**
 * A monotonic ULID: 48-bit time + 80 random bits, Crockford base32. Ids sort by creation time, which is what makes
 * cursor pagination over `id` stable and cheap.
 */
export function ulid(now = Date.now()): string {
  if (now <= lastMs) {
    // same millisecond (or clock went back): increment the random part so ids stay strictly increasing
    now = lastMs;
    for (let i = lastRand.length - 1; i >= 0; i--) {
      if (lastRand[i] < 31) { lastRand[i]++; break; }
      lastRand[i] = 0;
    }
  } else {
    lastMs = now;
    lastRand = Array.from(crypto.randomBytes(16)).map((b) => b % 32);
  }
  let t = '';
  let ms = now;
  for (let i = 0; i < 10; i++) { t = CROCKFORD[ms % 32] + t; ms = Math.floor(ms / 32); }
  return t + lastRand.map((d) => CROCKFORD[d]).join('');
}

export function sha256Hex(data: string | Uint8Array): string {
  return crypto.createHash('sha256').update(data).digest('hex');
}
