import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  Checkpoint,
  SafetensorsError,
  SafetensorsFile,
  bf16ToF32,
  f32ToBf16,
  f32ToF16,
  f16ToF32,
  readFloat32,
  readInt64,
  readUint8,
  writeSafetensors,
} from '../../src/weights/safetensors.ts';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'klein-st-'));

/** A file with a hand-written header, to build the corrupt cases the writer refuses to produce. */
function rawFile(dir: string, header: unknown, dataBytes: number, opts: { headerLength?: bigint; truncateTo?: number } = {}): string {
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(opts.headerLength ?? BigInt(json.length));
  let buf = Buffer.concat([len, json, Buffer.alloc(dataBytes, 7)]);
  if (opts.truncateTo !== undefined) buf = buf.subarray(0, opts.truncateTo);
  const f = path.join(dir, `raw-${Math.random().toString(36).slice(2)}.safetensors`);
  fs.writeFileSync(f, buf);
  return f;
}

function expectError(fn: () => unknown, file: string, tensor: string | undefined, what: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof SafetensorsError, `expected SafetensorsError, got ${String(e)}`);
    assert.ok(e.message.includes(file), `message names the file: ${e.message}`);
    if (tensor) assert.ok(e.message.includes(`[${tensor}]`), `message names the tensor: ${e.message}`);
    assert.match(e.message, what);
    return true;
  });
}

test('round trip of every dtype: F32, F16, BF16 (read as f32), I64, U8, with metadata', () => {
  const dir = tmp();
  const f = path.join(dir, 'all.safetensors');
  const vals = new Float32Array([0, 1, -2.5, 3.140625, 65504, -1e-3, 1 / 3, 1e30]);
  writeSafetensors(
    f,
    {
      odd: { dtype: 'U8', shape: [3], data: new Uint8Array([1, 2, 255]) },
      f32: { dtype: 'F32', shape: [2, 4], data: vals },
      f16: { dtype: 'F16', shape: [7], data: f32ToF16(vals.subarray(0, 7)) },
      bf16: { dtype: 'BF16', shape: [8], data: f32ToBf16(vals) },
      ids: { dtype: 'I64', shape: [2, 2], data: BigInt64Array.from([0n, -1n, 2n ** 40n, 511n]) },
      scalar: { dtype: 'F32', shape: [], data: Float32Array.of(42) },
    },
    { note: 'hello' },
  );
  const st = new SafetensorsFile(f);
  assert.deepEqual(st.metadata, { note: 'hello' });
  assert.deepEqual(st.names, ['odd', 'f32', 'f16', 'bf16', 'ids', 'scalar']);
  assert.deepEqual(st.info('f32').shape, [2, 4]);
  // data of the second tensor starts at an odd offset (after 3 bytes of U8), so readers must not assume alignment
  assert.equal((st.info('f32').dataOffset - 8 - st.headerLength) % 4, 3);
  assert.deepEqual(Array.from(readFloat32(st.info('f32'))), Array.from(vals));
  assert.deepEqual(Array.from(readUint8(st.info('odd'))), [1, 2, 255]);
  assert.deepEqual(Array.from(readInt64(st.info('ids'))), [0n, -1n, 2n ** 40n, 511n]);
  assert.deepEqual(Array.from(readFloat32(st.info('scalar'))), [42]);
  // f16: exact for representable values, within half an ulp (2^-11 relative) otherwise
  const h = readFloat32(st.info('f16'));
  for (let i = 0; i < 7; i++) assert.ok(Math.abs(h[i] - vals[i]) <= Math.abs(vals[i]) * 2 ** -11, `f16[${i}] ${h[i]} vs ${vals[i]}`);
  assert.equal(h[4], 65504);
  // bf16: the top 16 bits with round-to-nearest-even; exact for values with ≤ 8 significant bits
  const b = readFloat32(st.info('bf16'));
  assert.deepEqual(Array.from(b.subarray(0, 4)), [0, 1, -2.5, 3.140625]);
  for (let i = 0; i < 8; i++) assert.ok(Math.abs(b[i] - vals[i]) <= Math.abs(vals[i]) * 2 ** -8, `bf16[${i}] ${b[i]} vs ${vals[i]}`);
  assert.equal(b[6], 0.333984375); // 1/3 rounds up to 0x3EAB
});

