// Where a LoRA file comes from: `--lora FILE_OR_HUB_REF[:SCALE]` on the CLI, `loras: [{path, scale}]` in the APIs.
// A path is a file (anywhere for the CLI; under the configured LoRA folder only, for the service), an https URL
// (fetched through the service's SSRF guard, size-capped) or a Hub reference `owner/name[/file.safetensors]` (pulled
// like models). Downloads are cached under $KLEIN_CACHE_DIR/loras/<sha256>.safetensors and reach that name only
// after they were checked (safetensors header, then the caller's `validate`, e.g. loadLora for the model): a refused
// download leaves nothing behind.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { listFiles } from '@huggingface/hub';
import { FetchError, checkUrl, guardedRequest, type NetPolicy } from './net.ts';
import { DEFAULT_HUB_URL, PullError, pullModel } from '../weights/hub.ts';
import { LoraError } from '../models/flux2/lora/load.ts';
import { isRepoId } from '../weights/cache-dirs.ts';
import { LIMITS } from '../pipeline/limits.ts';
import { SafetensorsFile } from '../weights/safetensors.ts';

/** Largest |scale| accepted (the pipeline's limit). */
export const MAX_LORA_SCALE = LIMITS.maxLoraScale;
/** Default cap on a downloaded LoRA (klein 9B at rank 128 is about 0.6 GB in bf16). */
export const DEFAULT_MAX_LORA_BYTES = 1024 * 1024 * 1024;

/** The service's LoRA settings (config.json `loras`; see ServiceConfig). */
export interface LoraSettings {
  dir?: string;
  urls: boolean;
  hub: boolean;
  maxBytes: number;
  timeoutMs: number;
}
const MAX_REF_LENGTH = 2048;

export interface LoraSpec {
  ref: string;
  scale: number;
}

/** `FILE_OR_HUB_REF[:SCALE]` (scale default 1). A URL's `host:port` is not a scale. */
export function parseLoraSpec(spec: string): LoraSpec {
  if (spec.startsWith(':')) throw new LoraError('lora_bad_spec', `LoRA spec ${JSON.stringify(spec)} has no file, URL or Hub reference before the scale`);
  const m = /^(.+):([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)$/i.exec(spec);
  const split = m && !/^[a-z][a-z0-9+.-]*:\/\/[^/]+$/i.test(m[1]);
  const ref = split ? m[1] : spec;
  const scale = split ? Number(m[2]) : 1;
  checkScale(scale, spec);
  checkRef(ref);
  return { ref, scale };
}

export function checkScale(scale: number, what: string | number = scale): void {
  if (!Number.isFinite(scale) || Math.abs(scale) > MAX_LORA_SCALE) {
    throw new LoraError('lora_bad_spec', `LoRA scale in ${JSON.stringify(what)} must be a number between -${MAX_LORA_SCALE} and ${MAX_LORA_SCALE}`);
  }
}

function checkRef(ref: string): void {
  if (!ref.trim()) throw new LoraError('lora_bad_spec', 'empty LoRA reference');
  if (ref.length > MAX_REF_LENGTH) throw new LoraError('lora_bad_spec', `LoRA reference is longer than ${MAX_REF_LENGTH} characters`);
  if (ref.includes('\0')) throw new LoraError('lora_bad_spec', 'LoRA reference contains a NUL byte');
}

export interface LoraSourceOptions {
  /** Folder relative paths are looked up in; for the service the only place local files may come from. */
  loraDir?: string;
  /** CLI: any existing local path is a LoRA file (the user owns the machine). */
  anyLocalPath?: boolean;
  /** Default `$KLEIN_CACHE_DIR/loras` (~/.cache/klein/loras). */
  cacheDir?: string;
  /** https URLs: the SSRF policy; absent or false: URLs are refused. */
  urls?: { policy: NetPolicy; timeoutMs?: number; maxRedirects?: number } | false;
  /** Hub references; absent or false: refused. */
  hub?: { hubUrl?: string; token?: string; fetch?: typeof fetch } | false;
  /** Cap on downloaded bytes (URL and Hub); default DEFAULT_MAX_LORA_BYTES. */
  maxBytes?: number;
  /** Runs on the file before it is stored and before it is returned (e.g. `f => loadLora(f, cfg)`); throw to refuse. */
  validate?: (file: string, label: string) => void;
}

export interface ResolvedLora {
  ref: string;
  kind: 'file' | 'url' | 'hub';
  file: string;
  sha256: string;
  bytes: number;
  /** A download found in the cache (no transfer). */
  cached: boolean;
}

export function loraCacheDir(): string {
  return path.join(process.env.KLEIN_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'klein'), 'loras');
}

