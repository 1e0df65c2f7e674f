// The engine host: an ImagePipeline whose KleinPipeline runs in a child process (engine-child.ts), so the API's
// event loop (HTTP, SSE, callbacks, queue heartbeats) never waits on the engine's synchronous work, and a native
// crash or an OOM kill of the engine takes only the child. Progress, cancellation and results pass as IPC messages
// (V8 serialization: image bytes are Uint8Arrays). A child that dies mid-run fails the attempt with EngineCrashed
// (the run queue retries it once, then fails it ENGINE_CRASHED) and a fresh child is started at once.
import { type ChildProcess, fork } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Logger } from 'pino';
import type { GenerateOptions, GenerateRequest, GenerateResult, ImagePipeline } from '../pipeline/types.ts';
import { deserializeError, engineInfo, type EngineInfo, type EngineOptions, type FromEngine, type HandedOverResult, type ToEngine } from './engine-protocol.ts';
import { AttemptLost } from './queue.ts';
import { engineProcessEnv } from '../runtime/malloc-env.ts';

export type { EngineInfo, EngineOptions } from './engine-protocol.ts';

/** The run failure code of an attempt whose engine process died, once its retry is used up too. */
export const ENGINE_CRASHED = 'ENGINE_CRASHED';

/** The engine process exited or was killed during a generation: the attempt is lost, not the run's input at fault. */
export class EngineCrashed extends AttemptLost {
  constructor(message: string) {
    super(message, true, ENGINE_CRASHED);
    this.name = 'EngineCrashed';
  }
}

const CHILD = new URL('./engine-child.ts', import.meta.url);
const DEFAULT_ENGINE_NICE = 10;
// an absolute URL: `--import tsx` would be looked up from the working directory, which may be anywhere
const TSX_LOADER = import.meta.resolve('tsx');

export interface EngineHostOptions {
  log?: Logger;
  /** Added to the child's nice value (lower CPU priority than the API); default $KLEIN_ENGINE_NICE, else 10. */
  nice?: number;
  /** How long close() waits for the child to release its model and exit before killing it. */
  closeMs?: number;
}

interface Pending {
  id: number;
  resolve: (r: GenerateResult) => void;
  reject: (e: Error) => void;
  opts: GenerateOptions;
}

/**
 * How much lower the engine's CPU priority is than the API's: $KLEIN_ENGINE_NICE, default 10. When the cores are
 * contended, the API's few milliseconds per request then come first and the engine gets the rest; on an idle
 * machine nothing changes (docs/benchmarks.md, "Runs API during a generation").
 */
function engineNice(): number {
  const v = process.env.KLEIN_ENGINE_NICE;
  const n = v === undefined || v === '' ? DEFAULT_ENGINE_NICE : Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 19) throw new Error(`KLEIN_ENGINE_NICE must be 0–19, got "${v}"`);
  return n;
}

export function describeExit(code: number | null, signal: NodeJS.Signals | null): string {
  if (signal === 'SIGKILL') return 'was killed (SIGKILL: out of memory, or killed by hand)';
  if (signal) return `was killed by ${signal}`;
  return `exited with code ${code}`;
}

export class EngineHost implements ImagePipeline {
  private child: ChildProcess | null = null;
  private starting: Promise<ChildProcess> | null = null;
  private pending: Pending | null = null;
  private nextId = 1;
  private closing = false;
  private _info?: EngineInfo;
  /** Engine processes that died while this host needed them (mid-run or idle). */
  crashes = 0;
  /** Engine processes started, the first one included. */
  starts = 0;
  /** Where the engine writes the images of a result for this host to read (engine-protocol.ts HandedOverImage). */
  readonly handoverDir = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-engine-'));

  private constructor(private readonly options: EngineOptions, private readonly o: EngineHostOptions) {}

  /** Starts the engine process and opens the model there; rejects with the engine's own error (e.g. ModelFolderError). */
  static async start(options: EngineOptions, o: EngineHostOptions = {}): Promise<EngineHost> {
    const host = new EngineHost(options, o);
    try {
      await host.ensureChild();
    } catch (e) {
      fs.rmSync(host.handoverDir, { recursive: true, force: true });
      throw e;
    }
    return host;
  }

