import { test } from 'node:test';
import assert from 'node:assert/strict';
import { cpuTarget } from '../../src/runtime/target.ts';
import { tokenizerComponent } from '../../src/conform/tokenizer.ts';
import { textEncoderComponent } from '../../src/conform/text-encoder.ts';
import type { CaseResult, ConformComponent } from '../../src/conform/types.ts';
import { GOLDEN_DIR as GOLDEN } from '../golden.ts';

async function run(c: ConformComponent): Promise<CaseResult[]> {
  const out: CaseResult[] = [];
  for await (const r of c.run(GOLDEN, { target: cpuTarget() })) out.push(r);
  return out;
}

test('klein conform: every tokenizer golden prompt gives the exact ids and mask', async () => {
  const results = await run(tokenizerComponent);
  assert.equal(results.length, 16, results.map((r) => r.name).join('\n'));
  for (const r of results) assert.ok(r.passed, `${r.name}: max_abs_err=${r.maxAbsErr} ${r.error ?? ''}`);
});

test('klein conform: text-encoder prompt_embeds and every stored hidden state within 1e-4·max(1,|ref|)', async () => {
  const results = await run(textEncoderComponent);
  for (const r of results) assert.ok(r.passed, `${r.name}: max_abs_err=${r.maxAbsErr} tol=${r.tolerance} ${r.error ?? ''}`);
  const names = results.map((r) => r.name);
  for (const want of ['text_encoder/case1 prompt_embeds', 'text_encoder/case2 prompt_embeds', 'text_encoder/case1 hidden_states.0', 'text_encoder/case1 hidden_states.27', 'text_encoder/case1 hidden_states.36']) {
    assert.ok(names.includes(want), `missing ${want} in ${names.join(', ')}`);
  }
});
