// The on-disk cache of int8-quantized weights (fast mode, issue 13): quantizing klein 4B's transformer reads and
// converts ~7 GB of bf16, so it is done once per checkpoint and the int8 values + scales are kept in one
// .safetensors file under `$KLEIN_CACHE_DIR/int8/` (default ~/.cache/klein/int8/). The folder name hashes what the
// numbers depend on: the model, the quantization scheme, the identity of the source checkpoint files (real path,
// size, mtime) and the list of quantized weights with their shapes. So a changed checkpoint, scheme or layer policy
// gets a fresh cache instead of stale numbers.
//
// Trust: the weights file is written to a temp name and renamed, then a manifest (identity, file size, crc32 of
// every tensor) likewise; the manifest is written last, so a cache without one is incomplete. On open the manifest,
// the header and the file size are checked (a truncated or foreign file is rebuilt); on `get` each tensor's crc32 is
// checked as its bytes are read (zlib.crc32, ~2.5 GB/s), and a mismatch deletes the cache and throws
// Int8CacheCorruptError, so the caller can reopen (which rebuilds) instead of running on damaged weights.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { INT8_SCHEME, quantizeInt8, quantizeInt8Residual, type Int8Weight } from '../graph/quantize.ts';
import { SafetensorsFile, readRaw, writeSafetensors, type TensorInfo, type TensorToWrite } from './safetensors.ts';

/** One weight to quantize. */
export interface Int8CacheEntry {
  /** Unique key within the model (e.g. the checkpoint name plus a row range); names the tensors in the file. */
  key: string;
  outFeatures: number;
  inFeatures: number;
  /** The fp32 weight `[out, in]`, read from the checkpoint; called only while the cache is built. */
  read(): Float32Array;
}

export interface Int8CacheOptions {
  /** Names the model in the cache folder, e.g. `flux2-transformer`. */
  model: string;
  /** Checkpoint files the weights come from; their identity keys the cache. */
  sourceFiles: string[];
  entries: Int8CacheEntry[];
  /** Called while the cache is built, after each weight is quantized and written. */
  onProgress?: (done: number, total: number, key: string) => void;
  /** Cache root; default `$KLEIN_CACHE_DIR` or ~/.cache/klein. */
  cacheRoot?: string;
  /** Quantize again even if a valid cache exists (benchmarks measuring the first load). */
  rebuild?: boolean;
  /** Also store each weight's `quantizeInt8Residual` (`<key>.int8r`, `<key>.scaler`): issue-21 experiment. */
  residual?: boolean;
}

/** A cache file whose bytes do not match its manifest; the file has been removed, reopen to rebuild it. */
export class Int8CacheCorruptError extends Error {
  constructor(readonly file: string, detail: string) {
    super(`int8 weight cache ${file} is corrupt (${detail}); it was removed and is rebuilt on the next open`);
    this.name = 'Int8CacheCorruptError';
  }
}

const FORMAT = 'klein-int8-cache-1';
const WEIGHTS = 'weights.safetensors';
const MANIFEST = 'manifest.json';

interface Manifest {
  format: string;
  identity: string;
  scheme: string;
  size: number;
  crc32: Record<string, number>;
}

function cacheRootDir(root?: string): string {
  return root ?? process.env.KLEIN_CACHE_DIR ?? path.join(os.homedir(), '.cache', 'klein');
}

function fileIdentity(f: string): string {
  const st = fs.statSync(f);
  return `${fs.realpathSync(f)}:${st.size}:${Math.floor(st.mtimeMs)}`;
}

/** Hash of everything the cached numbers depend on. */
function identityOf(o: Int8CacheOptions): string {
  return crypto
    .createHash('sha256')
    .update(JSON.stringify({
      format: FORMAT,
      model: o.model,
      scheme: INT8_SCHEME,
      sources: o.sourceFiles.map(fileIdentity).sort(),
      entries: o.entries.map((e) => [e.key, e.outFeatures, e.inFeatures]),
      ...(o.residual ? { residual: true } : {}),
    }))
    .digest('hex');
}

/** The folder the cache for these options lives in (whether built or not). */
export function int8CacheFolder(o: Int8CacheOptions): string {
  return path.join(cacheRootDir(o.cacheRoot), 'int8', `${o.model}-${identityOf(o).slice(0, 16)}`);
}

const qName = (key: string) => `${key}.int8`;
const sName = (key: string) => `${key}.scale`;

function writeAtomic(file: string, data: string): void {
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, data);
  fs.renameSync(tmp, file);
}

/** Bytes of a tensor, crc32-checked, aligned for a typed-array view. */
function readChecked(t: TensorInfo, crc: number | undefined, onBad: (detail: string) => never): Uint8Array {
  let raw: Uint8Array = readRaw(t);
  if (crc === undefined || zlib.crc32(raw) !== crc) onBad(`${t.name}: checksum mismatch`);
  // a small Buffer may sit at an odd offset of Node's pool: copy before viewing it as 32-bit words
  if (raw.byteOffset % 4 !== 0) raw = new Uint8Array(raw);
  return raw;
}

