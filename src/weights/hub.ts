// Downloading a model from the Hugging Face Hub (or a mirror) into the model cache.
//
// The file listing comes from @huggingface/hub (`listFiles`: sizes, git blob ids, LFS sha256). The bytes are
// fetched here from the standard `/{repo}/resolve/{revision}/{path}` URL rather than through the library's Blob,
// because resuming needs to see the response status: a server that ignores `Range` and answers 200 must restart
// the file, not have its whole body appended to the partial one. Each file is written to `<file>.part`, resumed
// from its length after an interruption (also automatically, a few times, within one run), checked against the
// listed size and hash (sha256 of the LFS oid for large files, the git blob sha1 for small ones), then renamed.
// Two kinds of repository are pulled: FLUX.2 [klein] models and BiRefNet matting models (transparent backgrounds);
// the listing says which, or the caller does.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { listFiles } from '@huggingface/hub';
import { isMattingListing, mattingFilesToPull } from './matting-folder.ts';
import { modelCacheDir } from './cache-dirs.ts';
import { filesToPull } from './model-folder.ts';

export const DEFAULT_HUB_URL = 'https://huggingface.co';

export interface PullProgress {
  phase: 'list' | 'download' | 'verify' | 'skip' | 'done';
  file?: string;
  /** Bytes of the current file on disk / expected. */
  fileBytes?: number;
  fileTotal?: number;
  /** Bytes of all selected files on disk / expected. */
  doneBytes: number;
  totalBytes: number;
  /** The byte offset a download resumed from (phase 'download', first event of a file). */
  resumedFrom?: number;
}

export interface PullOptions {
  repo: string;
  revision?: string;
  hubUrl?: string;
  /** Default: `$HF_TOKEN`. */
  token?: string;
  /** Default: the repo's cache folder. */
  dest?: string;
  /** Explicit file list instead of the kind's selection from the listing. */
  files?: string[];
  /**
   * `klein`: a FLUX.2 [klein] model (`filesToPull`); `matting`: BiRefNet weights (`mattingFilesToPull`); `auto`
   * (default): klein files if the listing has any, else matting files if it is a BiRefNet repository.
   */
  kind?: PullKind | 'auto';
  onProgress?: (p: PullProgress) => void;
  /** Automatic resumes after a broken connection, per file. */
  retries?: number;
  signal?: AbortSignal;
  fetch?: typeof fetch;
}

export interface PulledFile {
  path: string;
  size: number;
  /** 'downloaded', 'resumed' (continued a .part), or 'present' (already complete and verified earlier). */
  status: 'downloaded' | 'resumed' | 'present';
}

export type PullKind = 'klein' | 'matting';

export interface PullResult {
  kind: PullKind;
  dir: string;
  repo: string;
  revision: string;
  files: PulledFile[];
  bytes: number;
}

/** A pull that failed for a reason the user can act on (bad repo, auth, checksum, network). */
export class PullError extends Error {
  override name = 'PullError';
  constructor(
    message: string,
    readonly status?: number,
    /** The request itself was wrong (e.g. `--matting` on a klein repository): the CLI exits 2. */
    readonly usage = false,
  ) {
    super(message);
  }
}

interface RemoteFile {
  path: string;
  size: number;
  /** git blob sha1 of the file (non-LFS) — what the Hub lists as `oid`. */
  oid?: string;
  /** sha256 of the content for LFS files. */
  sha256?: string;
}

const MANIFEST = '.klein-pull.json';

interface Manifest {
  repo: string;
  revision: string;
  hubUrl: string;
  /** path → the hash it was verified against. */
  verified: Record<string, string>;
}

function readManifest(dir: string): Manifest | undefined {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, MANIFEST), 'utf8')) as Manifest;
  } catch {
    return undefined;
  }
}

function writeManifest(dir: string, m: Manifest): void {
  const tmp = path.join(dir, `${MANIFEST}.tmp-${process.pid}`);
  fs.writeFileSync(tmp, JSON.stringify(m, null, 2));
  fs.renameSync(tmp, path.join(dir, MANIFEST));
}

function hashKey(f: RemoteFile): string {
  return f.sha256 ? `sha256:${f.sha256}` : f.oid ? `sha1:${f.oid}` : `size:${f.size}`;
}

function safeRelative(p: string): boolean {
  return !path.isAbsolute(p) && !p.split(/[\\/]/).some((s) => s === '..' || s === '');
}

