// The Qwen3 tokenizer as FLUX.2 [klein] uses it: chat-templated prompt, byte-level BPE (HF tokenizer.json through
// @huggingface/tokenizers), truncated to the first 512 tokens and right-padded with <|endoftext|> — what
// `tokenizer(text, padding="max_length", truncation=True, max_length=512)` does in the reference.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { promptRenderer } from './template.ts';

/** Context length of FLUX.2 [klein]: every prompt becomes exactly this many tokens. */
export const KLEIN_MAX_LENGTH = 512;

export interface TokenizedBatch {
  batch: number;
  length: number;
  /** `[batch * length]` token ids, row-major. */
  inputIds: BigInt64Array;
  /** `[batch * length]`, 1 = real token, 0 = padding. */
  attentionMask: BigInt64Array;
  /** Per prompt: the templated text was longer than `length` and lost its tail. */
  truncated: boolean[];
  /** Per prompt: tokens of the templated text before truncation and padding. */
  tokenCounts: number[];
}

export interface KleinTokenizerOptions {
  maxLength?: number;
}

export class TokenizerError extends Error {
  override name = 'TokenizerError';
}

function readJson(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new TokenizerError(`cannot read ${file}: ${(e as Error).message}`);
  }
  try {
    return JSON.parse(text) as Record<string, unknown>;
  } catch (e) {
    throw new TokenizerError(`${file} is not valid JSON: ${(e as Error).message}`);
  }
}

/** A token given in tokenizer_config either as a string or as an AddedToken object `{content: …}`. */
function tokenString(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string') return (v as { content: string }).content;
  return null;
}

export class KleinTokenizer {
  readonly maxLength: number;
  readonly padId: number;
  readonly padToken: string;
  private readonly render: (prompt: string) => string;
  /** sha256 of the tokenizer files (set by fromFolder): part of the prompt cache's model identity. */
  identity = '';

  constructor(private readonly tokenizer: Tokenizer, config: Record<string, unknown>, opts: KleinTokenizerOptions = {}) {
    this.maxLength = opts.maxLength ?? KLEIN_MAX_LENGTH;
    if (!Number.isInteger(this.maxLength) || this.maxLength < 1) throw new TokenizerError(`maxLength must be a positive integer, got ${this.maxLength}`);
    // Qwen3's config names <|endoftext|> as pad token; it is also what klein pads with when a config omits it
    this.padToken = tokenString(config.pad_token) ?? '<|endoftext|>';
    const padId = tokenizer.token_to_id(this.padToken);
    if (padId === undefined) throw new TokenizerError(`pad token ${this.padToken} is not in the vocabulary`);
    this.padId = padId;
    if (config.padding_side !== undefined && config.padding_side !== 'right') {
      throw new TokenizerError(`tokenizer_config sets padding_side=${String(config.padding_side)}; FLUX.2 [klein] pads on the right`);
    }
    const special: Record<string, string | null> = {};
    for (const k of ['bos_token', 'eos_token', 'pad_token', 'unk_token']) special[k] = tokenString(config[k]);
    const chatTemplate = typeof config.chat_template === 'string' ? config.chat_template : undefined;
    try {
      this.render = promptRenderer(chatTemplate, special);
    } catch (e) {
      throw new TokenizerError((e as Error).message);
    }
  }

  /**
   * Loads `tokenizer.json` and `tokenizer_config.json` from a folder (the HF `tokenizer/` layout; a model root
   * whose `tokenizer/` subfolder holds them works too).
   */
  static fromFolder(dir: string, opts: KleinTokenizerOptions = {}): KleinTokenizer {
    let folder = path.resolve(dir);
    if (!fs.existsSync(path.join(folder, 'tokenizer.json')) && fs.existsSync(path.join(folder, 'tokenizer', 'tokenizer.json'))) {
      folder = path.join(folder, 'tokenizer');
    }
    const tj = path.join(folder, 'tokenizer.json');
    if (!fs.existsSync(tj)) throw new TokenizerError(`no tokenizer.json in ${folder}`);
    const cfgFile = path.join(folder, 'tokenizer_config.json');
    const config = fs.existsSync(cfgFile) ? readJson(cfgFile) : {};
    let tok: Tokenizer;
    try {
      tok = new Tokenizer(readJson(tj), config);
    } catch (e) {
      throw new TokenizerError(`${tj}: not a usable tokenizer: ${(e as Error).message}`);
    }
    const kt = new KleinTokenizer(tok, config, opts);
    const h = crypto.createHash('sha256').update(fs.readFileSync(tj));
    if (fs.existsSync(cfgFile)) h.update(fs.readFileSync(cfgFile));
    kt.identity = h.update(String(kt.maxLength)).digest('hex');
    return kt;
  }

  /** The text the model sees for `prompt` (chat template applied). */
  template(prompt: string): string {
    return this.render(prompt);
  }

  /** Token ids of the templated prompt, before truncation and padding. */
  tokenize(prompt: string): number[] {
    if (typeof prompt !== 'string') throw new TokenizerError(`a prompt must be a string, got ${typeof prompt}`);
    // add_special_tokens as in the reference call; the Qwen tokenizer adds no BOS/EOS either way
    return this.tokenizer.encode(this.render(prompt)).ids;
  }

  token(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }

  id(token: string): number | undefined {
    return this.tokenizer.token_to_id(token);
  }

  decode(ids: number[]): string {
    return this.tokenizer.decode(ids, { skip_special_tokens: false });
  }

  /** Templated, truncated, right-padded batch. */
  encode(prompts: readonly string[]): TokenizedBatch {
    if (!Array.isArray(prompts) || prompts.length === 0) throw new TokenizerError('encode needs at least one prompt');
    const L = this.maxLength;
    const B = prompts.length;
    const inputIds = new BigInt64Array(B * L).fill(BigInt(this.padId));
    const attentionMask = new BigInt64Array(B * L);
    const truncated: boolean[] = [];
    const tokenCounts: number[] = [];
    prompts.forEach((p, b) => {
      const ids = this.tokenize(p);
      tokenCounts.push(ids.length);
      truncated.push(ids.length > L);
      const n = Math.min(ids.length, L);
      for (let i = 0; i < n; i++) {
        inputIds[b * L + i] = BigInt(ids[i]);
        attentionMask[b * L + i] = 1n;
      }
    });
    return { batch: B, length: L, inputIds, attentionMask, truncated, tokenCounts };
  }
}
