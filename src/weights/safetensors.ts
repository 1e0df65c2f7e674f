// Safetensors: 8-byte little-endian header length N, N bytes of JSON header, then raw little-endian data.
// Tensors are located, never slurped: a 16 GB checkpoint is described by its header alone, and graphs reference the
// bytes in place (ONNX external data at `dataOffset`). Reading values is for small tensors (tests, BN statistics).
import fs from 'node:fs';
import path from 'node:path';

export type DType = 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'U8' | 'I8' | 'F64' | 'BOOL' | 'F8_E4M3' | 'F8_E5M2';

/** Bytes per element; the float8 types are recognised so they fail with "not supported", not "unknown". */
export const DTYPE_SIZE: Record<DType, number> = {
  F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, U8: 1, I8: 1, F64: 8, BOOL: 1, F8_E4M3: 1, F8_E5M2: 1,
};
const UNSUPPORTED: ReadonlySet<string> = new Set(['F8_E4M3', 'F8_E5M2']);

export class SafetensorsError extends Error {
  constructor(readonly file: string, message: string, readonly tensor?: string) {
    super(`${file}${tensor ? ` [${tensor}]` : ''}: ${message}`);
    this.name = 'SafetensorsError';
  }
}

export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
  /** Absolute path of the file holding the bytes. */
  file: string;
  /** Byte offset of the first element from the start of the file. */
  dataOffset: number;
  byteLength: number;
}

/** Largest header we accept; real checkpoints have headers of a few hundred KB. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;

export function elementCount(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** One `.safetensors` file: its header parsed and checked, its data read on demand. */
export class SafetensorsFile {
  readonly tensors = new Map<string, TensorInfo>();
  readonly metadata: Record<string, string> = {};
  readonly headerLength: number;

  constructor(readonly file: string) {
    this.file = path.resolve(file);
    let fd: number;
    try {
      fd = fs.openSync(this.file, 'r');
    } catch (e) {
      throw new SafetensorsError(this.file, `cannot open: ${(e as Error).message}`);
    }
    try {
      const size = fs.fstatSync(fd).size;
      if (size < 8) throw new SafetensorsError(this.file, `truncated: ${size} bytes, shorter than the 8-byte header length`);
      const lenBuf = Buffer.alloc(8);
      fs.readSync(fd, lenBuf, 0, 8, 0);
      const headerLength = Number(lenBuf.readBigUInt64LE(0));
      if (headerLength < 2 || headerLength > MAX_HEADER_BYTES || 8 + headerLength > size) {
        throw new SafetensorsError(this.file, `bad header length ${headerLength} for a file of ${size} bytes`);
      }
      this.headerLength = headerLength;
      const headerBuf = Buffer.alloc(headerLength);
      fs.readSync(fd, headerBuf, 0, headerLength, 8);
      let header: Record<string, unknown>;
      try {
        header = JSON.parse(headerBuf.toString('utf8'));
      } catch (e) {
        throw new SafetensorsError(this.file, `header is not valid JSON: ${(e as Error).message}`);
      }
      if (header === null || typeof header !== 'object' || Array.isArray(header)) {
        throw new SafetensorsError(this.file, 'header is not a JSON object');
      }
      const dataStart = 8 + headerLength;
      const dataSize = size - dataStart;
      const ranges: Array<[number, number, string]> = [];
      for (const [name, raw] of Object.entries(header)) {
        if (name === '__metadata__') {
          Object.assign(this.metadata, raw as Record<string, string>);
          continue;
        }
        const entry = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
        const dtype = entry?.dtype;
        if (typeof dtype !== 'string' || !(dtype in DTYPE_SIZE)) {
          throw new SafetensorsError(this.file, `unknown dtype ${JSON.stringify(dtype)}`, name);
        }
        const shape = entry.shape;
        if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
          throw new SafetensorsError(this.file, `bad shape ${JSON.stringify(shape)}`, name);
        }
        const offs = entry.data_offsets;
        if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((o) => Number.isInteger(o) && o >= 0) || offs[1] < offs[0]) {
          throw new SafetensorsError(this.file, `bad data_offsets ${JSON.stringify(offs)}`, name);
        }
        const [begin, end] = offs as [number, number];
        if (end > dataSize) {
          throw new SafetensorsError(this.file, `data_offsets [${begin}, ${end}] run past the end of the data (${dataSize} bytes); the file is truncated or corrupt`, name);
        }
        const expected = elementCount(shape) * DTYPE_SIZE[dtype as DType];
        if (end - begin !== expected) {
          throw new SafetensorsError(this.file, `shape ${JSON.stringify(shape)} of ${dtype} needs ${expected} bytes but data_offsets span ${end - begin}`, name);
        }
        ranges.push([begin, end, name]);
        this.tensors.set(name, { name, dtype: dtype as DType, shape: shape as number[], file: this.file, dataOffset: dataStart + begin, byteLength: end - begin });
      }
      ranges.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
      for (let i = 1; i < ranges.length; i++) {
        const [pb, pe, pn] = ranges[i - 1];
        const [b, , n] = ranges[i];
        if (b < pe && pe > pb) throw new SafetensorsError(this.file, `data overlaps tensor ${pn}`, n);
      }
    } finally {
      fs.closeSync(fd);
    }
  }

  get names(): string[] {
    return [...this.tensors.keys()];
  }

  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new SafetensorsError(this.file, 'no such tensor', name);
    return t;
  }
}

