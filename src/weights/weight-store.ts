// Where a model's graphs find their weights: one folder per (checkpoint, weight policy, weight set) under
// `$KLEIN_CACHE_DIR/weights/` holding `weights.bin` (every weight that needs computing — widened to fp32,
// narrowed to fp16, transposed, quantized — written once by worker threads, one per core), hard links to the checkpoint files
// whose tensors are used as stored, and the compiled .onnx graphs, which reference both by relative path (ORT
// resolves external data only below the model's folder and refuses symlinks that leave it). ORT maps these files:
// the weights are page cache, reclaimable by the kernel and shared between sessions and processes, and a cached
// model opens in seconds.
//
// Trust: the folder is built under a temporary name and renamed into place after `weights.bin` is fsync'ed and
// the manifest (source identity, file size, crc32 of every weight) written, so a folder that exists is whole. An
// open checks the manifest, the sizes, the hard links' inodes and the crc32 of every weight's first and last
// 64 KiB (truncation, zeroed or foreign blocks); a failed check removes the folder and builds it again.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Worker } from 'node:worker_threads';
import zlib from 'node:zlib';
import { ELEM_SIZE } from './dtypes.ts';
import { sourceIdentity, storedInPlace, type WeightRef } from './weight-ref.ts';
import type { ConversionStats } from './weight-values.ts';
import { startWorker } from './worker.ts';

export interface ExternalLocation {
  location: string;
  offset: number;
  length: number;
}

export interface WeightStoreOptions {
  /** Names the model in the folder name, e.g. `flux2-transformer`. */
  component: string;
  /** Names the weight policy, e.g. `fp32`, `int8`, `gpu-fp16`. */
  tag: string;
  refs: readonly WeightRef[];
  /** Default `$KLEIN_CACHE_DIR` or ~/.cache/klein. */
  cacheRoot?: string;
  /** While `weights.bin` is written: after each weight. */
  onProgress?: (done: number, total: number, key: string) => void;
  /** Build again even if a valid folder exists (benchmarks of the first load). */
  rebuild?: boolean;
  /**
   * A module exporting `createQuantizer(): Promise<Int8Quantizer>` (runtime/int8-quantizer.ts), which each
   * conversion worker imports when a ref is quantized: the runtime runs the scheme, this layer only stores it.
   */
  quantizer?: URL;
}

const FORMAT = 'klein-weights-1';
const ALIGN = 64;
const SPOT = 64 * 1024;

interface Entry {
  offset: number;
  length: number;
  /** crc32 of the first and last SPOT bytes (all of it when shorter). */
  head: number;
  tail: number;
}

interface Manifest {
  format: string;
  identity: string;
  /** The checkpoint files (real paths) the weights come from: a later build from the same paths replaces this one. */
  sources: string[];
  size: number;
  entries: Record<string, Entry>;
  /** In-place refs: the hard link (relative path) and the byte range in it. */
  inPlace: Record<string, ExternalLocation>;
  links: Record<string, { source: string; ino: number }>;
  stats: ConversionStats;
}

export function kleinCacheRoot(): string {
  return process.env.KLEIN_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'klein');
}

function sourceFiles(refs: readonly WeightRef[]): string[] {
  return [...new Set(refs.flatMap((r) => r.source.parts.map((p) => fs.realpathSync(p.file))))].sort();
}

function fileIdentity(f: string): string {
  const st = fs.statSync(f);
  return `${f}:${st.size}:${Math.floor(st.mtimeMs)}`;
}

function recipe(r: WeightRef): unknown {
  return [r.key, r.type, r.dims, r.transform, r.source.cols ?? null, r.source.parts.map((p) => [p.name, p.dtype, p.shape, p.dataOffset, p.byteLength])];
}

function spotCrc(bytes: Uint8Array): { head: number; tail: number } {
  return { head: zlib.crc32(bytes.subarray(0, SPOT)), tail: zlib.crc32(bytes.subarray(Math.max(0, bytes.length - SPOT))) };
}

/** A model's weight folder, opened (checked) or built. */
export class WeightStore {
  private constructor(
    /** The folder; compiled graphs are written here. */
    readonly folder: string,
    private readonly manifest: Manifest,
    /** True when this open computed the weights (no valid folder existed). */
    readonly built: boolean,
  ) {}

  /** fp16 narrowing: weights beyond ±65504 clamped while the folder was built. */
  get stats(): ConversionStats {
    return this.manifest.stats;
  }

  /** Where `ref`'s bytes are, relative to the folder. */
  locate(ref: WeightRef): ExternalLocation {
    const inPlace = this.manifest.inPlace[ref.key];
    if (inPlace) return inPlace;
    const e = this.manifest.entries[ref.key];
    if (!e) throw new Error(`weight ${ref.key} is not in ${this.folder}`);
    return { location: 'weights.bin', offset: e.offset, length: e.length };
  }

  /** Bytes of the weights ORT maps from this folder for the given refs (file-backed memory while they run). */
  static bytes(refs: readonly WeightRef[]): number {
    return refs.reduce((n, r) => n + r.dims.reduce((a, b) => a * b, ELEM_SIZE[r.type]), 0);
  }