const HUB_REF = /^([A-Za-z0-9][\w.-]*\/[\w.-]+)(?:\/((?:[\w.-]+\/)*[\w.-]+\.safetensors))?$/;

/** Finds (and downloads, if needed) the LoRA file a reference names. Throws `LoraError`. */
export async function resolveLora(ref: string, opts: LoraSourceOptions): Promise<ResolvedLora> {
  checkRef(ref);
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(ref)) return fetchUrl(ref, opts);
  const local = localFile(ref, opts);
  if (local) return local;
  const hub = HUB_REF.exec(ref);
  // `dir/file.safetensors` that does not exist is a missing file, not the Hub repository "dir/file.safetensors"
  if (hub && isRepoId(hub[1]) && !hub[1].endsWith('.safetensors') && !ref.split('/').some((s) => s === '..' || s === '.')) return fetchHub(ref, hub[1], hub[2], opts);
  throw new LoraError('lora_not_found', `LoRA "${ref}" is ${opts.loraDir ? `not a file under the LoRA folder${opts.anyLocalPath ? ' nor an existing file' : ''}` : 'not an existing file'}, an https URL or a Hub reference (owner/name[/file.safetensors])`);
}

function localFile(ref: string, opts: LoraSourceOptions): ResolvedLora | undefined {
  if (opts.anyLocalPath && fs.existsSync(ref)) return describeFile(ref, ref, 'file', false, opts);
  if (!opts.loraDir) return undefined;
  if (path.isAbsolute(ref) || ref.includes('\\') || ref.split('/').some((s) => s === '..')) {
    throw new LoraError('lora_bad_spec', `LoRA path "${ref}" must be relative to the LoRA folder, without ".." or backslashes`);
  }
  const root = fs.realpathSync(opts.loraDir);
  const candidate = path.join(root, ref);
  if (!fs.existsSync(candidate)) return undefined;
  // a symlink inside the folder must not lead outside it
  const real = fs.realpathSync(candidate);
  if (!real.startsWith(root + path.sep)) throw new LoraError('lora_bad_spec', `LoRA path "${ref}" leads outside the LoRA folder`);
  return describeFile(real, ref, 'file', false, opts);
}

const hashMemo = new Map<string, { size: number; mtimeMs: number; sha256: string }>();

function describeFile(file: string, ref: string, kind: ResolvedLora['kind'], cached: boolean, opts: LoraSourceOptions, sha256?: string): ResolvedLora {
  const st = fs.statSync(file);
  if (!st.isFile()) throw new LoraError('lora_bad_spec', `LoRA "${ref}" is not a file`);
  if (!file.endsWith('.safetensors')) throw new LoraError('lora_unsupported', `LoRA "${ref}" is not a .safetensors file (pickled .ckpt/.pt/.bin LoRAs are not loaded)`);
  const abs = path.resolve(file);
  let sha = sha256;
  if (!sha) {
    const memo = hashMemo.get(abs);
    sha = memo && memo.size === st.size && memo.mtimeMs === st.mtimeMs ? memo.sha256 : hashFile(abs);
    hashMemo.set(abs, { size: st.size, mtimeMs: st.mtimeMs, sha256: sha });
  }
  checkHeader(abs, ref);
  opts.validate?.(abs, ref);
  return { ref, kind, file: abs, sha256: sha, bytes: st.size, cached };
}

