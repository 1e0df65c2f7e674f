import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { quantizeInt8 } from '../../src/graph/quantize.ts';
import { Int8Cache, Int8CacheCorruptError, int8CacheFolder, type Int8CacheOptions } from '../../src/weights/quantized-cache.ts';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'klein-int8cache-'));

/** A fake checkpoint file (the cache keys on its identity) and two weights read from "it", counting reads. */
function fixture() {
  const root = tmp();
  const source = path.join(root, 'model.safetensors');
  fs.writeFileSync(source, 'checkpoint bytes');
  const weights: Record<string, { out: number; in: number; data: Float32Array }> = {
    'a.weight': { out: 3, in: 4, data: Float32Array.from({ length: 12 }, (_, i) => Math.sin(i + 1)) },
    'b.weight.rows_0_2': { out: 2, in: 5, data: Float32Array.from({ length: 10 }, (_, i) => (i - 4) / 7) },
  };
  const reads: string[] = [];
  const progress: string[] = [];
  const opts: Int8CacheOptions = {
    model: 'test-model',
    sourceFiles: [source],
    cacheRoot: path.join(root, 'cache'),
    entries: Object.entries(weights).map(([key, w]) => ({ key, outFeatures: w.out, inFeatures: w.in, read: () => (reads.push(key), w.data) })),
    onProgress: (done, total, key) => progress.push(`${done}/${total} ${key}`),
  };
  return { root, source, weights, reads, progress, opts };
}

test('Int8Cache: built once with progress, reopened without re-quantizing, values equal quantizeInt8', () => {
  const f = fixture();
  const first = Int8Cache.open(f.opts);
  assert.equal(first.built, true);
  assert.deepEqual(f.reads, ['a.weight', 'b.weight.rows_0_2']);
  assert.deepEqual(f.progress, ['1/2 a.weight', '2/2 b.weight.rows_0_2']);
  assert.equal(first.folder, int8CacheFolder(f.opts));
  assert.ok(first.folder.startsWith(path.join(f.root, 'cache', 'int8', 'test-model-')));
  const second = Int8Cache.open(f.opts);
  assert.equal(second.built, false);
  assert.equal(f.reads.length, 2, 'a valid cache is not rebuilt');
  for (const [key, w] of Object.entries(f.weights)) {
    const got = second.get(key);
    const want = quantizeInt8(w.data, w.out, w.in);
    assert.deepEqual([got.inFeatures, got.outFeatures], [w.in, w.out]);
    assert.deepEqual(Array.from(got.q), Array.from(want.q));
    assert.deepEqual(Array.from(got.scale), Array.from(want.scale));
  }
  assert.equal(second.has('a.weight'), true);
  assert.equal(second.has('nope'), false);
  assert.throws(() => second.get('nope'), /no weight nope/);
});

test('Int8Cache: a truncated, foreign or half-written cache is rebuilt, never trusted', () => {
  const f = fixture();
  const c = Int8Cache.open(f.opts);
  // truncated weights file
  fs.truncateSync(c.file, fs.statSync(c.file).size - 3);
  assert.equal(Int8Cache.open(f.opts).built, true);
  // a foreign weights file (another cache's) under the same name: header identity and size disagree
  const other = fixture();
  const foreign = Int8Cache.open({ ...other.opts, model: 'other' });
  fs.copyFileSync(foreign.file, c.file);
  assert.equal(Int8Cache.open(f.opts).built, true);
  // no manifest (a crash between the two renames)
  fs.rmSync(path.join(c.folder, 'manifest.json'));
  assert.equal(Int8Cache.open(f.opts).built, true);
  assert.equal(Int8Cache.open(f.opts).built, false);
});

test('Int8Cache: a flipped byte fails its checksum on read; the cache is removed and the next open rebuilds it', () => {
  const f = fixture();
  const c = Int8Cache.open(f.opts);
  const fd = fs.openSync(c.file, 'r+');
  const size = fs.statSync(c.file).size;
  const b = Buffer.alloc(1);
  fs.readSync(fd, b, 0, 1, size - 1); // last byte: b's scale, same size so only the crc can tell
  b[0] ^= 0x40;
  fs.writeSync(fd, b, 0, 1, size - 1);
  fs.closeSync(fd);
  const damaged = Int8Cache.open(f.opts);
  assert.equal(damaged.built, false, 'size and header still look right');
  assert.ok(damaged.get('a.weight').q.length === 12);
  assert.throws(() => damaged.get('b.weight.rows_0_2'), (e: unknown) => e instanceof Int8CacheCorruptError && /checksum mismatch/.test(e.message));
  assert.equal(fs.existsSync(damaged.file), false);
  const rebuilt = Int8Cache.open(f.opts);
  assert.equal(rebuilt.built, true);
  assert.deepEqual(Array.from(rebuilt.get('b.weight.rows_0_2').scale), Array.from(quantizeInt8(f.weights['b.weight.rows_0_2'].data, 2, 5).scale));
});

test('Int8Cache: a changed checkpoint or weight list gets a fresh folder; duplicate keys are refused', () => {
  const f = fixture();
  const before = int8CacheFolder(f.opts);
  const later = new Date(Date.now() + 5000);
  fs.utimesSync(f.source, later, later);
  assert.notEqual(int8CacheFolder(f.opts), before);
  assert.notEqual(int8CacheFolder({ ...f.opts, entries: f.opts.entries.slice(1) }), int8CacheFolder(f.opts));
  assert.throws(() => Int8Cache.open({ ...f.opts, entries: [f.opts.entries[0], f.opts.entries[0]] }), /duplicate key a\.weight/);
});