  static async open(o: WeightStoreOptions): Promise<WeightStore> {
    const refs = dedupe(o.refs);
    const files = sourceFiles(refs);
    const identity = JSON.stringify(files.map(fileIdentity));
    const hash = crypto.createHash('sha256').update(JSON.stringify({ FORMAT, identity, refs: refs.map(recipe) })).digest('hex').slice(0, 16);
    const root = path.join(o.cacheRoot ?? kleinCacheRoot(), 'weights');
    const folder = path.join(root, `${o.component}-${o.tag}-${hash}`);
    if (!o.rebuild) {
      const m = readValid(folder, identity, refs);
      if (m) return new WeightStore(folder, m, false);
    }
    fs.rmSync(folder, { recursive: true, force: true });
    const manifest = await build(folder, identity, files, refs, o);
    removeStale(root, `${o.component}-${o.tag}-`, files, folder);
    return new WeightStore(folder, manifest, true);
  }
}

function dedupe(refs: readonly WeightRef[]): WeightRef[] {
  const byKey = new Map<string, WeightRef>();
  for (const r of refs) if (!byKey.has(r.key)) byKey.set(r.key, r);
  return [...byKey.values()];
}

/** The folder's manifest when everything in it checks out, else undefined (and a damaged folder is removed). */
function readValid(folder: string, identity: string, refs: readonly WeightRef[]): Manifest | undefined {
  let m: Manifest;
  try {
    m = JSON.parse(fs.readFileSync(path.join(folder, 'manifest.json'), 'utf8')) as Manifest;
  } catch {
    return undefined;
  }
  const problem = checkManifest(folder, m, identity, refs);
  if (!problem) return m;
  fs.rmSync(folder, { recursive: true, force: true });
  return undefined;
}

function checkManifest(folder: string, m: Manifest, identity: string, refs: readonly WeightRef[]): string | undefined {
  if (m.format !== FORMAT || m.identity !== identity) return 'foreign manifest';
  for (const r of refs) if (!m.entries[r.key] && !m.inPlace[r.key]) return `missing ${r.key}`;
  for (const [rel, link] of Object.entries(m.links)) {
    const st = fs.statSync(path.join(folder, rel), { throwIfNoEntry: false });
    if (!st || st.ino !== link.ino) return `link ${rel} is gone`;
  }
  const bin = path.join(folder, 'weights.bin');
  const st = fs.statSync(bin, { throwIfNoEntry: false });
  if (!st || st.size !== m.size) return 'weights.bin has the wrong size';
  const fd = fs.openSync(bin, 'r');
  try {
    for (const e of Object.values(m.entries)) {
      const n = Math.min(SPOT, e.length);
      const head = Buffer.allocUnsafe(n);
      const tail = Buffer.allocUnsafe(n);
      fs.readSync(fd, head, 0, n, e.offset);
      fs.readSync(fd, tail, 0, n, e.offset + e.length - n);
      if (zlib.crc32(head) !== e.head || zlib.crc32(tail) !== e.tail) return 'a weight does not match its checksum';
    }
  } finally {
    fs.closeSync(fd);
  }
  return undefined;
}

/** Hard-links the checkpoint files of in-place refs into `dir/src/`; refs whose file cannot be linked are converted. */
function linkSources(dir: string, refs: readonly WeightRef[]): { inPlace: Manifest['inPlace']; links: Manifest['links']; convert: WeightRef[] } {
  const inPlace: Manifest['inPlace'] = {};
  const links: Manifest['links'] = {};
  const linkedAs = new Map<string, string | null>();
  const convert: WeightRef[] = [];
  for (const r of refs) {
    if (!storedInPlace(r)) {
      convert.push(r);
      continue;
    }
    const part = r.source.parts[0];
    const real = fs.realpathSync(part.file);
    if (!linkedAs.has(real)) {
      const rel = `src/${linkedAs.size}-${path.basename(real)}`;
      fs.mkdirSync(path.join(dir, 'src'), { recursive: true });
      try {
        fs.linkSync(real, path.join(dir, rel));
        links[rel] = { source: real, ino: fs.statSync(real).ino };
        linkedAs.set(real, rel);
      } catch {
        linkedAs.set(real, null); // another filesystem or no permission: its weights are copied instead
      }
    }
    const rel = linkedAs.get(real);
    if (rel) inPlace[r.key] = { location: rel, offset: part.dataOffset, length: part.byteLength };
    else convert.push(r);
  }
  return { inPlace, links, convert };
}