test('bf16 and f16 conversions: rounding to nearest even, specials', () => {
  assert.deepEqual(Array.from(f32ToBf16(Float32Array.of(1 + 2 ** -8, 1 + 3 * 2 ** -8, Infinity, -0))), [0x3f80, 0x3f82, 0x7f80, 0x8000]);
  assert.ok(Number.isNaN(bf16ToF32(f32ToBf16(Float32Array.of(NaN)))[0]));
  assert.deepEqual(Array.from(f16ToF32(f32ToF16(Float32Array.of(1e5, 2 ** -24, 2 ** -26, -Infinity)))), [Infinity, 2 ** -24, 0, -Infinity]);
});

test('F8_E4M3 tensors are recognised and refused with a clear "not supported yet" error', () => {
  const dir = tmp();
  const f = rawFile(dir, { w: { dtype: 'F8_E4M3', shape: [4], data_offsets: [0, 4] } }, 4);
  const st = new SafetensorsFile(f); // the header is valid
  expectError(() => readFloat32(st.info('w')), f, 'w', /F8_E4M3 is not supported yet/);
});

test('corrupt files: every case names the file and, where there is one, the tensor', () => {
  const dir = tmp();
  // header length larger than the file
  let f = rawFile(dir, { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, 4, { headerLength: 10_000n });
  expectError(() => new SafetensorsFile(f), f, undefined, /bad header length 10000/);
  // absurd header length (u64 garbage)
  f = rawFile(dir, {}, 0, { headerLength: 2n ** 62n });
  expectError(() => new SafetensorsFile(f), f, undefined, /bad header length/);
  // shorter than the 8-byte length field
  f = path.join(dir, 'tiny.safetensors');
  fs.writeFileSync(f, Buffer.from([1, 2, 3]));
  expectError(() => new SafetensorsFile(f), f, undefined, /truncated/);
  // header not JSON
  f = path.join(dir, 'nojson.safetensors');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(4n);
  fs.writeFileSync(f, Buffer.concat([len, Buffer.from('{xx}')]));
  expectError(() => new SafetensorsFile(f), f, undefined, /not valid JSON/);
  // offsets past the end of the data
  f = rawFile(dir, { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, late: { dtype: 'F32', shape: [4], data_offsets: [8, 24] } }, 16);
  expectError(() => new SafetensorsFile(f), f, 'late', /run past the end/);
  // overlapping ranges
  f = rawFile(dir, { a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] }, b: { dtype: 'F32', shape: [2], data_offsets: [8, 16] } }, 16);
  expectError(() => new SafetensorsFile(f), f, 'b', /overlaps tensor a/);
  // unknown dtype
  f = rawFile(dir, { q: { dtype: 'Q4_K', shape: [2], data_offsets: [0, 2] } }, 2);
  expectError(() => new SafetensorsFile(f), f, 'q', /unknown dtype "Q4_K"/);
  // shape / size mismatch
  f = rawFile(dir, { m: { dtype: 'BF16', shape: [3, 3], data_offsets: [0, 16] } }, 16);
  expectError(() => new SafetensorsFile(f), f, 'm', /needs 18 bytes but data_offsets span 16/);
  // bad shape and bad offsets
  f = rawFile(dir, { s: { dtype: 'F32', shape: [-1], data_offsets: [0, 4] } }, 4);
  expectError(() => new SafetensorsFile(f), f, 's', /bad shape/);
  f = rawFile(dir, { o: { dtype: 'F32', shape: [1], data_offsets: [8, 4] } }, 8);
  expectError(() => new SafetensorsFile(f), f, 'o', /bad data_offsets/);
  // a file truncated after writing: the header promises more data than there is
  const good = path.join(dir, 'good.safetensors');
  writeSafetensors(good, { a: { dtype: 'F32', shape: [4], data: new Float32Array(4) }, b: { dtype: 'F32', shape: [8], data: new Float32Array(8) } });
  const cut = path.join(dir, 'cut.safetensors');
  fs.writeFileSync(cut, fs.readFileSync(good).subarray(0, fs.statSync(good).size - 5));
  expectError(() => new SafetensorsFile(cut), cut, 'b', /truncated or corrupt/);
  // wrong accessor for the dtype
  const st = new SafetensorsFile(good);
  expectError(() => readInt64(st.info('a')), good, 'a', /expected I64, found F32/);
  expectError(() => readUint8(st.info('a')), good, 'a', /expected U8/);
  expectError(() => st.info('nope'), good, 'nope', /no such tensor/);
});