async function listRemote(opts: PullOptions, hubUrl: string, revision: string, token?: string): Promise<RemoteFile[]> {
  const out: RemoteFile[] = [];
  try {
    for await (const e of listFiles({ repo: opts.repo, recursive: true, revision, hubUrl, accessToken: token, fetch: opts.fetch })) {
      if (e.type !== 'file') continue;
      out.push({ path: e.path, size: e.lfs?.size ?? e.size, oid: e.lfs ? undefined : e.oid, sha256: e.lfs?.oid });
    }
  } catch (e) {
    const status = (e as { statusCode?: number }).statusCode;
    const hint =
      status === 401 || status === 403
        ? ' — the repository is gated or private: accept its licence on the Hub and set HF_TOKEN'
        : status === 404
          ? ' — no such repository or revision'
          : '';
    throw new PullError(`cannot list ${opts.repo}@${revision} on ${hubUrl}: ${(e as Error).message}${hint}`, status);
  }
  return out;
}

/** Hashes what is already in a .part file, so a resumed download is verified over all its bytes. */
async function hashExisting(file: string, hashes: crypto.Hash[]): Promise<void> {
  if (!fs.existsSync(file)) return;
  for await (const chunk of fs.createReadStream(file)) for (const h of hashes) h.update(chunk as Buffer);
}

function newHashes(f: RemoteFile): { hashes: crypto.Hash[]; check: () => string | undefined } {
  if (f.sha256) {
    const h = crypto.createHash('sha256');
    return { hashes: [h], check: () => { const d = h.digest('hex'); return d === f.sha256 ? undefined : `sha256 ${d} ≠ listed ${f.sha256}`; } };
  }
  if (f.oid) {
    // git blob id: sha1("blob <size>\0" + content)
    const h = crypto.createHash('sha1').update(`blob ${f.size}\0`);
    return { hashes: [h], check: () => { const d = h.digest('hex'); return d === f.oid ? undefined : `git blob sha1 ${d} ≠ listed ${f.oid}`; } };
  }
  return { hashes: [], check: () => undefined };
}

async function downloadOne(
  f: RemoteFile,
  target: string,
  url: string,
  token: string | undefined,
  opts: PullOptions,
  report: (bytesOnDisk: number, resumedFrom?: number) => void,
): Promise<'downloaded' | 'resumed'> {
  const part = `${target}.part`;
  fs.mkdirSync(path.dirname(target), { recursive: true });
  const retries = opts.retries ?? 5;
  let resumedAny = false;
  for (let attempt = 0; ; attempt++) {
    let have = fs.existsSync(part) ? fs.statSync(part).size : 0;
    if (have > f.size) {
      fs.rmSync(part); // longer than the file: not ours
      have = 0;
    }
    const headers: Record<string, string> = {};
    if (token) headers.Authorization = `Bearer ${token}`;
    if (have > 0) headers.Range = `bytes=${have}-`;
    try {
      if (have < f.size || f.size === 0) {
        const res = await (opts.fetch ?? fetch)(url, { headers, redirect: 'follow', signal: opts.signal });
        if (res.status === 401 || res.status === 403) throw new PullError(`${f.path}: HTTP ${res.status} — set HF_TOKEN to a token that may read ${opts.repo}`, res.status);
        if (res.status === 416 && have > 0) {
          fs.rmSync(part, { force: true }); // the server disagrees about the length: start over
          continue;
        }
        if (!res.ok) throw new PullError(`${f.path}: HTTP ${res.status} ${res.statusText} from ${url}`, res.status);
        if (have > 0 && res.status !== 206) have = 0; // Range ignored: the body is the whole file
        else if (have > 0) {
          resumedAny = true;
          const cr = res.headers.get('content-range');
          const start = cr ? Number(/bytes (\d+)-/.exec(cr)?.[1]) : NaN;
          if (start !== have) throw new PullError(`${f.path}: asked for bytes from ${have}, server sent Content-Range "${cr}"`);
        }
        report(have, have > 0 ? have : undefined);
        const out = fs.createWriteStream(part, { flags: have > 0 ? 'a' : 'w' });
        try {
          let n = have;
          if (res.body) {
            for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
              if (!out.write(chunk)) await new Promise<void>((r) => out.once('drain', () => r()));
              n += chunk.byteLength;
              report(n);
            }
          }
        } finally {
          await new Promise<void>((resolve, reject) => out.end((e?: Error | null) => (e ? reject(e) : resolve())));
        }
      }
      const size = fs.statSync(part).size;
      if (size < f.size) throw new Error(`connection closed after ${size} of ${f.size} bytes`);
      if (size > f.size) {
        fs.rmSync(part);
        throw new PullError(`${f.path}: received ${size} bytes, the listing says ${f.size}; removed the partial file, run the pull again`);
      }
      const { hashes, check } = newHashes(f);
      await hashExisting(part, hashes);
      const bad = check();
      if (bad) {
        fs.rmSync(part);
        throw new PullError(`${f.path}: checksum mismatch (${bad}); removed the partial file, run the pull again`);
      }
      fs.renameSync(part, target);
      return resumedAny ? 'resumed' : 'downloaded';
    } catch (e) {
      if (e instanceof PullError || opts.signal?.aborted || attempt >= retries) {
        if (e instanceof PullError) throw e;
        throw new PullError(`${f.path}: ${(e as Error).message} (the partial download is kept in ${part}; run the pull again to resume)`);
      }
      await new Promise((r) => setTimeout(r, Math.min(200 * 2 ** attempt, 5000)));
    }
  }
}

