// Shared test harness: a real server on 127.0.0.1 (port 0) over a temp data folder, and a small HTTP client.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import type { GenerateRequest, GenerateOptions, GenerateResult, ImagePipeline } from '../../src/pipeline/types.ts';
import { createApp, type Service } from '../../src/service/app.ts';
import { createKey } from '../../src/service/auth.ts';
import { type ConfigOverrides, loadConfig } from '../../src/service/config.ts';
import { createLogger } from '../../src/service/logger.ts';
import { sha256Hex } from '../../src/service/time.ts';

export function tempDir(prefix = 'klein-svc-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Test defaults: fast callback retries, loopback allowed for inputs and callbacks over plain http. */
export const TEST_CONFIG: ConfigOverrides = {
  callbacks: { baseDelayMs: 50, maxDelayMs: 400, pollMs: 20, timeoutMs: 2000, maxAttempts: 5 },
  inputs: { allowHttp: true, allowPrivate: ['127.0.0.1'] },
};

export interface Harness {
  svc: Service;
  url: string;
  dataDir: string;
  key: string;
  keyId: string;
  api: (method: string, p: string, body?: unknown, headers?: Record<string, string>) => Promise<{ status: number; json: any; headers: Headers }>;
  newKey: (opts?: { rateLimitPerMin?: number; maxConcurrency?: number; admin?: boolean }) => string;
}

/** `key`: use this existing key for `api` (a restarted service over the same data folder). */
export async function startService(o: { pipeline: ImagePipeline; dataDir?: string; config?: ConfigOverrides; key?: string }): Promise<Harness> {
  const dataDir = o.dataDir ?? tempDir();
  const cfg = loadConfig(dataDir, { ...TEST_CONFIG, ...(o.config ?? {}), callbacks: { ...TEST_CONFIG.callbacks, ...(o.config?.callbacks ?? {}) }, inputs: { ...TEST_CONFIG.inputs, ...(o.config?.inputs ?? {}) } });
  const svc = createApp({ pipeline: o.pipeline, config: cfg, logger: createLogger(process.env.KLEIN_LOG_LEVEL ?? 'silent') });
  const { url } = await svc.listen(0, '127.0.0.1');
  const newKey = (k: { rateLimitPerMin?: number; maxConcurrency?: number; admin?: boolean } = {}) => createKey(svc.store, { name: 'test', ...k }).key;
  const first = o.key ? { key: o.key, row: svc.store.keyByHash(sha256Hex(o.key))! } : createKey(svc.store, { name: 'test' });
  const api: Harness['api'] = async (method, p, body, headers = {}) => {
    const res = await fetch(url + p, {
      method,
      headers: { authorization: `Bearer ${first.key}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}), ...headers },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    const text = await res.text();
    let json: any = null;
    try { json = JSON.parse(text); } catch { json = text; }
    return { status: res.status, json, headers: res.headers };
  };
  return { svc, url, dataDir, key: first.key, keyId: first.row.id, api, newKey };
}

export async function pollUntil(h: Harness, id: string, pred: (run: any) => boolean, timeoutMs = 30_000): Promise<any> {
  const t0 = Date.now();
  for (;;) {
    const r = await h.api('GET', `/v1/runs/${id}`);
    if (pred(r.json)) return r.json;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for run ${id}: ${JSON.stringify(r.json.status_code)}`);
    await new Promise((res) => setTimeout(res, 20));
  }
}
export const terminal = (r: any) => ['succeeded', 'failed', 'cancelled'].includes(r.status_code);

/**
 * A stand-in engine: really renders `numImages` images of the requested size and format with sharp, reports one
 * progress event per step, and honours the AbortSignal between steps, like the real pipeline's contract says.
 */
export class StandInPipeline implements ImagePipeline {
  calls: GenerateRequest[] = [];
  /** resolves the current generate() steps one at a time when `manual` */
  private gates: (() => void)[] = [];
  constructor(readonly opts: { stepMs?: number; manual?: boolean } = {}) {}

  private credits = 0;

  /** Let `n` steps finish (now, or as soon as they are reached). */
  release(n = 1): void {
    for (let i = 0; i < n; i++) {
      const g = this.gates.shift();
      if (g) g();
      else this.credits++;
    }
  }

  async generate(req: GenerateRequest, o: GenerateOptions = {}): Promise<GenerateResult> {
    this.calls.push(req);
    const steps = req.steps ?? 4;
    o.onProgress?.({ stage: 'text' });
    for (let s = 1; s <= steps; s++) {
      if (this.opts.manual && this.credits > 0) this.credits--;
      else if (this.opts.manual) {
        await new Promise<void>((res) => {
          this.gates.push(res);
          // an aborted step leaves the queue of gates, so a later release() reaches the next run
          o.signal?.addEventListener('abort', () => { this.gates = this.gates.filter((g) => g !== res); res(); }, { once: true });
        });
      }
      else await new Promise((res) => setTimeout(res, this.opts.stepMs ?? 5));
      if (o.signal?.aborted) throw new DOMException('cancelled', 'AbortError');
      o.onProgress?.({ stage: 'denoise', step: s, total: steps });
    }
    const images = [];
    for (let i = 0; i < req.numImages; i++) {
      const img = sharp({ create: { width: req.width, height: req.height, channels: 3, background: { r: (req.seed + i) % 256, g: 80, b: 160 } } });
      const data = await (req.outputFormat === 'jpeg' ? img.jpeg() : req.outputFormat === 'webp' ? img.webp() : img.png()).toBuffer();
      images.push({ data: new Uint8Array(data), width: req.width, height: req.height, contentType: `image/${req.outputFormat}` as const });
    }
    return { images, seed: req.seed, timings: { total: 0.01 } };
  }

  async close(): Promise<void> {}
}
