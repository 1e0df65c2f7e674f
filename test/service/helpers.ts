// Shared test harness: a real server on 127.0.0.1 (port 0) over a temp data folder, and a small HTTP client.
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { openPipeline } from '../../src/pipeline/pipeline.ts';
import { createApp, type Service } from '../../src/service/app.ts';
import type { MattingProbe } from '../../src/service/background.ts';
import type { ScaleExtension } from '../../src/service/scale/api.ts';
import type { EngineProcessStats } from '../../src/service/metrics.ts';
import { createKey } from '../../src/service/auth.ts';
import { type ConfigOverrides, loadConfig } from '../../src/service/config.ts';
import { createLogger } from '../../src/service/logger.ts';
import { sha256Hex } from '../../src/service/time.ts';
import { cpuTarget } from '../../src/runtime/target.ts';

export function tempDir(prefix = 'klein-svc-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

const ROOT = path.resolve(import.meta.dirname, '../..');

/**
 * The real pipeline on a tiny random model written by `klein dev make-tiny-model`. The folder is shared by the
 * service test files (keyed by the generator's source, so a changed generator makes a new one), which keeps the
 * compiled-graph cache beside it warm across files.
 */
export async function realPipeline(): Promise<ImagePipeline & { modelDir: string }> {
  const hash = crypto.createHash('sha256');
  for (const f of ['src/fixtures/tiny-model.ts', 'src/cli/dev.ts']) hash.update(fs.readFileSync(path.join(ROOT, f)));
  const dir = path.join(os.tmpdir(), `klein-service-tests-${hash.digest('hex').slice(0, 12)}`);
  const model = path.join(dir, 'model');
  if (!fs.existsSync(path.join(dir, 'done'))) {
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir, { recursive: true });
    const r = spawnSync(process.execPath, [path.join(ROOT, 'bin/klein.js'), 'dev', 'make-tiny-model', model], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`klein dev make-tiny-model failed: ${r.stderr}`);
    fs.writeFileSync(path.join(dir, 'done'), '');
  }
  const p = await openPipeline({ target: cpuTarget(), model, keepLoaded: true });
  return Object.assign(p, { modelDir: model });
}

/**
 * A klein model folder with no matting model: the tiny one linked entry by entry, without its matting/. (Set
 * $KLEIN_HOME to an empty folder and unset $KLEIN_MATTING_MODEL as well, so that no other location supplies one.)
 */
export function modelFolderWithoutMatting(modelDir: string): string {
  const dir = path.join(tempDir('klein-nomatting-'), 'model');
  fs.mkdirSync(dir);
  for (const e of fs.readdirSync(modelDir)) if (e !== 'matting') fs.symlinkSync(path.join(modelDir, e), path.join(dir, e));
  return dir;
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

/**
 * `key`: use this existing key for `api` (a restarted service over the same data folder). `matting`: the probe
 * `klein serve` gives the service (whether transparent backgrounds can be served); without it runs find out.
 * `scale`: the scale-out extension (worker routes, drain on stop); `port`: listen there (a restarted API that
 * running workers must find again at the same address); `engines`: the engine processes behind the pipeline;
 * `modelDir`: the served model folder (what LoRAs are checked against; without it, the variant's real shapes).
 */
export async function startService(o: { pipeline: ImagePipeline; dataDir?: string; config?: ConfigOverrides; key?: string; matting?: MattingProbe; scale?: ScaleExtension; port?: number; engines?: EngineProcessStats[]; modelDir?: string }): Promise<Harness> {
  const dataDir = o.dataDir ?? tempDir();
  const cfg = loadConfig(dataDir, { ...TEST_CONFIG, ...(o.config ?? {}), callbacks: { ...TEST_CONFIG.callbacks, ...(o.config?.callbacks ?? {}) }, inputs: { ...TEST_CONFIG.inputs, ...(o.config?.inputs ?? {}) } });
  const svc = createApp({ pipeline: o.pipeline, config: cfg, logger: createLogger(process.env.KLEIN_LOG_LEVEL ?? 'silent'), ...(o.matting ? { matting: o.matting } : {}), ...(o.scale ? { scale: o.scale } : {}), ...(o.engines ? { engines: o.engines } : {}), ...(o.modelDir ? { modelDir: o.modelDir } : {}) });
  const { url } = await svc.listen(o.port ?? 0, '127.0.0.1');
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
