// Outbound HTTP for input images and callbacks, guarded against SSRF: only https (http when configured), and never
// to private, loopback, link-local or otherwise internal addresses unless the configuration allows them. The check
// runs inside the socket's DNS lookup, so the address checked is the address connected to (no DNS rebinding), and
// again on every redirect hop.
import dns from 'node:dns';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';

export interface NetPolicy {
  allowHttp: boolean;
  /** addresses or CIDR blocks allowed although internal */
  allowPrivate: string[];
}

export class FetchError extends Error {
  constructor(readonly code: 'BLOCKED' | 'TOO_LARGE' | 'TIMEOUT' | 'HTTP_STATUS' | 'NETWORK' | 'BAD_URL', message: string, readonly status?: number) {
    super(message);
  }
}

const INTERNAL = new net.BlockList();
for (const [a, p] of [['0.0.0.0', 8], ['10.0.0.0', 8], ['100.64.0.0', 10], ['127.0.0.0', 8], ['169.254.0.0', 16], ['172.16.0.0', 12],
  ['192.0.0.0', 24], ['192.168.0.0', 16], ['198.18.0.0', 15], ['224.0.0.0', 4], ['240.0.0.0', 4]] as const) INTERNAL.addSubnet(a, p, 'ipv4');
for (const [a, p] of [['::', 128], ['::1', 128], ['fc00::', 7], ['fe80::', 10], ['ff00::', 8], ['64:ff9b::', 96], ['2001:db8::', 32]] as const) INTERNAL.addSubnet(a, p, 'ipv6');

function blockList(entries: string[]): net.BlockList {
  const bl = new net.BlockList();
  for (const e of entries) {
    const [addr, bits] = e.split('/');
    const type = net.isIPv6(addr) ? 'ipv6' : 'ipv4';
    if (bits !== undefined) bl.addSubnet(addr, Number(bits), type);
    else bl.addAddress(addr, type);
  }
  return bl;
}

/** Whether a connection to `ip` is allowed under the policy. IPv4-mapped IPv6 addresses are judged as IPv4. */
export function addressAllowed(ip: string, policy: NetPolicy): boolean {
  const mapped = ip.match(/^::ffff:(\d+\.\d+\.\d+\.\d+)$/i);
  const addr = mapped ? mapped[1] : ip;
  const type = net.isIPv6(addr) ? 'ipv6' : 'ipv4';
  if (!INTERNAL.check(addr, type)) return true;
  return blockList(policy.allowPrivate).check(addr, type);
}

/** The checks that need no network: scheme, credentials, literal internal addresses. Throws FetchError('BAD_URL'|'BLOCKED'). */
export function checkUrl(raw: string, policy: NetPolicy): URL {
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new FetchError('BAD_URL', `not a valid URL: ${raw.slice(0, 100)}`);
  }
  if (u.protocol !== 'https:' && !(u.protocol === 'http:' && policy.allowHttp)) {
    throw new FetchError('BAD_URL', `only https:// URLs are accepted${policy.allowHttp ? ' (or http://)' : ''}, got ${u.protocol}`);
  }
  if (u.username || u.password) throw new FetchError('BAD_URL', 'URLs with credentials are not accepted');
  const host = u.hostname.replace(/^\[|\]$/g, '');
  if (net.isIP(host) && !addressAllowed(host, policy)) throw new FetchError('BLOCKED', `address ${host} is private, loopback or link-local`);
  if (/^localhost$|\.localhost$/i.test(host) && !addressAllowed('127.0.0.1', policy)) throw new FetchError('BLOCKED', `host ${host} is loopback`);
  return u;
}

function guardedLookup(policy: NetPolicy): net.LookupFunction {
  return ((hostname: string, options: dns.LookupOptions, cb: (...a: unknown[]) => void) => {
    dns.lookup(hostname, { all: true, family: options?.family as number | undefined }, (err, addrs) => {
      if (err) return cb(err);
      const bad = addrs.find((a) => !addressAllowed(a.address, policy));
      if (bad) return cb(new FetchError('BLOCKED', `host ${hostname} resolves to ${bad.address}, a private, loopback or link-local address`));
      if (options?.all) cb(null, addrs);
      else cb(null, addrs[0].address, addrs[0].family);
    });
  }) as unknown as net.LookupFunction;
}

export interface GuardedResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
  url: string;
}

export interface RequestOptions {
  method?: 'GET' | 'POST';
  headers?: Record<string, string>;
  body?: string | Buffer;
  timeoutMs: number;
  maxBytes: number;
  maxRedirects: number;
  policy: NetPolicy;
}

/** One HTTP exchange under the SSRF policy, with an overall deadline and a body size cap. Follows GET redirects. */
export async function guardedRequest(url: string, o: RequestOptions): Promise<GuardedResponse> {
  const deadline = Date.now() + o.timeoutMs;
  let current = url;
  for (let hop = 0; ; hop++) {
    const u = checkUrl(current, o.policy);
    const res = await once(u, o, deadline);
    if (o.method !== 'POST' && res.status >= 300 && res.status < 400 && res.headers.location) {
      if (hop >= o.maxRedirects) throw new FetchError('NETWORK', `more than ${o.maxRedirects} redirects`);
      current = new URL(res.headers.location, u).toString();
      continue;
    }
    return res;
  }
}

function once(u: URL, o: RequestOptions, deadline: number): Promise<GuardedResponse> {
  return new Promise((resolve, reject) => {
    const remaining = deadline - Date.now();
    if (remaining <= 0) return reject(new FetchError('TIMEOUT', `timed out after ${o.timeoutMs} ms`));
    const mod = u.protocol === 'https:' ? https : http;
    const req = mod.request(u, { method: o.method ?? 'GET', headers: o.headers, lookup: guardedLookup(o.policy), agent: false }, (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      const declared = Number(res.headers['content-length'] ?? NaN);
      if (declared > o.maxBytes) {
        req.destroy();
        return reject(new FetchError('TOO_LARGE', `response is ${declared} bytes, the limit is ${o.maxBytes}`));
      }
      res.on('data', (c: Buffer) => {
        size += c.length;
        if (size > o.maxBytes) {
          req.destroy(new FetchError('TOO_LARGE', `response exceeds the ${o.maxBytes}-byte limit`));
          return;
        }
        chunks.push(c);
      });
      res.on('end', () => { clearTimeout(timer); resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks), url: u.toString() }); });
      res.on('error', (e) => { clearTimeout(timer); reject(e instanceof FetchError ? e : new FetchError('NETWORK', e.message)); });
    });
    const timer = setTimeout(() => req.destroy(new FetchError('TIMEOUT', `timed out after ${o.timeoutMs} ms`)), remaining);
    req.on('error', (e) => {
      clearTimeout(timer);
      reject(e instanceof FetchError ? e : new FetchError('NETWORK', e.message));
    });
    if (o.body !== undefined) req.write(o.body);
    req.end();
  });
}

/** Decode a `data:` URI; returns null when `s` is not one. */
export function parseDataUri(s: string): { mime: string; bytes: Buffer } | null {
  const m = s.match(/^data:([\w.+/-]*)((?:;[\w-]+=[^;,]*)*)(;base64)?,(.*)$/s);
  if (!m) return null;
  const bytes = m[3] ? Buffer.from(m[4], 'base64') : Buffer.from(decodeURIComponent(m[4]), 'latin1');
  return { mime: m[1] || 'text/plain', bytes };
}
