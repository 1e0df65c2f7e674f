// A fake Hugging Face Hub on 127.0.0.1 that speaks the two endpoints the real Hub serves for `klein pull`: the tree
// listing (`/api/models/{repo}/tree/{rev}?recursive=true`, with git blob ids and LFS sha256) and
// `/{repo}/resolve/{rev}/{path}` with HTTP Range support. Knobs make it cut or corrupt responses.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';

export interface Served {
  body: Buffer;
  lfs: boolean;
}

export interface FakeHub {
  url: string;
  /** repo id → path → file. */
  repos: Map<string, Map<string, Served>>;
  /** Every file request, in order. */
  requests: Array<{ path: string; range?: string; auth?: string }>;
  /** path → bytes after which the next response for it is cut off (then the entry is removed). */
  cutOnce: Map<string, number>;
  /** path → cut every response after this many bytes. */
  cutAlways: Map<string, number>;
  /** path → serve these bytes instead of the listed ones. */
  corrupt: Map<string, Buffer>;
  close(): Promise<void>;
}

export function blobSha1(b: Buffer): string {
  return crypto.createHash('sha1').update(`blob ${b.length}\0`).update(b).digest('hex');
}

function listing(served: Map<string, Served>): unknown[] {
  const dirs = new Set<string>();
  const out: unknown[] = [];
  for (const [p, f] of served) {
    const parts = p.split('/');
    for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join('/'));
    const sha256 = crypto.createHash('sha256').update(f.body).digest('hex');
    out.push(
      f.lfs
        ? { type: 'file', path: p, size: f.body.length, oid: crypto.randomBytes(20).toString('hex'), lfs: { oid: sha256, size: f.body.length, pointerSize: 134 } }
        : { type: 'file', path: p, size: f.body.length, oid: blobSha1(f.body) },
    );
  }
  for (const d of dirs) out.push({ type: 'directory', path: d, size: 0, oid: '0'.repeat(40) });
  return out;
}

/** A model folder as the Hub serves it: safetensors and tokenizer.json through LFS, dot files left out. */
export function servedFolder(src: string): Map<string, Served> {
  const served = new Map<string, Served>();
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (!e.name.startsWith('.')) served.set(path.relative(src, p), { body: fs.readFileSync(p), lfs: e.name.endsWith('.safetensors') || e.name === 'tokenizer.json' });
    }
  };
  walk(src);
  return served;
}

/** Starts the hub; with `token`, every request must carry `Authorization: Bearer <token>` (else 401). */
export async function startFakeHub(opts: { token?: string } = {}): Promise<FakeHub> {
  const repos = new Map<string, Map<string, Served>>();
  const requests: FakeHub['requests'] = [];
  const cutOnce = new Map<string, number>();
  const cutAlways = new Map<string, number>();
  const corrupt = new Map<string, Buffer>();
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    const auth = req.headers.authorization;
    if (opts.token !== undefined && auth !== `Bearer ${opts.token}`) {
      res.writeHead(401, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'Invalid credentials' }));
      return;
    }
    const tree = /^\/api\/models\/([^/]+\/[^/]+)\/tree\/([^/]+)$/.exec(url.pathname);
    if (tree) {
      const served = repos.get(tree[1]);
      if (!served) {
        res.writeHead(404, { 'content-type': 'application/json', 'x-error-code': 'RepoNotFound' }).end(JSON.stringify({ error: 'Repository not found' }));
        return;
      }
      if (tree[2] !== 'main') {
        res.writeHead(404, { 'content-type': 'application/json', 'x-error-code': 'RevisionNotFound' }).end(JSON.stringify({ error: 'Revision Not Found' }));
        return;
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(listing(served)));
      return;
    }
    const resolve = /^\/([^/]+\/[^/]+)\/resolve\/main\/(.+)$/.exec(url.pathname);
    const p = resolve ? decodeURIComponent(resolve[2]) : '';
    const f = resolve ? repos.get(resolve[1])?.get(p) : undefined;
    if (!f) {
      res.writeHead(404, { 'x-error-code': url.pathname.startsWith('/api/') ? 'RepoNotFound' : 'EntryNotFound', 'content-type': 'application/json' }).end(JSON.stringify({ error: 'Not Found' }));
      return;
    }
    requests.push({ path: p, range: req.headers.range, auth });
    const body = corrupt.get(p) ?? f.body;
    let start = 0;
    const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    const headers: Record<string, string | number> = { etag: `"${blobSha1(body)}"`, 'x-repo-commit': 'c0ffee', 'accept-ranges': 'bytes' };
    if (m) {
      start = Number(m[1]);
      if (start >= body.length) {
        res.writeHead(416, { 'content-range': `bytes */${body.length}` }).end();
        return;
      }
      res.writeHead(206, { ...headers, 'content-range': `bytes ${start}-${body.length - 1}/${body.length}`, 'content-length': body.length - start });
    } else {
      res.writeHead(200, { ...headers, 'content-length': body.length });
    }
    const cut = cutOnce.get(p) ?? cutAlways.get(p);
    if (cut !== undefined && cut > start) {
      cutOnce.delete(p);
      // send part of the body, then close the connection mid-response the way a flaky network would (FIN, not
      // RST: a reset would also discard bytes the client has received but not read yet)
      res.write(body.subarray(start, cut), () => res.socket?.end());
      return;
    }
    res.end(body.subarray(start));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    repos, requests, cutOnce, cutAlways, corrupt,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}
