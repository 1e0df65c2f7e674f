// Durable state in one SQLite file (WAL): keys, runs, idempotency records, callback secrets and deliveries, usage.
// Every state change is a single statement or transaction, so a crash leaves either the old or the new state.
import Database from 'better-sqlite3';
import fs from 'node:fs';
import path from 'node:path';
import { isoNow } from './time.ts';

export type RunStatus = 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled';
export const RUN_STATUSES: RunStatus[] = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];
export const TERMINAL: ReadonlySet<RunStatus> = new Set(['succeeded', 'failed', 'cancelled']);

export interface KeyRow {
  id: string;
  name: string;
  prefix: string;
  hash: string;
  is_admin: number;
  rate_limit_per_min: number | null;
  max_concurrency: number | null;
  created_at: string;
  last_used_at: string | null;
  revoked_at: string | null;
}

export interface RunRow {
  id: string;
  key_id: string;
  model_id: string;
  status: RunStatus;
  /** the input as the client sent it (validated, defaults applied) */
  input: string;
  output: string | null;
  progress: string | null;
  cost_micros: number | null;
  cost_breakdown: string | null;
  metadata: string | null;
  client_ref: string | null;
  callback_url: string | null;
  seed: number;
  attempts: number;
  created_at: string;
  started_at: string | null;
  completed_at: string | null;
  failure_code: string | null;
  failure_stage: string | null;
  failure_message: string | null;
}

export interface DeliveryRow {
  id: string;
  run_id: string;
  url: string;
  event: string;
  payload: string;
  status: 'pending' | 'succeeded' | 'failed';
  attempt_count: number;
  max_attempts: number;
  next_attempt_at: number | null;
  failure_reason_code: string | null;
  created_at: string;
  completed_at: string | null;
}

export interface AttemptRow {
  delivery_id: string;
  attempt_number: number;
  status_code: number | null;
  response_body: string | null;
  response_time_ms: number;
  error_message: string | null;
  attempted_at: string;
}

export interface SecretRow {
  id: string;
  key_id: string;
  label: string | null;
  secret: string;
  prefix: string;
  created_at: string;
  revoked_at: string | null;
}

const SCHEMA = `
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, prefix TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
  is_admin INTEGER NOT NULL DEFAULT 0, rate_limit_per_min INTEGER, max_concurrency INTEGER,
  created_at TEXT NOT NULL, last_used_at TEXT, revoked_at TEXT);
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY, key_id TEXT NOT NULL, model_id TEXT NOT NULL, status TEXT NOT NULL,
  input TEXT NOT NULL, output TEXT, progress TEXT, cost_micros INTEGER, cost_breakdown TEXT,
  metadata TEXT, client_ref TEXT, callback_url TEXT, seed INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL, started_at TEXT, completed_at TEXT,
  failure_code TEXT, failure_stage TEXT, failure_message TEXT);
CREATE INDEX IF NOT EXISTS runs_by_key ON runs (key_id, id);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, id);
CREATE TABLE IF NOT EXISTS idempotency (
  key_id TEXT NOT NULL, idem_key TEXT NOT NULL, request_hash TEXT NOT NULL, run_id TEXT NOT NULL,
  response TEXT, created_at TEXT NOT NULL, PRIMARY KEY (key_id, idem_key));
CREATE TABLE IF NOT EXISTS callback_secrets (
  id TEXT PRIMARY KEY, key_id TEXT NOT NULL, label TEXT, secret TEXT NOT NULL, prefix TEXT NOT NULL,
  created_at TEXT NOT NULL, revoked_at TEXT);
CREATE TABLE IF NOT EXISTS callback_deliveries (
  id TEXT PRIMARY KEY, run_id TEXT NOT NULL, url TEXT NOT NULL, event TEXT NOT NULL, payload TEXT NOT NULL,
  status TEXT NOT NULL, attempt_count INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
  next_attempt_at INTEGER, failure_reason_code TEXT, created_at TEXT NOT NULL, completed_at TEXT);
CREATE INDEX IF NOT EXISTS deliveries_due ON callback_deliveries (status, next_attempt_at);
CREATE TABLE IF NOT EXISTS callback_attempts (
  delivery_id TEXT NOT NULL, attempt_number INTEGER NOT NULL, status_code INTEGER, response_body TEXT,
  response_time_ms INTEGER NOT NULL, error_message TEXT, attempted_at TEXT NOT NULL,
  PRIMARY KEY (delivery_id, attempt_number));
CREATE TABLE IF NOT EXISTS usage (
  run_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, day TEXT NOT NULL, model_id TEXT NOT NULL,
  images INTEGER NOT NULL, output_mp INTEGER NOT NULL, input_mp INTEGER NOT NULL, cost_micros INTEGER NOT NULL,
  created_at TEXT NOT NULL, lora_mp INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS usage_by_key_day ON usage (key_id, day);
`;