function checkSupported(t: TensorInfo): void {
  if (UNSUPPORTED.has(t.dtype)) {
    throw new SafetensorsError(t.file, `dtype ${t.dtype} is not supported yet (float8 checkpoints need a dequantising loader); use the bf16 checkpoint`, t.name);
  }
}

/** Reads a tensor's raw bytes (one pread; for tensors that fit in memory), into `into` (its start) when given. */
export function readRaw(t: TensorInfo, into?: Uint8Array): Buffer {
  if (into && into.byteLength < t.byteLength) throw new RangeError(`readRaw: ${t.byteLength} bytes do not fit ${into.byteLength}`);
  const buf = into ? Buffer.from(into.buffer, into.byteOffset, t.byteLength) : Buffer.allocUnsafe(t.byteLength);
  const fd = fs.openSync(t.file, 'r');
  try {
    let done = 0;
    while (done < t.byteLength) {
      const n = fs.readSync(fd, buf, done, t.byteLength - done, t.dataOffset + done);
      if (n === 0) throw new SafetensorsError(t.file, 'unexpected end of file', t.name);
      done += n;
    }
  } finally {
    fs.closeSync(fd);
  }
  return buf;
}

/** bf16 bits widened (exactly) to fp32, into `out` when given (its first src.length values). */
export function bf16ToF32(src: Uint16Array, out = new Float32Array(src.length)): Float32Array {
  const bits = new Uint32Array(out.buffer, out.byteOffset, src.length);
  for (let i = 0; i < src.length; i++) bits[i] = src[i] << 16;
  return out;
}

export function f16ToF32(src: Uint16Array): Float32Array {
  const out = new Float32Array(src.length);
  for (let i = 0; i < src.length; i++) {
    const h = src[i];
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) out[i] = sign * 2 ** -14 * (frac / 1024);
    else if (exp === 31) out[i] = frac ? NaN : sign * Infinity;
    else out[i] = sign * 2 ** (exp - 15) * (1 + frac / 1024);
  }
  return out;
}

/** Round-to-nearest-even float32 → bfloat16 bits (what torch's `.to(torch.bfloat16)` does). */
export function f32ToBf16(src: Float32Array): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) {
    const b = bits[i];
    if ((b & 0x7fffffff) > 0x7f800000) { out[i] = (b >>> 16) | 0x40; continue; } // keep NaN a NaN
    out[i] = (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
  }
  return out;
}