/** The int8 weights of one model, built on first open and read (verified) from disk after. */
export class Int8Cache {
  private constructor(
    readonly folder: string,
    readonly file: string,
    private readonly st: SafetensorsFile,
    private readonly manifest: Manifest,
    /** True when this open quantized the weights (a cache miss). */
    readonly built: boolean,
  ) {}

  /** Opens the cache for `o`, quantizing and writing every entry first if no valid cache exists. */
  static open(o: Int8CacheOptions): Int8Cache {
    const keys = new Set<string>();
    for (const e of o.entries) {
      if (keys.has(e.key)) throw new Error(`int8 cache ${o.model}: duplicate key ${e.key}`);
      keys.add(e.key);
    }
    const identity = identityOf(o);
    const folder = path.join(cacheRootDir(o.cacheRoot), 'int8', `${o.model}-${identity.slice(0, 16)}`);
    const file = path.join(folder, WEIGHTS);
    const valid = o.rebuild ? undefined : Int8Cache.tryOpen(folder, identity, o.entries);
    if (valid) return new Int8Cache(folder, file, valid.st, valid.manifest, false);
    const manifest = Int8Cache.build(folder, identity, o);
    return new Int8Cache(folder, file, new SafetensorsFile(file), manifest, true);
  }

  /** The cache in `folder` if its manifest, header and size agree with what is expected; else undefined. */
  private static tryOpen(folder: string, identity: string, entries: Int8CacheEntry[]): { st: SafetensorsFile; manifest: Manifest } | undefined {
    const file = path.join(folder, WEIGHTS);
    try {
      const manifest = JSON.parse(fs.readFileSync(path.join(folder, MANIFEST), 'utf8')) as Manifest;
      if (manifest.format !== FORMAT || manifest.identity !== identity || manifest.scheme !== INT8_SCHEME) return undefined;
      if (fs.statSync(file).size !== manifest.size) return undefined;
      const st = new SafetensorsFile(file);
      if (st.metadata.klein_int8_identity !== identity) return undefined;
      for (const e of entries) {
        const q = st.tensors.get(qName(e.key));
        const s = st.tensors.get(sName(e.key));
        if (q?.dtype !== 'I8' || q.shape.join() !== `${e.inFeatures},${e.outFeatures}`) return undefined;
        if (s?.dtype !== 'F32' || s.shape.join() !== `${e.outFeatures}`) return undefined;
        if (typeof manifest.crc32[q.name] !== 'number' || typeof manifest.crc32[s.name] !== 'number') return undefined;
      }
      return { st, manifest };
    } catch {
      return undefined; // missing, unreadable or not a safetensors file: rebuild
    }
  }

  /** Quantizes every entry into a fresh weights file (one weight in memory at a time), then writes the manifest. */
  private static build(folder: string, identity: string, o: Int8CacheOptions): Manifest {
    fs.mkdirSync(folder, { recursive: true });
    fs.rmSync(path.join(folder, MANIFEST), { force: true }); // the old manifest must not vouch for the new file
    const file = path.join(folder, WEIGHTS);
    const crc32: Record<string, number> = {};
    const tensors: Record<string, TensorToWrite> = {};
    let current: { key: string; w: Int8Weight; r?: Int8Weight } | undefined;
    const quantized = (e: Int8CacheEntry): Int8Weight => {
      if (current?.key !== e.key) {
        const w = e.read();
        const qw = quantizeInt8(w, e.outFeatures, e.inFeatures);
        current = { key: e.key, w: qw, r: o.residual ? quantizeInt8Residual(w, qw) : undefined };
      }
      return current.w;
    };
    o.entries.forEach((e, i) => {
      tensors[qName(e.key)] = {
        dtype: 'I8',
        shape: [e.inFeatures, e.outFeatures],
        data: () => {
          const q = quantized(e).q;
          const bytes = new Uint8Array(q.buffer, q.byteOffset, q.byteLength);
          crc32[qName(e.key)] = zlib.crc32(bytes);
          return bytes;
        },
      };
      tensors[sName(e.key)] = {
        dtype: 'F32',
        shape: [e.outFeatures],
        data: () => {
          const s = quantized(e).scale;
          crc32[sName(e.key)] = zlib.crc32(new Uint8Array(s.buffer, s.byteOffset, s.byteLength));
          if (!o.residual) current = undefined; // both tensors written: let the weight go
          o.onProgress?.(i + 1, o.entries.length, e.key);
          return s;
        },
      };
      if (o.residual) {
        tensors[`${e.key}.int8r`] = {
          dtype: 'I8',
          shape: [e.inFeatures, e.outFeatures],
          data: () => {
            quantized(e);
            const q = current!.r!.q;
            const bytes = new Uint8Array(q.buffer, q.byteOffset, q.byteLength);
            crc32[`${e.key}.int8r`] = zlib.crc32(bytes);
            return bytes;
          },
        };
        tensors[`${e.key}.scaler`] = {
          dtype: 'F32',
          shape: [e.outFeatures],
          data: () => {
            quantized(e);
            const r = current!.r!.scale;
            crc32[`${e.key}.scaler`] = zlib.crc32(new Uint8Array(r.buffer, r.byteOffset, r.byteLength));
            current = undefined; // all four tensors written: let the weight go
            return r;
          },
        };
      }
    });
    writeSafetensors(file, tensors, { format: 'klein-int8', klein_int8_identity: identity, scheme: INT8_SCHEME });
    const manifest: Manifest = { format: FORMAT, identity, scheme: INT8_SCHEME, size: fs.statSync(file).size, crc32 };
    writeAtomic(path.join(folder, MANIFEST), JSON.stringify(manifest));
    return manifest;
  }

