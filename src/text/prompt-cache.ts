// Prompt-embedding cache: the text context of a prompt depends only on the prompt and the model files, and the
// encoder is ~20 s of CPU per prompt at real size, so repeated prompts (retries, seeds sweeps, a service under the
// same prompt) reuse it. Two levels: an in-memory LRU bounded in bytes, and an optional folder of .safetensors
// files that survives restarts. Keys are sha256(model identity ‖ prompt).
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { SafetensorsFile, readFloat32, writeSafetensors } from '../weights/safetensors.ts';

export interface CachedEmbedding {
  /** `[length, dim]` context of one prompt. */
  context: Float32Array;
  truncated: boolean;
}

export interface PromptCacheStats {
  hits: number;
  misses: number;
  memoryHits: number;
  diskHits: number;
  entries: number;
  bytes: number;
  maxBytes: number;
}

export interface PromptCacheOptions {
  /** Bound of the in-memory level; default 256 MiB (16 klein prompts of 15.7 MB). 0 disables it. */
  maxBytes?: number;
  /** Folder for the on-disk level; none by default. */
  diskDir?: string;
}

export function promptKey(modelIdentity: string, prompt: string): string {
  return crypto.createHash('sha256').update(modelIdentity).update('\0').update(prompt).digest('hex');
}

export class PromptEmbeddingCache {
  readonly maxBytes: number;
  readonly diskDir?: string;
  // a Map iterates in insertion order: re-inserting on access makes the first key the least recently used
  private readonly lru = new Map<string, CachedEmbedding>();
  private bytes = 0;
  private counters = { hits: 0, misses: 0, memoryHits: 0, diskHits: 0 };

  constructor(opts: PromptCacheOptions = {}) {
    this.maxBytes = opts.maxBytes ?? 256 * 1024 * 1024;
    if (!(this.maxBytes >= 0)) throw new Error(`maxBytes must be ≥ 0, got ${opts.maxBytes}`);
    if (opts.diskDir) {
      this.diskDir = path.resolve(opts.diskDir);
      fs.mkdirSync(this.diskDir, { recursive: true });
    }
  }

  get stats(): PromptCacheStats {
    return { ...this.counters, entries: this.lru.size, bytes: this.bytes, maxBytes: this.maxBytes };
  }

  private diskFile(key: string): string {
    return path.join(this.diskDir!, `${key}.safetensors`);
  }

  /** The cached embedding for `key`, counting a hit or a miss. */
  get(key: string): CachedEmbedding | undefined {
    const mem = this.lru.get(key);
    if (mem) {
      this.lru.delete(key);
      this.lru.set(key, mem);
      this.counters.hits++;
      this.counters.memoryHits++;
      return mem;
    }
    const disk = this.readDisk(key);
    if (disk) {
      this.remember(key, disk);
      this.counters.hits++;
      this.counters.diskHits++;
      return disk;
    }
    this.counters.misses++;
    return undefined;
  }

  set(key: string, value: CachedEmbedding): void {
    this.remember(key, value);
    if (this.diskDir) {
      const file = this.diskFile(key);
      // writeSafetensors writes a temp file and renames it, so a concurrent reader never sees half a file
      writeSafetensors(file, { context: { dtype: 'F32', shape: [value.context.length], data: value.context } }, { truncated: String(value.truncated) });
    }
  }

  private remember(key: string, value: CachedEmbedding): void {
    const size = value.context.byteLength;
    if (size > this.maxBytes) return;
    const prev = this.lru.get(key);
    if (prev) {
      this.bytes -= prev.context.byteLength;
      this.lru.delete(key);
    }
    this.lru.set(key, value);
    this.bytes += size;
    for (const [k, v] of this.lru) {
      if (this.bytes <= this.maxBytes) break;
      this.lru.delete(k);
      this.bytes -= v.context.byteLength;
    }
  }

  private readDisk(key: string): CachedEmbedding | undefined {
    if (!this.diskDir) return undefined;
    const file = this.diskFile(key);
    if (!fs.existsSync(file)) return undefined;
    try {
      const f = new SafetensorsFile(file);
      return { context: readFloat32(f.info('context')), truncated: f.metadata.truncated === 'true' };
    } catch {
      // a damaged cache file is a miss, and is replaced by the next set()
      return undefined;
    }
  }

  clear(): void {
    this.lru.clear();
    this.bytes = 0;
  }
}