export function f32ToF16(src: Float32Array): Uint16Array {
  const out = new Uint16Array(src.length);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < src.length; i++) {
    f[0] = src[i];
    const x = u[0];
    const sign = (x >>> 16) & 0x8000;
    const exp = (x >>> 23) & 0xff;
    let mant = x & 0x7fffff;
    if (exp === 0xff) { out[i] = sign | 0x7c00 | (mant ? 0x200 : 0); continue; }
    let e = exp - 127 + 15;
    if (e >= 31) { out[i] = sign | 0x7c00; continue; }
    if (e <= 0) {
      if (e < -10) { out[i] = sign; continue; }
      mant |= 0x800000;
      const shift = 14 - e;
      let m = mant >>> shift;
      const rem = mant & ((1 << shift) - 1);
      const half = 1 << (shift - 1);
      if (rem > half || (rem === half && (m & 1))) m++;
      out[i] = sign | m;
      continue;
    }
    let m = mant >>> 13;
    const rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem === 0x1000 && (m & 1))) { m++; if (m === 0x400) { m = 0; e++; if (e >= 31) { out[i] = sign | 0x7c00; continue; } } }
    out[i] = sign | (e << 10) | m;
  }
  return out;
}

/** A tensor's values as float32 (from F32, F16 or BF16). */
export function readFloat32(t: TensorInfo): Float32Array {
  checkSupported(t);
  const raw = readRaw(t);
  const aligned = new Uint8Array(raw).buffer; // copy: Buffer pool slices are not 4-byte aligned
  switch (t.dtype) {
    case 'F32': return new Float32Array(aligned);
    case 'F64': return Float32Array.from(new Float64Array(aligned));
    case 'BF16': return bf16ToF32(new Uint16Array(aligned));
    case 'F16': return f16ToF32(new Uint16Array(aligned));
    default: throw new SafetensorsError(t.file, `expected a float tensor, found ${t.dtype}`, t.name);
  }
}

export function readInt64(t: TensorInfo): BigInt64Array {
  if (t.dtype !== 'I64') throw new SafetensorsError(t.file, `expected I64, found ${t.dtype}`, t.name);
  return new BigInt64Array(new Uint8Array(readRaw(t)).buffer);
}

export function readUint8(t: TensorInfo): Uint8Array {
  if (t.dtype !== 'U8') throw new SafetensorsError(t.file, `expected U8, found ${t.dtype}`, t.name);
  return new Uint8Array(readRaw(t));
}

/**
 * A checkpoint: one file, or a sharded set described by `*.safetensors.index.json` (`weight_map`: key → shard).
 * Also accepts a folder holding either.
 */
export class Checkpoint {
  readonly files: SafetensorsFile[] = [];
  private readonly byName = new Map<string, TensorInfo>();

  constructor(files: SafetensorsFile[]) {
    for (const f of files) {
      this.files.push(f);
      for (const [name, info] of f.tensors) {
        const prev = this.byName.get(name);
        if (prev) throw new SafetensorsError(f.file, `tensor also present in ${prev.file}`, name);
        this.byName.set(name, info);
      }
    }
  }

