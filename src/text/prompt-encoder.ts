// Prompts → FLUX.2 [klein] text context: tokenizer + Qwen3 encoder + prompt-embedding cache. This is what the
// pipeline calls; identical prompts with the same model files skip the encoder.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { KleinTokenizer } from './tokenizer.ts';
import { PromptEmbeddingCache, promptKey, type PromptCacheOptions, type PromptCacheStats } from './prompt-cache.ts';
import { Qwen3TextEncoder, type Qwen3LoadOptions } from '../models/qwen3/runtime.ts';
import type { Precision } from '../runtime/target.ts';

/** The part of the encoder the prompt encoder needs (Qwen3TextEncoder implements it). */
export interface TextEmbedder {
  readonly contextDim: number;
  readonly weightFiles: string[];
  readonly outputLayers: readonly number[];
  /** `fast` = int8 projections: its contexts differ from exact ones, so it is part of the cache key. Default exact. */
  readonly precision?: Precision;
  /** fp16 (GPU) and int8 (fast) contexts differ from fp32 ones, so they are part of the cache key too. Default fp32. */
  readonly computeDtype?: 'fp32' | 'fp16' | 'int8';
  embed(inputIds: BigInt64Array, attentionMask: BigInt64Array, batch: number): Promise<Float32Array>;
  close?(): Promise<void>;
}

export interface EncodedPrompts {
  /** `[batch, length, dim]` row-major. */
  context: Float32Array;
  batch: number;
  length: number;
  dim: number;
  /** Per prompt: longer than the 512-token window, its tail was cut. */
  truncated: boolean[];
  /** Prompts of this call served from the cache. */
  cacheHits: number;
}

export interface PromptEncoderLoadOptions extends Qwen3LoadOptions {
  /** Folder with tokenizer.json (default: `tokenizer/` beside the text encoder folder). */
  tokenizer?: string;
  /** Cache options, an existing cache, or false for none. Default: in memory only. */
  cache?: PromptCacheOptions | PromptEmbeddingCache | false;
}

/** Identity of the model files: paths, sizes and mtimes (hashing gigabytes of weights per start is too slow). */
function filesIdentity(files: string[]): string[] {
  return files.map((f) => {
    const st = fs.statSync(f);
    return `${fs.realpathSync(f)}:${st.size}:${Math.floor(st.mtimeMs)}`;
  }).sort();
}

export class PromptEncoder {
  readonly cache?: PromptEmbeddingCache;
  /** Key component that changes when the tokenizer, the weights or the extracted layers change. */
  readonly identity: string;

  constructor(readonly tokenizer: KleinTokenizer, readonly encoder: TextEmbedder, cache?: PromptEmbeddingCache) {
    this.cache = cache;
    this.identity = crypto
      .createHash('sha256')
      // exact fp32 keys stay what they were before fast mode and fp16 existed, so existing disk caches remain valid
      .update(JSON.stringify({ tokenizer: tokenizer.identity, weights: filesIdentity(encoder.weightFiles), layers: encoder.outputLayers, length: tokenizer.maxLength, ...(encoder.precision === 'fast' || encoder.computeDtype === 'int8' ? { precision: 'fast' } : {}), ...(encoder.computeDtype === 'fp16' ? { dtype: 'fp16' } : {}) }))
      .digest('hex');
  }

  /** Opens the HF text-encoder folder (config.json + weights) and its tokenizer. */
  static async load(textEncoderFolder: string, opts: PromptEncoderLoadOptions): Promise<PromptEncoder> {
    const tokDir = opts.tokenizer ?? path.join(path.dirname(path.resolve(textEncoderFolder)), 'tokenizer');
    const tokenizer = KleinTokenizer.fromFolder(tokDir);
    const encoder = await Qwen3TextEncoder.load(textEncoderFolder, { maxPositions: tokenizer.maxLength, ...opts });
    const cache = opts.cache === false ? undefined : opts.cache instanceof PromptEmbeddingCache ? opts.cache : new PromptEmbeddingCache(opts.cache ?? {});
    return new PromptEncoder(tokenizer, encoder, cache);
  }

  get cacheStats(): PromptCacheStats | undefined {
    return this.cache?.stats;
  }

  async encode(prompts: readonly string[]): Promise<EncodedPrompts> {
    const tok = this.tokenizer.encode(prompts); // validates the prompts and gives the truncation flags
    const L = tok.length;
    const D = this.encoder.contextDim;
    const row = L * D;
    const context = new Float32Array(prompts.length * row);
    const keys = prompts.map((p) => promptKey(this.identity, p));
    const todo = new Map<string, number[]>(); // key → batch rows needing it, so duplicates run once
    let cacheHits = 0;
    keys.forEach((k, b) => {
      const hit = this.cache?.get(k);
      if (hit && hit.context.length === row) {
        context.set(hit.context, b * row);
        cacheHits++;
      } else {
        todo.set(k, [...(todo.get(k) ?? []), b]);
      }
    });
    if (todo.size > 0) {
      const rows = [...todo.values()].map((bs) => bs[0]);
      const ids = new BigInt64Array(rows.length * L);
      const mask = new BigInt64Array(rows.length * L);
      rows.forEach((b, i) => {
        ids.set(tok.inputIds.subarray(b * L, (b + 1) * L), i * L);
        mask.set(tok.attentionMask.subarray(b * L, (b + 1) * L), i * L);
      });
      const out = await this.encoder.embed(ids, mask, rows.length);
      if (out.length !== rows.length * row) throw new Error(`text encoder returned ${out.length} values, expected ${rows.length} × ${L} × ${D}`);
      [...todo.entries()].forEach(([k, bs], i) => {
        const one = out.slice(i * row, (i + 1) * row);
        for (const b of bs) context.set(one, b * row);
        this.cache?.set(k, { context: one, truncated: tok.truncated[bs[0]] });
      });
    }
    return { context, batch: prompts.length, length: L, dim: D, truncated: tok.truncated, cacheHits };
  }

  async close(): Promise<void> {
    await this.encoder.close?.();
  }
}
