// Conformance of the klein tokenizer against `tokenizer/cases.json`: for every prompt, the templated text, the
// exact 512 `input_ids` and `attention_mask`, the token count before padding and the truncation flag, using the
// tokenizer.json / tokenizer_config.json stored in the same folder.
import fs from 'node:fs';
import path from 'node:path';
import { KleinTokenizer } from '../text/tokenizer.ts';
import { absResult, errorResult } from './golden.ts';
import type { CaseResult, ConformComponent } from './types.ts';

interface TokenizerCase {
  prompt: string;
  templated_text?: string;
  input_ids: number[];
  attention_mask: number[];
  n_tokens_before_padding?: number;
  truncated?: boolean;
}

const NAME = 'tokenizer';

function label(i: number, prompt: string): string {
  const chars = Array.from(prompt); // code points, so an emoji is never cut in half
  const short = chars.length > 32 ? `${chars.slice(0, 32).join('')}…` : prompt;
  return `tokenizer/cases.json #${i} ${JSON.stringify(short)}`;
}

export const tokenizerComponent: ConformComponent = {
  name: NAME,
  async *run(goldenDir: string): AsyncIterable<CaseResult> {
    const dir = path.join(goldenDir, 'tokenizer');
    const file = path.join(dir, 'cases.json');
    if (!fs.existsSync(file)) return;
    let cases: TokenizerCase[];
    let tok: KleinTokenizer;
    try {
      cases = JSON.parse(fs.readFileSync(file, 'utf8')) as TokenizerCase[];
      if (!Array.isArray(cases)) throw new Error('cases.json is not an array');
      tok = KleinTokenizer.fromFolder(dir, { maxLength: cases[0]?.input_ids.length ?? 512 });
    } catch (e) {
      yield errorResult(NAME, 'tokenizer/cases.json', e);
      return;
    }
    for (const [i, c] of cases.entries()) {
      const name = label(i, c.prompt);
      try {
        const r = tok.encode([c.prompt]);
        const problems: string[] = [];
        if (c.templated_text !== undefined && tok.template(c.prompt) !== c.templated_text) problems.push('templated text differs');
        if (c.n_tokens_before_padding !== undefined && r.tokenCounts[0] !== c.n_tokens_before_padding) {
          problems.push(`${r.tokenCounts[0]} tokens before padding, expected ${c.n_tokens_before_padding}`);
        }
        if (c.truncated !== undefined && r.truncated[0] !== c.truncated) problems.push(`truncated=${r.truncated[0]}, expected ${c.truncated}`);
        const ids = absResult(NAME, `${name} input_ids`, Array.from(r.inputIds, Number), c.input_ids, 0);
        const mask = absResult(NAME, `${name} attention_mask`, Array.from(r.attentionMask, Number), c.attention_mask, 0);
        if (problems.length) {
          ids.passed = false;
          ids.error = problems.join('; ');
        }
        yield ids;
        yield mask;
      } catch (e) {
        yield errorResult(NAME, name, e);
      }
    }
  },
};