  static open(p: string): Checkpoint {
    const abs = path.resolve(p);
    if (!fs.existsSync(abs)) throw new SafetensorsError(abs, 'no such file or folder');
    if (fs.statSync(abs).isDirectory()) {
      const entries = fs.readdirSync(abs).sort();
      const index = entries.find((e) => e.endsWith('.safetensors.index.json'));
      if (index) return Checkpoint.open(path.join(abs, index));
      const files = entries.filter((e) => e.endsWith('.safetensors'));
      if (files.length === 0) throw new SafetensorsError(abs, 'folder holds no .safetensors file');
      return new Checkpoint(files.map((f) => new SafetensorsFile(path.join(abs, f))));
    }
    if (abs.endsWith('.index.json')) {
      let index: { weight_map?: Record<string, string> };
      try {
        index = JSON.parse(fs.readFileSync(abs, 'utf8'));
      } catch (e) {
        throw new SafetensorsError(abs, `index is not valid JSON: ${(e as Error).message}`);
      }
      if (!index.weight_map || typeof index.weight_map !== 'object') throw new SafetensorsError(abs, 'index has no weight_map');
      const shardNames = [...new Set(Object.values(index.weight_map))].sort();
      const shards = shardNames.map((s) => new SafetensorsFile(path.join(path.dirname(abs), s)));
      const ckpt = new Checkpoint(shards);
      for (const [key, shard] of Object.entries(index.weight_map)) {
        const t = ckpt.byName.get(key);
        if (!t) throw new SafetensorsError(path.join(path.dirname(abs), shard), 'tensor listed in the index is missing from its shard', key);
        if (path.basename(t.file) !== shard) throw new SafetensorsError(t.file, `index places this tensor in ${shard}`, key);
      }
      return ckpt;
    }
    return new Checkpoint([new SafetensorsFile(abs)]);
  }

  has(name: string): boolean {
    return this.byName.has(name);
  }

  get names(): string[] {
    return [...this.byName.keys()];
  }

  info(name: string): TensorInfo {
    const t = this.byName.get(name);
    if (!t) throw new SafetensorsError(this.files.map((f) => f.file).join(', '), 'missing tensor', name);
    return t;
  }

  /** Total bytes of the tensors whose names pass `filter`. */
  bytes(filter: (name: string) => boolean = () => true): number {
    let n = 0;
    for (const [name, t] of this.byName) if (filter(name)) n += t.byteLength;
    return n;
  }
}

export type TensorData = Float32Array | BigInt64Array | Uint8Array | Uint16Array;
export interface TensorToWrite {
  dtype: DType;
  shape: number[];
  /** The values, or a function producing them when the file is written (large checkpoints: one tensor at a time). */
  data: TensorData | (() => TensorData);
}

/**
 * Writes a `.safetensors` file (tests, tiny models, conformance outputs). Writes tensor by tensor through one
 * descriptor so large checkpoints are never assembled in memory.
 */
export function writeSafetensors(file: string, tensors: Record<string, TensorToWrite>, metadata?: Record<string, string>): void {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  const order = Object.keys(tensors);
  for (const name of order) {
    const t = tensors[name];
    const bytes = elementCount(t.shape) * DTYPE_SIZE[t.dtype];
    if (typeof t.data !== 'function' && t.data.byteLength !== bytes) throw new Error(`${name}: ${t.dtype}${JSON.stringify(t.shape)} needs ${bytes} bytes, got ${t.data.byteLength}`);
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  // pad the header with spaces so the data starts 8-byte aligned (padding counted in bytes, not UTF-16 units)
  const headerBuf = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(headerBuf.length));
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(tmp, 'w');
  try {
    writeAll(fd, len);
    writeAll(fd, headerBuf);
    for (const name of order) {
      const t = tensors[name];
      const d = typeof t.data === 'function' ? t.data() : t.data;
      const bytes = elementCount(t.shape) * DTYPE_SIZE[t.dtype];
      if (d.byteLength !== bytes) throw new Error(`${name}: ${t.dtype}${JSON.stringify(t.shape)} needs ${bytes} bytes, got ${d.byteLength}`);
      writeAll(fd, new Uint8Array(d.buffer, d.byteOffset, d.byteLength));
    }
  } catch (e) {
    fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw e;
  }
  fs.closeSync(fd);
  fs.renameSync(tmp, file);
}

/** fs.writeSync may write less than asked (large buffers, signals): loop until every byte is out. */
function writeAll(fd: number, buf: Uint8Array): void {
  let done = 0;
  while (done < buf.byteLength) done += fs.writeSync(fd, buf, done, buf.byteLength - done);
}
