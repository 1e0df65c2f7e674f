// Signed callbacks on terminal run states. Each delivery is a row with its frozen payload bytes and next attempt
// time, so pending deliveries survive a restart; a poller sends the due ones with exponential backoff.
import crypto from 'node:crypto';
import type { Logger } from 'pino';
import type { ServiceConfig } from './config.ts';
import type { DeliveryRow, RunRow, SecretRow, Store } from './store.ts';
import { ApiError } from './errors.ts';
import { guardedRequest } from './net.ts';
import { callbackPayload, EVENT_FOR, type PresentCtx } from './present.ts';
import { isoNow, ulid } from './time.ts';

export const SIGNATURE_HEADER = 'Runflow-Signature';
/** During a rotation the signature by the previous secret travels too, so receivers can switch at their pace. */
export const PREVIOUS_SIGNATURE_HEADER = 'Runflow-Signature-Previous';
/** Active secrets per key: the current one and the one being rotated out. */
export const MAX_ACTIVE_SECRETS = 2;

export function sign(secret: string, body: string | Buffer): string {
  return crypto.createHmac('sha256', secret).update(body).digest('hex');
}

export function publicSecret(s: SecretRow, currentId: string | undefined) {
  return { id: s.id, label: s.label, key_prefix: s.prefix, is_current: s.id === currentId && !s.revoked_at, created_at: s.created_at, revoked_at: s.revoked_at };
}

export class Callbacks {
  private timer: NodeJS.Timeout | null = null;
  private inFlight = new Set<string>();
  private stopped = false;

  constructor(
    private store: Store,
    private cfg: ServiceConfig,
    private log: Logger,
    private ctx: () => PresentCtx,
  ) {}

  // --- secrets ---
  createSecret(keyId: string, label: string | null): { row: SecretRow; plain: string } {
    return this.store.tx(() => {
      const plain = 'whsec_' + crypto.randomBytes(24).toString('base64url');
      const row: SecretRow = { id: 'cbs_' + ulid().toLowerCase(), key_id: keyId, label, secret: plain, prefix: plain.slice(0, 12), created_at: isoNow(), revoked_at: null };
      this.store.insertSecret(row);
      // keep at most two active: creating a third retires the oldest
      for (const old of this.store.activeSecrets(keyId).slice(MAX_ACTIVE_SECRETS)) this.store.revokeSecret(keyId, old.id);
      return { row, plain };
    });
  }

  // --- deliveries ---
  /** Queue the callback of a run that just reached a terminal state (no-op without callback_url). */
  enqueue(run: RunRow): DeliveryRow | null {
    if (!run.callback_url || !EVENT_FOR[run.status]) return null;
    const d: DeliveryRow = {
      id: 'dlv_' + ulid().toLowerCase(),
      run_id: run.id,
      url: run.callback_url,
      event: EVENT_FOR[run.status],
      payload: JSON.stringify(callbackPayload(run, this.ctx())),
      status: 'pending',
      attempt_count: 0,
      max_attempts: this.cfg.callbacks.maxAttempts,
      next_attempt_at: Date.now(),
      failure_reason_code: null,
      created_at: isoNow(),
      completed_at: null,
    };
    this.store.insertDelivery(d);
    this.poke();
    return d;
  }

  redeliver(run: RunRow): DeliveryRow {
    if (!run.callback_url) throw new ApiError(422, 'NO_CALLBACK_URL', 'this run has no callback_url');
    if (!EVENT_FOR[run.status]) throw new ApiError(409, 'RUN_NOT_TERMINAL', `the run is ${run.status}; callbacks are sent when it ends`);
    if (this.store.deliveriesOf(run.id).some((d) => d.status === 'pending')) throw new ApiError(409, 'CONFLICT', 'a delivery for this run is still in progress');
    return this.enqueue(run)!;
  }

  history(runId: string) {
    return this.store.deliveriesOf(runId).map((d) => ({
      id: d.id, event: d.event, url: d.url, status: d.status, attempt_count: d.attempt_count, max_attempts: d.max_attempts,
      next_attempt_at: d.status === 'pending' && d.next_attempt_at !== null ? isoNow(d.next_attempt_at) : null,
      failure_reason_code: d.failure_reason_code, created_at: d.created_at, completed_at: d.completed_at,
      attempts: this.store.attemptsOf(d.id).map((a) => ({
        attempt_number: a.attempt_number, status_code: a.status_code, response_body: a.response_body,
        response_time_ms: a.response_time_ms, error_message: a.error_message, attempted_at: a.attempted_at,
      })),
    }));
  }

  start(): void {
    this.stopped = false;
    this.timer = setInterval(() => this.poke(), this.cfg.callbacks.pollMs);
    this.timer.unref();
    this.poke();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Send every due delivery that is not already being sent. */
  poke(): void {
    if (this.stopped || !this.store.db.open) return;
    for (const d of this.store.dueDeliveries(Date.now())) {
      if (this.inFlight.has(d.id)) continue;
      this.inFlight.add(d.id);
      this.attempt(d).finally(() => this.inFlight.delete(d.id));
    }
  }

  backoffMs(attemptNumber: number): number {
    const { baseDelayMs, maxDelayMs } = this.cfg.callbacks;
    return Math.min(maxDelayMs, baseDelayMs * 2 ** (attemptNumber - 1));
  }

  private async attempt(d: DeliveryRow): Promise<void> {
    const run = this.store.getRun(d.run_id);
    const secrets = run ? this.store.activeSecrets(run.key_id) : [];
    const headers: Record<string, string> = {
      'content-type': 'application/json',
      'user-agent': 'klein-serve/0.1',
      'Runflow-Request-Id': d.id,
      'Runflow-Event': d.event,
    };
    if (secrets[0]) headers[SIGNATURE_HEADER] = sign(secrets[0].secret, d.payload);
    if (secrets[1]) headers[PREVIOUS_SIGNATURE_HEADER] = sign(secrets[1].secret, d.payload);
    const n = d.attempt_count + 1;
    const t0 = Date.now();
    let status: number | null = null;
    let body: string | null = null;
    let error: string | null = null;
    try {
      const res = await guardedRequest(d.url, {
        method: 'POST', headers, body: d.payload, timeoutMs: this.cfg.callbacks.timeoutMs, maxBytes: 64 * 1024, maxRedirects: 0,
        policy: this.cfg.inputs,
      });
      status = res.status;
      body = res.body.toString('utf8').slice(0, 1024);
    } catch (e) {
      error = (e as Error).message;
    }
    if (this.stopped || !this.store.db.open) return;
    const ok = status !== null && status >= 200 && status < 300;
    const last = n >= d.max_attempts;
    this.store.tx(() => {
      this.store.insertAttempt({ delivery_id: d.id, attempt_number: n, status_code: status, response_body: body, response_time_ms: Date.now() - t0, error_message: error, attempted_at: isoNow(t0) });
      this.store.updateDelivery(d.id, {
        attempt_count: n,
        status: ok ? 'succeeded' : last ? 'failed' : 'pending',
        next_attempt_at: ok || last ? null : Date.now() + this.backoffMs(n),
        failure_reason_code: ok ? null : last ? (status !== null ? 'HTTP_STATUS' : 'UNREACHABLE') : null,
        completed_at: ok || last ? isoNow() : null,
      });
    });
    this.log.info({ delivery: d.id, run: d.run_id, attempt: n, status, error, ok }, 'callback attempt');
  }
}