  /**
   * Where `key`'s int8 values and scales lie in the cache file, for a graph that lets ORT read them from disk
   * (`Graph.weight`). Call `get` (or `verifyAll`) first: this does not check the bytes.
   */
  tensors(key: string): { q: TensorInfo; scale: TensorInfo; residual?: { q: TensorInfo; scale: TensorInfo } } {
    const q = this.st.tensors.get(qName(key));
    const scale = this.st.tensors.get(sName(key));
    if (!q || !scale) throw new Error(`int8 cache ${this.file}: no weight ${key}`);
    const rq = this.st.tensors.get(`${key}.int8r`);
    const rs = this.st.tensors.get(`${key}.scaler`);
    return { q, scale, residual: rq && rs ? { q: rq, scale: rs } : undefined };
  }

  /** `verify` of every stored weight (reads the whole file once, keeps nothing); a mismatch behaves as in `get`. */
  verifyAll(): void {
    for (const name of this.st.tensors.keys()) if (name.endsWith('.int8')) this.verify(name.slice(0, -'.int8'.length));
  }

  /**
   * Checks `key`'s stored bytes against their crc32 without keeping them (read in 4 MiB pieces), for graphs that let
   * ORT read the tensors from the file (`tensors`). A mismatch behaves as in `get`.
   */
  verify(key: string): void {
    const { q, scale, residual } = this.tensors(key);
    const buf = Buffer.allocUnsafe(4 << 20);
    const fd = fs.openSync(this.file, 'r');
    try {
      for (const t of [q, scale, ...(residual ? [residual.q, residual.scale] : [])]) {
        let crc = 0;
        for (let done = 0; done < t.byteLength; ) {
          const n = fs.readSync(fd, buf, 0, Math.min(buf.length, t.byteLength - done), t.dataOffset + done);
          if (n === 0) this.corrupt(`${t.name}: unexpected end of file`);
          crc = zlib.crc32(buf.subarray(0, n), crc);
          done += n;
        }
        if (crc !== this.manifest.crc32[t.name]) this.corrupt(`${t.name}: checksum mismatch`);
      }
    } finally {
      fs.closeSync(fd);
    }
  }

  private corrupt(detail: string): never {
    this.remove();
    throw new Int8CacheCorruptError(this.file, detail);
  }

  /** Whether the cache holds `key`. */
  has(key: string): boolean {
    return this.st.tensors.has(qName(key));
  }

  /**
   * The quantized weight stored under `key`, read from disk and checked against its crc32. A mismatch removes the
   * cache and throws Int8CacheCorruptError.
   */
  get(key: string): Int8Weight {
    const qi = this.st.tensors.get(qName(key));
    const si = this.st.tensors.get(sName(key));
    if (!qi || !si) throw new Error(`int8 cache ${this.file}: no weight ${key}`);
    const bad = (detail: string): never => {
      this.remove();
      throw new Int8CacheCorruptError(this.file, detail);
    };
    let q: Uint8Array;
    let s: Uint8Array;
    try {
      q = readChecked(qi, this.manifest.crc32[qi.name], bad);
      s = readChecked(si, this.manifest.crc32[si.name], bad);
    } catch (e) {
      if (e instanceof Int8CacheCorruptError) throw e;
      bad(`${key}: ${(e as Error).message}`); // e.g. truncated after it was opened
      throw e;
    }
    const [inFeatures, outFeatures] = qi.shape;
    return {
      q: new Int8Array(q.buffer, q.byteOffset, q.byteLength),
      scale: new Float32Array(s.buffer, s.byteOffset, outFeatures),
      inFeatures,
      outFeatures,
    };
  }

  /** Deletes the cache folder's files (a corrupt cache, or tests). */
  remove(): void {
    fs.rmSync(path.join(this.folder, MANIFEST), { force: true });
    fs.rmSync(this.file, { force: true });
  }
}