async function build(folder: string, identity: string, sources: string[], refs: readonly WeightRef[], o: Pick<WeightStoreOptions, 'onProgress' | 'quantizer'>): Promise<Manifest> {
  const tmp = `${folder}.tmp-${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
  fs.mkdirSync(tmp, { recursive: true });
  try {
    const { inPlace, links, convert } = linkSources(tmp, refs);
    const jobs: ConvertJob[] = [];
    let size = 0;
    for (const ref of convert) {
      const length = WeightStore.bytes([ref]);
      jobs.push({ ref, offset: size, length });
      size += Math.ceil(length / ALIGN) * ALIGN;
    }
    const done = await convertInWorker(path.join(tmp, 'weights.bin'), size, jobs, o);
    const entries: Manifest['entries'] = {};
    jobs.forEach((j, i) => (entries[j.ref.key] = { offset: j.offset, length: j.length, ...done.crcs[i] }));
    const manifest: Manifest = { format: FORMAT, identity, sources, size, entries, inPlace, links, stats: done.stats };
    fs.writeFileSync(path.join(tmp, 'manifest.json'), JSON.stringify(manifest));
    try {
      fs.renameSync(tmp, folder);
    } catch (e) {
      // another process built the same folder meanwhile: use theirs
      const theirs = readValid(folder, identity, refs);
      if (!theirs) throw e;
      fs.rmSync(tmp, { recursive: true, force: true });
      return theirs;
    }
    return manifest;
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
}

/**
 * Older folders of the same model and policy built from the same checkpoint paths — an earlier weight set, or the
 * same paths before the checkpoint was rewritten (their hard links would keep its old blocks on disk): nothing will
 * open them again.
 */
function removeStale(root: string, prefix: string, sources: string[], keep: string): void {
  for (const name of fs.readdirSync(root)) {
    const dir = path.join(root, name);
    if (!name.startsWith(prefix) || dir === keep || name.includes('.tmp-')) continue;
    try {
      const m = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as Manifest;
      if (JSON.stringify(m.sources) === JSON.stringify(sources)) fs.rmSync(dir, { recursive: true, force: true });
    } catch {
      // not ours to judge
    }
  }
}

export interface ConvertJob {
  ref: WeightRef;
  offset: number;
  length: number;
}

export interface ConvertResult {
  crcs: Array<{ head: number; tail: number }>;
  stats: ConversionStats;
}

/** Messages of weight-convert-worker.ts. */
export type ConvertMessage = { kind: 'progress'; key: string } | { kind: 'done'; result: ConvertResult } | { kind: 'error'; message: string };

/**
 * Converts `jobs` into `file` on one worker thread per core: contiguous groups of about equal bytes, cut only where
 * the source changes (a source's quantized outputs come from one computation, kept by the worker that made it).
 */
async function convertInWorker(file: string, size: number, jobs: ConvertJob[], o: Pick<WeightStoreOptions, 'onProgress' | 'quantizer'>): Promise<ConvertResult> {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
  } finally {
    fs.closeSync(fd);
  }
  let done = 0;
  const progress = (key: string) => o.onProgress?.(++done, jobs.length, key);
  const groups = jobGroups(jobs, Math.min(os.availableParallelism(), MAX_CONVERT_WORKERS));
  const workers: Worker[] = [];
  // one failure ends the build: the other workers stop rather than write into a folder about to be removed
  const results = await Promise.all(groups.map((g) => convertGroup(file, g, o.quantizer, progress, workers))).catch(async (e: unknown) => {
    await Promise.all(workers.map((w) => w.terminate()));
    throw e;
  });
  return { crcs: results.flatMap((r) => r.crcs), stats: { fp16Overflows: results.reduce((n, r) => n + r.stats.fp16Overflows, 0) } };
}

/** More workers than this only add memory: the conversion also reads and writes the disk. */
const MAX_CONVERT_WORKERS = 4;

/** `jobs` cut into at most `n` contiguous groups of about equal bytes, never between two refs of one source. */
function jobGroups(jobs: ConvertJob[], n: number): ConvertJob[][] {
  const total = jobs.reduce((a, j) => a + j.length, 0);
  const groups: ConvertJob[][] = [[]];
  let bytes = 0;
  jobs.forEach((job, i) => {
    const sameSource = i > 0 && sourceIdentity(jobs[i - 1].ref.source) === sourceIdentity(job.ref.source);
    if (!sameSource && groups.length < n && bytes >= (total * groups.length) / n) groups.push([]);
    groups[groups.length - 1].push(job);
    bytes += job.length;
  });
  return groups.filter((g) => g.length > 0);
}

function convertGroup(file: string, jobs: ConvertJob[], quantizer: URL | undefined, progress: (key: string) => void, workers: Worker[]): Promise<ConvertResult> {
  return new Promise((resolve, reject) => {
    const worker = startWorker(new URL('./weight-convert-worker.ts', import.meta.url), { file, jobs, quantizer: quantizer?.href });
    workers.push(worker);
    let settled = false;
    worker.on('message', (m: ConvertMessage) => {
      if (m.kind === 'progress') progress(m.key);
      else if (m.kind === 'done') {
        settled = true;
        resolve(m.result);
      } else {
        settled = true;
        reject(new Error(m.message));
      }
    });
    worker.on('error', (e) => {
      settled = true;
      reject(e);
    });
    worker.on('exit', (code) => {
      if (!settled) reject(new Error(`the weight conversion worker exited with code ${code}`));
    });
  });
}

export { spotCrc };
