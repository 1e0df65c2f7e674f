// The LoRA files an engine has read, kept so that a request naming a LoRA the previous ones used does not read and
// convert it again (a rank-32 klein 4B LoRA takes seconds to read on a busy CPU): keyed by path, size and mtime
// (a file replaced in place is read again), least recently used dropped first beyond a byte budget.
import fs from 'node:fs';
import path from 'node:path';
import type { Flux2Config } from '../config.ts';
import { LoraError, loadLora, type AppliedLora, type LoadedLora } from './load.ts';

/** Default budget of kept LoRA tensors (fp32 on the host), beyond the set in use. */
export const DEFAULT_LORA_CACHE_BYTES = 1024 * 1024 * 1024;

interface Entry {
  stamp: string;
  lora: LoadedLora;
  bytes: number;
}

export class LoraCache {
  private readonly entries = new Map<string, Entry>();

  constructor(private readonly maxBytes = DEFAULT_LORA_CACHE_BYTES) {}

  /** The LoRAs of a request, read (or found) and checked against the model; throws `LoraError`. */
  load(requests: ReadonlyArray<{ path: string; scale: number }>, cfg: Flux2Config): AppliedLora[] {
    const out = requests.map((r) => ({ lora: this.get(r.path, cfg), scale: r.scale }));
    this.evict(new Set(out.map((a) => a.lora.file)));
    return out;
  }

  /** Bytes of LoRA tensors held. */
  get bytes(): number {
    let n = 0;
    for (const e of this.entries.values()) n += e.bytes;
    return n;
  }

  private get(file: string, cfg: Flux2Config): LoadedLora {
    const abs = path.resolve(file);
    let st: fs.Stats;
    try {
      st = fs.statSync(abs);
    } catch {
      throw new LoraError('lora_not_found', `LoRA ${file}: no such file`);
    }
    const stamp = `${st.size}:${st.mtimeMs}:${JSON.stringify(cfg)}`;
    const hit = this.entries.get(abs);
    this.entries.delete(abs);
    if (hit?.stamp === stamp) {
      this.entries.set(abs, hit);
      return hit.lora;
    }
    const lora = loadLora(abs, cfg);
    const bytes = lora.targets.reduce((n, t) => n + t.down.byteLength + t.up.byteLength, 0);
    this.entries.set(abs, { stamp, lora, bytes });
    return lora;
  }

  /** Drops the least recently used files beyond the budget, never one of `inUse`. */
  private evict(inUse: ReadonlySet<string>): void {
    let total = this.bytes;
    for (const [file, e] of this.entries) {
      if (total <= this.maxBytes) return;
      if (inUse.has(e.lora.file)) continue;
      this.entries.delete(file);
      total -= e.bytes;
    }
  }
}