  /** What the engine's pipeline says about itself (from the first start; a restart opens the same model). */
  get info(): EngineInfo {
    return this._info!;
  }

  /** The engine process's id, while one runs. */
  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Whether a generation is in progress. */
  get busy(): boolean {
    return this.pending !== null;
  }

  private ensureChild(): Promise<ChildProcess> {
    if (this.child) return Promise.resolve(this.child);
    this.starting ??= this.spawn().finally(() => (this.starting = null));
    return this.starting;
  }

  private async spawn(): Promise<ChildProcess> {
    const nice = this.o.nice ?? engineNice();
    return new Promise((resolve, reject) => {
      const child = fork(CHILD, [], { execArgv: ['--import', TSX_LOADER], env: engineProcessEnv(), serialization: 'advanced', stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
      this.starts++;
      if (nice && child.pid) {
        try {
          // its compute threads are created later by its main thread and inherit this
          os.setPriority(child.pid, Math.min(19, os.getPriority() + nice));
        } catch (e) {
          this.o.log?.warn({ err: e }, 'cannot lower the engine process priority');
        }
      }
      const opening = (m: FromEngine) => {
        if (m.type === 'ready') {
          done();
          this._info = m.info;
          this.child = child;
          child.on('message', (x: FromEngine) => this.onMessage(x));
          child.once('exit', (code, signal) => this.onExit(child, code, signal));
          this.holdOpen(this.pending !== null);
          resolve(child);
        } else if (m.type === 'open-failed') {
          done();
          child.kill('SIGKILL');
          reject(deserializeError(m.error));
        }
      };
      const died = (code: number | null, signal: NodeJS.Signals | null) => {
        done();
        reject(new Error(`the engine process ${describeExit(code, signal)} while opening the model`));
      };
      const failed = (e: Error) => {
        done();
        reject(new Error(`cannot start the engine process: ${e.message}`));
      };
      const done = () => {
        child.off('message', opening);
        child.off('exit', died);
        child.off('error', failed);
      };
      child.on('message', opening);
      child.once('exit', died);
      child.once('error', failed);
      // a send to a child that died at once fails in 'error'/'exit', which reject already
      child.on('error', (e) => this.o.log?.warn({ err: e }, 'engine process channel error'));
      this.post(child, { type: 'open', options: this.options, handoverDir: this.handoverDir });
    });
  }

  private post(child: ChildProcess, m: ToEngine): void {
    if (child.connected) child.send(m, (e) => e && this.o.log?.warn({ err: e, type: m.type }, 'cannot reach the engine process'));
  }

  private onMessage(m: FromEngine): void {
    const p = this.pending;
    if (!p || !('id' in m) || m.id !== p.id) return;
    if (m.type === 'progress') p.opts.onProgress?.(m.event);
    else if (m.type === 'result') this.settle(p, () => void this.takeOver(m.result).then(p.resolve, p.reject));
    else if (m.type === 'error') {
      const signal = p.opts.signal;
      // a cancelled generation rejects with the caller's own reason, as the in-process pipeline does
      this.settle(p, () => p.reject(signal?.aborted ? (signal.reason as Error) : deserializeError(m.error)));
    }
  }

  private onExit(child: ChildProcess, code: number | null, signal: NodeJS.Signals | null): void {
    if (this.child !== child) return;
    this.child = null;
    const p = this.pending;
    if (p) this.dropHandedOver(p.id); // what a dying engine had written of its images
    if (this.closing) {
      if (p) this.settle(p, () => p.reject(new Error('the engine was closed during the run')));
      return;
    }
    this.crashes++;
    const what = `the engine process (pid ${child.pid}) ${describeExit(code, signal)}`;
    this.o.log?.error({ code, signal, run: p !== null }, `${what}; starting a fresh one`);
    if (p) this.settle(p, () => p.reject(p.opts.signal?.aborted ? (p.opts.signal.reason as Error) : new EngineCrashed(`${what} during the run`)));
    // the next run (this one's retry, often) should not wait for the process start and model open
    void this.ensureChild().catch((e) => this.o.log?.error({ err: e }, 'the engine process could not be restarted; the next run tries again'));
  }

  /** The result with its images' bytes read from the hand-over folder (on libuv's threads, not this event loop) and their files removed. */
  private async takeOver(r: HandedOverResult): Promise<GenerateResult> {
    const images = await Promise.all(r.images.map(async ({ name, ...image }) => {
      const file = path.join(this.handoverDir, path.basename(name));
      try {
        const bytes = await fs.promises.readFile(file);
        return { ...image, data: new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength) };
      } finally {
        await fs.promises.rm(file, { force: true });
      }
    }));
    return { ...r, images };
  }

  private dropHandedOver(id: number): void {
    for (const name of fs.readdirSync(this.handoverDir)) if (name.startsWith(`${id}-`)) fs.rmSync(path.join(this.handoverDir, name), { force: true });
  }

  private settle(p: Pending, fn: () => void): void {
    if (this.pending !== p) return;
    this.pending = null;
    this.holdOpen(false);
    fn();
  }

  /**
   * An idle engine does not keep this process alive (a CLI that fails after starting it still exits, and the child
   * follows when its channel closes); a pending generation does, as an in-process one would.
   */
  private holdOpen(hold: boolean): void {
    const child = this.child;
    if (!child) return;
    if (hold) {
      child.ref();
      child.channel?.ref();
    } else {
      child.unref();
      child.channel?.unref();
    }
  }

  async generate(req: GenerateRequest, opts: GenerateOptions = {}): Promise<GenerateResult> {
    if (this.closing) throw new Error('the engine is closed');
    if (this.pending) throw new Error('this engine is already generating; run requests one after another');
    opts.signal?.throwIfAborted();
    const id = this.nextId++;
    let p!: Pending;
    const done = new Promise<GenerateResult>((resolve, reject) => (p = { id, resolve, reject, opts }));
    this.pending = p;
    this.holdOpen(true);
    const onAbort = () => {
      if (this.child) this.post(this.child, { type: 'cancel', id });
    };
    try {
      const child = await this.ensureChild();
      if (opts.signal?.aborted) this.settle(p, () => p.reject(opts.signal!.reason as Error));
      else {
        opts.signal?.addEventListener('abort', onAbort, { once: true });
        this.post(child, { type: 'generate', id, req });
      }
    } catch (e) {
      this.settle(p, () => p.reject(e as Error));
    }
    try {
      return await done;
    } finally {
      opts.signal?.removeEventListener('abort', onAbort);
    }
  }

  /** Lets the engine release its model and exit; kills it after `closeMs` (default 10 s). */
  async close(): Promise<void> {
    this.closing = true;
    await this.starting?.catch(() => undefined);
    const child = this.child;
    if (child) {
      this.holdOpen(true);
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      const timer = setTimeout(() => child.kill('SIGKILL'), this.o.closeMs ?? 10_000);
      this.post(child, { type: 'close' });
      await exited;
      clearTimeout(timer);
    }
    fs.rmSync(this.handoverDir, { recursive: true, force: true });
  }
}

/**
 * The pipelines `klein serve` and `klein worker` generate with: `count` engine processes (each loads its own copy
 * of the model), or with `inProcess` KleinPipelines on this event loop (debugging: requests then wait while the
 * engine computes). Rejects with the engine's own error (ModelFolderError for a bad model folder).
 */
export async function openEngines(options: EngineOptions, count: number, o: EngineHostOptions & { inProcess?: boolean } = {}): Promise<{ members: ImagePipeline[]; info: EngineInfo }> {
  const members: ImagePipeline[] = [];
  try {
    if (o.inProcess) {
      const { KleinPipeline } = await import('../pipeline/pipeline.ts');
      let info: EngineInfo | undefined;
      for (let i = 0; i < count; i++) {
        const p = await KleinPipeline.open(options);
        members.push(p);
        info ??= engineInfo(p);
      }
      return { members, info: info! };
    }
    for (let i = 0; i < count; i++) members.push(await EngineHost.start(options, o));
    return { members, info: (members[0] as EngineHost).info };
  } catch (e) {
    await Promise.all(members.map((m) => m.close().catch(() => undefined)));
    throw e;
  }
}
