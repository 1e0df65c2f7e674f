// One place that turns a redis:// URL into BullMQ connection options, and rejects anything else clearly.
import type { ConnectionOptions } from 'bullmq';

export function parseRedisUrl(url: string): URL {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new Error(`--queue must be a redis://HOST:PORT URL, got "${url}"`);
  }
  if (u.protocol !== 'redis:' && u.protocol !== 'rediss:') throw new Error(`--queue must be a redis:// or rediss:// URL, got "${url}"`);
  return u;
}

export function redisConnection(url: string): ConnectionOptions {
  const u = parseRedisUrl(url);
  return {
    host: u.hostname, port: Number(u.port || 6379),
    ...(u.username ? { username: decodeURIComponent(u.username) } : {}), ...(u.password ? { password: decodeURIComponent(u.password) } : {}),
    ...(u.pathname.length > 1 ? { db: Number(u.pathname.slice(1)) } : {}),
    ...(u.protocol === 'rediss:' ? { tls: {} } : {}),
    // BullMQ workers block on Redis; ioredis must retry forever rather than fail their commands
    maxRetriesPerRequest: null,
  };
}