function hashFile(file: string): string {
  const h = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(4 * 1024 * 1024);
    for (let n; (n = fs.readSync(fd, buf, 0, buf.length, null)) > 0; ) h.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

function checkHeader(file: string, ref: string): void {
  try {
    new SafetensorsFile(file);
  } catch (e) {
    throw new LoraError('lora_invalid', `LoRA "${ref}" is not a valid safetensors file: ${(e as Error).message.replace(`${file}: `, '')}`);
  }
}

/** Checks a downloaded file under a temporary name, then gives it its content name; removes it if refused. */
function store(tmp: string, sha256: string, ref: string, kind: ResolvedLora['kind'], opts: LoraSourceOptions): ResolvedLora {
  const cache = opts.cacheDir ?? loraCacheDir();
  const final = path.join(cache, `${sha256}.safetensors`);
  try {
    checkHeader(tmp, ref);
    opts.validate?.(tmp, ref);
    fs.renameSync(tmp, final);
  } finally {
    fs.rmSync(tmp, { force: true });
  }
  return { ref, kind, file: final, sha256, bytes: fs.statSync(final).size, cached: false };
}

function tmpName(cache: string): string {
  fs.mkdirSync(cache, { recursive: true });
  return path.join(cache, `.tmp-${process.pid}-${crypto.randomBytes(6).toString('hex')}`);
}

function cachedBlob(sha256: string, size: number | undefined, opts: LoraSourceOptions): string | undefined {
  const f = path.join(opts.cacheDir ?? loraCacheDir(), `${sha256}.safetensors`);
  return fs.existsSync(f) && (size === undefined || fs.statSync(f).size === size) ? f : undefined;
}

interface UrlIndexEntry {
  url: string;
  sha256: string;
  bytes: number;
}

async function fetchUrl(url: string, opts: LoraSourceOptions): Promise<ResolvedLora> {
  if (!opts.urls) throw new LoraError('lora_bad_spec', `LoRA URLs are not accepted here: ${url.slice(0, 100)}`);
  const { policy, timeoutMs = 120_000, maxRedirects = 3 } = opts.urls;
  const maxBytes = opts.maxBytes ?? DEFAULT_MAX_LORA_BYTES;
  try {
    checkUrl(url, policy);
  } catch (e) {
    throw fetchError(e, url, maxBytes);
  }
  const cache = opts.cacheDir ?? loraCacheDir();
  const indexFile = path.join(cache, 'urls', `${crypto.createHash('sha256').update(url).digest('hex')}.json`);
  const known = readIndex(indexFile);
  const hit = known && cachedBlob(known.sha256, known.bytes, opts);
  if (hit) return describeFile(hit, url, 'url', true, opts, known.sha256);
  let body: Buffer;
  try {
    const res = await guardedRequest(url, { timeoutMs, maxBytes, maxRedirects, policy });
    if (res.status !== 200) throw new LoraError('lora_fetch_failed', `LoRA URL ${url.slice(0, 200)} answered HTTP ${res.status}`);
    body = res.body;
  } catch (e) {
    throw fetchError(e, url, maxBytes);
  }
  const sha256 = crypto.createHash('sha256').update(body).digest('hex');
  const existing = cachedBlob(sha256, body.length, opts);
  let resolved: ResolvedLora;
  if (existing) resolved = describeFile(existing, url, 'url', true, opts, sha256);
  else {
    const tmp = tmpName(cache);
    fs.writeFileSync(tmp, body);
    resolved = store(tmp, sha256, url, 'url', opts);
  }
  writeIndex(indexFile, { url, sha256, bytes: body.length });
  return { ...resolved, ref: url };
}

function fetchError(e: unknown, url: string, maxBytes: number): LoraError {
  if (e instanceof LoraError) return e;
  const u = url.slice(0, 200);
  if (e instanceof FetchError) {
    if (e.code === 'BLOCKED') return new LoraError('lora_blocked', `LoRA URL ${u} refused: ${e.message}`);
    if (e.code === 'TOO_LARGE') return new LoraError('lora_too_large', `LoRA URL ${u} is larger than the ${maxBytes}-byte limit (${e.message})`);
    if (e.code === 'BAD_URL') return new LoraError('lora_bad_spec', `LoRA URL refused: ${e.message}`);
    return new LoraError('lora_fetch_failed', `LoRA URL ${u} could not be fetched: ${e.message}`);
  }
  return new LoraError('lora_fetch_failed', `LoRA URL ${u} could not be fetched: ${(e as Error).message}`);
}

function readIndex(file: string): UrlIndexEntry | undefined {
  try {
    const v = JSON.parse(fs.readFileSync(file, 'utf8')) as UrlIndexEntry;
    return /^[0-9a-f]{64}$/.test(v.sha256) && Number.isInteger(v.bytes) ? v : undefined;
  } catch {
    return undefined;
  }
}

function writeIndex(file: string, entry: UrlIndexEntry): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, JSON.stringify(entry));
  fs.renameSync(tmp, file);
}