/** Downloads the files of `opts.repo` the pipeline needs into the cache (or `opts.dest`), resuming and verifying. */
export async function pullModel(opts: PullOptions): Promise<PullResult> {
  const hubUrl = (opts.hubUrl ?? process.env.HF_ENDPOINT ?? DEFAULT_HUB_URL).replace(/\/+$/, '');
  const revision = opts.revision ?? 'main';
  const token = opts.token ?? process.env.HF_TOKEN ?? undefined;
  const dir = path.resolve(opts.dest ?? modelCacheDir(opts.repo));
  const progress = opts.onProgress ?? (() => {});
  progress({ phase: 'list', doneBytes: 0, totalBytes: 0 });
  const remote = await listRemote(opts, hubUrl, revision, token);
  const byPath = new Map(remote.map((f) => [f.path, f]));
  const paths = remote.map((f) => f.path);
  const requested = opts.kind ?? 'auto';
  const kind: PullKind = requested !== 'auto' ? requested : filesToPull(paths).length === 0 && isMattingListing(paths) ? 'matting' : 'klein';
  // a klein checkpoint is top-level .safetensors too: never download 8 GB of transformer as "matting weights"
  if (kind === 'matting' && filesToPull(paths).length > 0) throw new PullError(`${opts.repo} is a FLUX.2 [klein] model, not matting weights; pull it without --matting`, undefined, true);
  const wanted = opts.files ?? (kind === 'matting' ? mattingFilesToPull(paths) : filesToPull(paths));
  const missing = wanted.filter((p) => !byPath.has(p));
  if (missing.length) throw new PullError(`${opts.repo}@${revision} has no ${missing.join(', ')}`);
  if (wanted.length === 0 && kind === 'matting') throw new PullError(`${opts.repo}@${revision} holds no matting weights (no top-level .safetensors file)`);
  if (wanted.length === 0) throw new PullError(`${opts.repo}@${revision} holds no FLUX.2 [klein] files (neither model_index.json with its folders nor a flux-2-klein-*.safetensors checkpoint)`);
  const selected = wanted.map((p) => byPath.get(p)!);
  for (const f of selected) if (!safeRelative(f.path)) throw new PullError(`refusing the unsafe path "${f.path}" from the listing`);

  fs.mkdirSync(dir, { recursive: true });
  const prev = readManifest(dir);
  const manifest: Manifest = { repo: opts.repo, revision, hubUrl, verified: prev?.repo === opts.repo ? { ...prev.verified } : {} };
  const totalBytes = selected.reduce((n, f) => n + f.size, 0);
  let doneBytes = 0;
  const files: PulledFile[] = [];
  for (const f of selected) {
    const target = path.join(dir, f.path);
    const key = hashKey(f);
    if (fs.existsSync(target) && fs.statSync(target).size === f.size && manifest.verified[f.path] === key) {
      doneBytes += f.size;
      progress({ phase: 'skip', file: f.path, fileBytes: f.size, fileTotal: f.size, doneBytes, totalBytes });
      files.push({ path: f.path, size: f.size, status: 'present' });
      continue;
    }
    if (fs.existsSync(target)) fs.rmSync(target); // stale or unverified: replace
    const before = doneBytes;
    const url = `${hubUrl}/${opts.repo}/resolve/${encodeURIComponent(revision)}/${f.path.split('/').map(encodeURIComponent).join('/')}`;
    const status = await downloadOne(f, target, url, token, opts, (n, resumedFrom) =>
      progress({ phase: 'download', file: f.path, fileBytes: n, fileTotal: f.size, doneBytes: before + n, totalBytes, resumedFrom }),
    );
    doneBytes = before + f.size;
    manifest.verified[f.path] = key;
    writeManifest(dir, manifest); // after each file: an interrupted pull keeps what it verified
    files.push({ path: f.path, size: f.size, status });
  }
  writeManifest(dir, manifest);
  progress({ phase: 'done', doneBytes, totalBytes });
  return { kind, dir, repo: opts.repo, revision, files, bytes: totalBytes };
}