export interface ListRunsQuery {
  keyId?: string;
  status?: RunStatus;
  modelId?: string;
  clientRef?: string;
  createdAfter?: string;
  createdBefore?: string;
  /** return runs with id < before (newest first) */
  before?: string;
  limit: number;
}

export class Store {
  readonly db: Database.Database;
  private readonly statements = new Map<string, Database.Statement>();

  constructor(readonly file: string) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    this.db = new Database(file);
    // WAL: readers never block the writer, and a committed transaction survives a crash of the process
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('synchronous = NORMAL');
    this.db.pragma('busy_timeout = 5000');
    this.db.exec(SCHEMA);
    // databases made before LoRA runs were billed: their usage rows had no surcharge
    const usageColumns = this.db.prepare('PRAGMA table_info(usage)').all() as Array<{ name: string }>;
    if (!usageColumns.some((c) => c.name === 'lora_mp')) this.db.exec('ALTER TABLE usage ADD COLUMN lora_mp INTEGER NOT NULL DEFAULT 0');
  }

  static open(dataDir: string): Store {
    return new Store(path.join(dataDir, 'klein.db'));
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  /** Each SQL text is prepared once: preparing costs more than running most of these statements (every request authenticates and reads a run). */
  private sql(text: string): Database.Statement {
    let statement = this.statements.get(text);
    if (!statement) {
      statement = this.db.prepare(text);
      this.statements.set(text, statement);
    }
    return statement;
  }

  tx<T>(fn: () => T): T {
    return this.db.transaction(fn)();
  }

  // --- meta ---
  getMeta(key: string): string | undefined {
    return (this.sql('SELECT value FROM meta WHERE key = ?').get(key) as { value: string } | undefined)?.value;
  }
  setMeta(key: string, value: string): void {
    this.sql('INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value').run(key, value);
  }

  // --- keys ---
  insertKey(k: Omit<KeyRow, 'last_used_at' | 'revoked_at'>): void {
    this
      .sql('INSERT INTO api_keys (id, name, prefix, hash, is_admin, rate_limit_per_min, max_concurrency, created_at) VALUES (@id, @name, @prefix, @hash, @is_admin, @rate_limit_per_min, @max_concurrency, @created_at)')
      .run(k);
  }
  keyByHash(hash: string): KeyRow | undefined {
    return this.sql('SELECT * FROM api_keys WHERE hash = ?').get(hash) as KeyRow | undefined;
  }
  keyById(id: string): KeyRow | undefined {
    return this.sql('SELECT * FROM api_keys WHERE id = ?').get(id) as KeyRow | undefined;
  }
  listKeys(): KeyRow[] {
    return this.sql('SELECT * FROM api_keys ORDER BY created_at, id').all() as KeyRow[];
  }
  countKeys(): number {
    return (this.sql('SELECT count(*) AS n FROM api_keys').get() as { n: number }).n;
  }
  revokeKey(idOrPrefix: string): KeyRow | undefined {
    const row = this.sql('SELECT * FROM api_keys WHERE id = ? OR prefix = ?').get(idOrPrefix, idOrPrefix) as KeyRow | undefined;
    if (row && !row.revoked_at) this.sql('UPDATE api_keys SET revoked_at = ? WHERE id = ?').run(isoNow(), row.id);
    return row ? this.keyById(row.id) : undefined;
  }
  touchKey(id: string): void {
    this.sql('UPDATE api_keys SET last_used_at = ? WHERE id = ?').run(isoNow(), id);
  }

  // --- runs ---
  insertRun(r: RunRow): void {
    this
      .sql(`INSERT INTO runs (id, key_id, model_id, status, input, output, progress, cost_micros, cost_breakdown, metadata,
        client_ref, callback_url, seed, attempts, created_at, started_at, completed_at, failure_code, failure_stage, failure_message)
        VALUES (@id, @key_id, @model_id, @status, @input, @output, @progress, @cost_micros, @cost_breakdown, @metadata,
        @client_ref, @callback_url, @seed, @attempts, @created_at, @started_at, @completed_at, @failure_code, @failure_stage, @failure_message)`)
      .run(r);
  }
  getRun(id: string): RunRow | undefined {
    return this.sql('SELECT * FROM runs WHERE id = ?').get(id) as RunRow | undefined;
  }
  /** Update some columns of a run; `onlyIf` guards the transition (returns false when the run was not in it). */
  updateRun(id: string, set: Partial<RunRow>, onlyIf?: RunStatus[]): boolean {
    const cols = Object.keys(set);
    if (cols.length === 0) return true;
    const guard = Object.fromEntries((onlyIf ?? []).map((s, i) => [`__s${i}`, s]));
    const where = onlyIf ? ` AND status IN (${Object.keys(guard).map((k) => `@${k}`).join(',')})` : '';
    const info = this
      .sql(`UPDATE runs SET ${cols.map((c) => `${c} = @${c}`).join(', ')} WHERE id = @__id${where}`)
      .run({ ...set, ...guard, __id: id });
    return info.changes > 0;
  }
  listRuns(q: ListRunsQuery): RunRow[] {
    const where: string[] = [];
    const args: unknown[] = [];
    const add = (sql: string, v: unknown) => { where.push(sql); args.push(v); };
    if (q.keyId) add('key_id = ?', q.keyId);
    if (q.status) add('status = ?', q.status);
    if (q.modelId) add('model_id = ?', q.modelId);
    if (q.clientRef) add('client_ref = ?', q.clientRef);
    if (q.createdAfter) add('created_at >= ?', q.createdAfter);
    if (q.createdBefore) add('created_at < ?', q.createdBefore);
    if (q.before) add('id < ?', q.before);
    const sql = `SELECT * FROM runs ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY id DESC LIMIT ?`;
    return this.sql(sql).all(...args, q.limit) as RunRow[];
  }
  runsWithStatus(status: RunStatus, limit = 1000): RunRow[] {
    return this.sql('SELECT * FROM runs WHERE status = ? ORDER BY id LIMIT ?').all(status, limit) as RunRow[];
  }
  countByStatus(): Record<RunStatus, number> {
    const out = Object.fromEntries(RUN_STATUSES.map((s) => [s, 0])) as Record<RunStatus, number>;
    for (const r of this.sql('SELECT status, count(*) AS n FROM runs GROUP BY status').all() as { status: RunStatus; n: number }[]) out[r.status] = r.n;
    return out;
  }
  /** Runs waiting and running: a range of the status index, however many finished runs the table holds (health checks ask often). */
  countActive(): { queued: number; running: number } {
    const out = { queued: 0, running: 0 };
    for (const r of this.sql("SELECT status, count(*) AS n FROM runs WHERE status IN ('queued', 'running') GROUP BY status").all() as { status: 'queued' | 'running'; n: number }[]) out[r.status] = r.n;
    return out;
  }
  /** Succeeded runs whose files are older than `beforeIso` and not yet cleaned. */
  runsWithFilesBefore(beforeIso: string): RunRow[] {
    return this
      .sql("SELECT * FROM runs WHERE status = 'succeeded' AND completed_at < ? AND output IS NOT NULL AND json_extract(output, '$.expired') IS NULL")
      .all(beforeIso) as RunRow[];
  }

  // --- idempotency ---
  getIdempotency(keyId: string, idemKey: string): { request_hash: string; run_id: string; response: string | null } | undefined {
    return this.sql('SELECT request_hash, run_id, response FROM idempotency WHERE key_id = ? AND idem_key = ?').get(keyId, idemKey) as never;
  }
  insertIdempotency(keyId: string, idemKey: string, hash: string, runId: string): void {
    this.sql('INSERT INTO idempotency (key_id, idem_key, request_hash, run_id, created_at) VALUES (?, ?, ?, ?, ?)').run(keyId, idemKey, hash, runId, isoNow());
  }
  setIdempotencyResponse(keyId: string, idemKey: string, response: string): void {
    this.sql('UPDATE idempotency SET response = ? WHERE key_id = ? AND idem_key = ? AND response IS NULL').run(response, keyId, idemKey);
  }

  // --- callback secrets ---
  insertSecret(s: Omit<SecretRow, 'revoked_at'>): void {
    this.sql('INSERT INTO callback_secrets (id, key_id, label, secret, prefix, created_at) VALUES (@id, @key_id, @label, @secret, @prefix, @created_at)').run(s);
  }
  /** Active secrets of a key, newest first. */
  activeSecrets(keyId: string): SecretRow[] {
    return this.sql('SELECT * FROM callback_secrets WHERE key_id = ? AND revoked_at IS NULL ORDER BY created_at DESC, id DESC').all(keyId) as SecretRow[];
  }
  listSecrets(keyId: string): SecretRow[] {
    return this.sql('SELECT * FROM callback_secrets WHERE key_id = ? ORDER BY created_at DESC, id DESC').all(keyId) as SecretRow[];
  }
  revokeSecret(keyId: string, id: string): SecretRow | undefined {
    this.sql('UPDATE callback_secrets SET revoked_at = ? WHERE key_id = ? AND id = ? AND revoked_at IS NULL').run(isoNow(), keyId, id);
    return this.sql('SELECT * FROM callback_secrets WHERE key_id = ? AND id = ?').get(keyId, id) as SecretRow | undefined;
  }

  // --- callback deliveries ---
  insertDelivery(d: DeliveryRow): void {
    this
      .sql(`INSERT INTO callback_deliveries (id, run_id, url, event, payload, status, attempt_count, max_attempts, next_attempt_at, failure_reason_code, created_at, completed_at)
        VALUES (@id, @run_id, @url, @event, @payload, @status, @attempt_count, @max_attempts, @next_attempt_at, @failure_reason_code, @created_at, @completed_at)`)
      .run(d);
  }
  dueDeliveries(nowMs: number, limit = 20): DeliveryRow[] {
    return this.sql("SELECT * FROM callback_deliveries WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?").all(nowMs, limit) as DeliveryRow[];
  }
  deliveriesOf(runId: string): DeliveryRow[] {
    return this.sql('SELECT * FROM callback_deliveries WHERE run_id = ? ORDER BY created_at, id').all(runId) as DeliveryRow[];
  }
  updateDelivery(id: string, set: Partial<DeliveryRow>): void {
    const cols = Object.keys(set);
    this.sql(`UPDATE callback_deliveries SET ${cols.map((c) => `${c} = @${c}`).join(', ')} WHERE id = @__id`).run({ ...set, __id: id });
  }
  insertAttempt(a: AttemptRow): void {
    this
      .sql('INSERT INTO callback_attempts (delivery_id, attempt_number, status_code, response_body, response_time_ms, error_message, attempted_at) VALUES (@delivery_id, @attempt_number, @status_code, @response_body, @response_time_ms, @error_message, @attempted_at)')
      .run(a);
  }
  attemptsOf(deliveryId: string): AttemptRow[] {
    return this.sql('SELECT * FROM callback_attempts WHERE delivery_id = ? ORDER BY attempt_number').all(deliveryId) as AttemptRow[];
  }

  // --- usage ---
  /** `lora_mp`: output megapixels of a run with LoRAs (what their surcharge is billed on); 0 without. */
  insertUsage(u: { run_id: string; key_id: string; day: string; model_id: string; images: number; output_mp: number; input_mp: number; lora_mp?: number; cost_micros: number }): void {
    this
      .sql('INSERT OR IGNORE INTO usage (run_id, key_id, day, model_id, images, output_mp, input_mp, lora_mp, cost_micros, created_at) VALUES (@run_id, @key_id, @day, @model_id, @images, @output_mp, @input_mp, @lora_mp, @cost_micros, @created_at)')
      .run({ lora_mp: 0, ...u, created_at: isoNow() });
  }
  usage(q: { keyId?: string; from?: string; to?: string }): { key_id: string; day: string; model_id: string; runs: number; images: number; output_mp: number; input_mp: number; lora_mp: number; cost_micros: number }[] {
    const where: string[] = [];
    const args: unknown[] = [];
    if (q.keyId) { where.push('key_id = ?'); args.push(q.keyId); }
    if (q.from) { where.push('day >= ?'); args.push(q.from); }
    if (q.to) { where.push('day <= ?'); args.push(q.to); }
    return this
      .sql(`SELECT key_id, day, model_id, count(*) AS runs, sum(images) AS images, sum(output_mp) AS output_mp, sum(input_mp) AS input_mp,
        sum(lora_mp) AS lora_mp, sum(cost_micros) AS cost_micros FROM usage ${where.length ? 'WHERE ' + where.join(' AND ') : ''} GROUP BY key_id, day, model_id ORDER BY day, key_id, model_id`)
      .all(...args) as never;
  }
}