async function fetchHub(ref: string, repo: string, wanted: string | undefined, opts: LoraSourceOptions): Promise<ResolvedLora> {
  if (!opts.hub) throw new LoraError('lora_bad_spec', `Hub LoRA references are not accepted here: ${ref}`);
  const hubUrl = (opts.hub.hubUrl ?? process.env.HF_ENDPOINT ?? DEFAULT_HUB_URL).replace(/\/+$/, '');
  const token = opts.hub.token ?? process.env.HF_TOKEN ?? undefined;
  const maxBytes = opts.maxBytes ?? DEFAULT_MAX_LORA_BYTES;
  const listing: Array<{ path: string; size: number; sha256?: string }> = [];
  try {
    for await (const e of listFiles({ repo, recursive: true, hubUrl, accessToken: token, fetch: opts.hub.fetch })) {
      if (e.type === 'file' && e.path.endsWith('.safetensors')) listing.push({ path: e.path, size: e.lfs?.size ?? e.size, sha256: e.lfs?.oid });
    }
  } catch (e) {
    const status = (e as { statusCode?: number }).statusCode;
    if (status === 404) throw new LoraError('lora_not_found', `LoRA ${ref}: no such Hub repository`);
    throw new LoraError('lora_fetch_failed', `LoRA ${ref}: cannot list the Hub repository: ${(e as Error).message}${status === 401 || status === 403 ? ' (gated or private: set HF_TOKEN)' : ''}`);
  }
  const file = pickHubFile(ref, listing, wanted);
  if (file.size > maxBytes) throw new LoraError('lora_too_large', `LoRA ${ref}: ${file.path} is ${file.size} bytes, larger than the ${maxBytes}-byte limit`);
  const hit = file.sha256 && cachedBlob(file.sha256, file.size, opts);
  if (hit) return describeFile(hit, ref, 'hub', true, opts, file.sha256);
  const cache = opts.cacheDir ?? loraCacheDir();
  const tmpDir = tmpName(cache);
  try {
    await pullModel({ repo, files: [file.path], dest: tmpDir, hubUrl, token, fetch: opts.hub.fetch, retries: 2 });
    const got = path.join(tmpDir, file.path);
    const sha256 = file.sha256 ?? hashFile(got);
    const existing = cachedBlob(sha256, file.size, opts);
    if (existing) return describeFile(existing, ref, 'hub', true, opts, sha256);
    const tmp = `${tmpDir}.file`;
    fs.renameSync(got, tmp);
    return store(tmp, sha256, ref, 'hub', opts);
  } catch (e) {
    if (e instanceof PullError) throw new LoraError(e.status === 404 ? 'lora_not_found' : 'lora_fetch_failed', `LoRA ${ref}: ${e.message}`);
    throw e;
  } finally {
    fs.rmSync(tmpDir, { recursive: true, force: true });
  }
}

function pickHubFile<T extends { path: string }>(ref: string, listing: T[], wanted: string | undefined): T {
  if (wanted) {
    const f = listing.find((x) => x.path === wanted);
    if (!f) throw new LoraError('lora_not_found', `LoRA ${ref}: the repository has no ${wanted}`);
    return f;
  }
  const top = listing.filter((x) => !x.path.includes('/'));
  if (top.length === 1) return top[0];
  const diffusersName = top.find((x) => x.path === 'pytorch_lora_weights.safetensors');
  if (diffusersName) return diffusersName;
  if (top.length === 0) throw new LoraError('lora_not_found', `LoRA ${ref}: the repository holds no top-level .safetensors file; name one as owner/name/path.safetensors`);
  throw new LoraError('lora_bad_spec', `LoRA ${ref}: the repository holds ${top.length} .safetensors files (${top.slice(0, 5).map((x) => x.path).join(', ')}); name one as ${ref}/FILE.safetensors`);
}
