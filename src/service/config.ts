// Service settings: defaults here, optional overrides from `<data>/config.json` (deep-merged), and the CLI flags.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Precision } from '../pipeline/types.ts';
import type { GpuDtype } from '../runtime/target.ts';
import type { VariantId } from '../weights/model-folder.ts';
import { defaultPrices, type ModelPrice } from './pricing.ts';
import { DEFAULT_MAX_LORA_BYTES, type LoraSettings } from './lora-fetch.ts';

export interface ServiceConfig {
  dataDir: string;
  /** Origin put in file URLs and callbacks; default: the address the server listens on. */
  publicUrl?: string;
  /** Generations running at once (one pipeline; more only helps with several cores per run). */
  workers: number;
  /**
   * The precision the local pipeline was opened with (`klein serve --precision`): one per server, chosen at start,
   * shown by /v1/models and /v1/health so API users can tell fast (int8) output from exact. Not a config.json field.
   */
  precision?: Precision;
  /**
   * The local pipeline's GPU dtype (`klein serve --gpu-dtype`), set only when it runs on a GPU device; shown by
   * /v1/health beside the precision. Not a config.json field.
   */
  gpuDtype?: GpuDtype;
  /**
   * The FLUX.2 [klein] variant the pipeline loaded (`klein serve`, `klein mcp`): the models served, their ids and
   * prices follow it (models.ts); klein 4B when unset. Not a config.json field.
   */
  variant?: VariantId;
  /** Runs of one key running at once; the excess waits in `queued`. A key may override it. */
  perKeyConcurrency: number;
  rateLimit: {
    /** Run creations per key per minute (a key may override it). */
    createsPerMinute: number;
    /** Every authenticated request per key per minute (polls included). */
    requestsPerMinute: number;
  };
  /** Largest request body (413 past it); default: room for the most reference images as base64 data URIs. */
  maxBodyBytes?: number;
  /** Upper bound for `sync_mode` and `Prefer: wait=N`, in seconds. */
  maxWaitS: number;
  files: { urlTtlS: number; retentionS: number; cleanupIntervalS: number };
  inputs: {
    maxBytes: number;
    timeoutMs: number;
    maxRedirects: number;
    /** Plain http:// input and callback URLs (https only by default). */
    allowHttp: boolean;
    /** Addresses or CIDR blocks that are allowed although private, loopback or link-local (SSRF guard). */
    allowPrivate: string[];
  };
  callbacks: { maxAttempts: number; baseDelayMs: number; maxDelayMs: number; timeoutMs: number; pollMs: number };
  /**
   * LoRAs in requests: local files only under `dir` (config.json `loras.dir`, `klein serve --lora-dir`,
   * $KLEIN_LORA_DIR; none: no local files), https URLs and Hub references unless turned off, downloads capped at
   * `maxBytes` and cached by sha256 under $KLEIN_CACHE_DIR/loras.
   */
  loras: LoraSettings;
  /** `public`: /metrics answers without an API key (a private network's scraper); otherwise it needs an admin key. */
  metrics: { public: boolean };
  /** Prices per model id (`…/edit` included); defaults for every variant's ids in pricing.ts. */
  pricing: Record<string, ModelPrice>;
}

export function defaultConfig(dataDir: string): ServiceConfig {
  return {
    dataDir,
    workers: 1,
    perKeyConcurrency: 2,
    rateLimit: { createsPerMinute: 120, requestsPerMinute: 6000 },
    maxWaitS: 300,
    files: { urlTtlS: 24 * 3600, retentionS: 7 * 24 * 3600, cleanupIntervalS: 3600 },
    inputs: { maxBytes: 20 * 1024 * 1024, timeoutMs: 15_000, maxRedirects: 3, allowHttp: false, allowPrivate: [] },
    callbacks: { maxAttempts: 8, baseDelayMs: 2_000, maxDelayMs: 10 * 60_000, timeoutMs: 10_000, pollMs: 500 },
    metrics: { public: false },
    loras: { ...(process.env.KLEIN_LORA_DIR ? { dir: process.env.KLEIN_LORA_DIR } : {}), urls: true, hub: true, maxBytes: DEFAULT_MAX_LORA_BYTES, timeoutMs: 120_000 },
    pricing: defaultPrices(),
  };
}

export function defaultDataDir(): string {
  return process.env.KLEIN_DATA_DIR ?? path.join(os.homedir(), '.klein');
}

type DeepPartial<T> = { [K in keyof T]?: T[K] extends object ? (T[K] extends unknown[] ? T[K] : DeepPartial<T[K]>) : T[K] };

function merge<T>(base: T, over: DeepPartial<T> | undefined): T {
  if (!over) return base;
  const out: Record<string, unknown> = { ...(base as Record<string, unknown>) };
  for (const [k, v] of Object.entries(over)) {
    const b = out[k];
    out[k] = v && typeof v === 'object' && !Array.isArray(v) && b && typeof b === 'object' && !Array.isArray(b) ? merge(b, v as never) : v;
  }
  return out as T;
}

/** Defaults ← `<data>/config.json` ← explicit overrides (tests, flags). */
export function loadConfig(dataDir: string, overrides?: DeepPartial<ServiceConfig>): ServiceConfig {
  let cfg = defaultConfig(dataDir);
  const file = path.join(dataDir, 'config.json');
  if (fs.existsSync(file)) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(fs.readFileSync(file, 'utf8'));
    } catch (e) {
      throw new Error(`${file} is not valid JSON: ${(e as Error).message}`);
    }
    cfg = merge(cfg, parsed as DeepPartial<ServiceConfig>);
  }
  return merge(cfg, overrides);
}

export type ConfigOverrides = DeepPartial<ServiceConfig>;