test('sharded checkpoints: index.json, folder with an index, missing and misplaced tensors', () => {
  const dir = tmp();
  writeSafetensors(path.join(dir, 'model-00001-of-00002.safetensors'), { a: { dtype: 'F32', shape: [2], data: Float32Array.of(1, 2) } });
  writeSafetensors(path.join(dir, 'model-00002-of-00002.safetensors'), { b: { dtype: 'BF16', shape: [1], data: f32ToBf16(Float32Array.of(3)) } });
  const index = path.join(dir, 'model.safetensors.index.json');
  fs.writeFileSync(index, JSON.stringify({ metadata: {}, weight_map: { a: 'model-00001-of-00002.safetensors', b: 'model-00002-of-00002.safetensors' } }));
  for (const ck of [Checkpoint.open(index), Checkpoint.open(dir)]) {
    assert.equal(ck.files.length, 2);
    assert.deepEqual(ck.names.sort(), ['a', 'b']);
    assert.deepEqual(Array.from(readFloat32(ck.info('b'))), [3]);
    assert.equal(path.basename(ck.info('b').file), 'model-00002-of-00002.safetensors');
    assert.equal(ck.bytes(), 10);
  }
  // the index lists a tensor its shard lacks
  fs.writeFileSync(index, JSON.stringify({ weight_map: { a: 'model-00001-of-00002.safetensors', b: 'model-00002-of-00002.safetensors', c: 'model-00002-of-00002.safetensors' } }));
  expectError(() => Checkpoint.open(index), 'model-00002-of-00002.safetensors', 'c', /missing from its shard/);
  // the index places a tensor in the wrong shard
  fs.writeFileSync(index, JSON.stringify({ weight_map: { a: 'model-00002-of-00002.safetensors', b: 'model-00001-of-00002.safetensors' } }));
  assert.throws(() => Checkpoint.open(index), /model-00001-of-00002\.safetensors \[a\].*index places this tensor in model-00002/);
  fs.writeFileSync(index, '{not json');
  expectError(() => Checkpoint.open(index), index, undefined, /index is not valid JSON/);
  // the same tensor in two files
  const dup = tmp();
  writeSafetensors(path.join(dup, 'x.safetensors'), { a: { dtype: 'F32', shape: [1], data: Float32Array.of(1) } });
  writeSafetensors(path.join(dup, 'y.safetensors'), { a: { dtype: 'F32', shape: [1], data: Float32Array.of(2) } });
  expectError(() => Checkpoint.open(dup), 'y.safetensors', 'a', /also present in .*x\.safetensors/);
  expectError(() => Checkpoint.open(path.join(dup, 'none')), 'none', undefined, /no such file/);
  expectError(() => Checkpoint.open(path.join(dup, 'x.safetensors')).info('zz'), 'x.safetensors', 'zz', /missing tensor/);
});

test('writeSafetensors: lazily produced tensors, size check, no partial file left on error', () => {
  const dir = tmp();
  const f = path.join(dir, 'lazy.safetensors');
  let produced = 0;
  writeSafetensors(f, { a: { dtype: 'F32', shape: [3], data: () => (produced++, Float32Array.of(1, 2, 3)) } });
  assert.equal(produced, 1);
  assert.deepEqual(Array.from(readFloat32(new SafetensorsFile(f).info('a'))), [1, 2, 3]);
  assert.throws(() => writeSafetensors(path.join(dir, 'bad.safetensors'), { a: { dtype: 'F32', shape: [3], data: () => Float32Array.of(1) } }), /needs 12 bytes, got 4/);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['lazy.safetensors']);
  // the header is padded so the data section starts 8-byte aligned, even with multi-byte UTF-8 in names
  const u = path.join(dir, 'utf8.safetensors');
  writeSafetensors(u, { 'poids-é': { dtype: 'U8', shape: [1], data: Uint8Array.of(9) } });
  const st = new SafetensorsFile(u);
  assert.equal(st.headerLength % 8, 0);
  assert.deepEqual(Array.from(readUint8(st.info('poids-é'))), [9]);
});
