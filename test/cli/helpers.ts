// Running the real `klein` CLI in a child process (asynchronously, so an HTTP server in the test process can
// answer it) and small fixtures shared by the CLI tests.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..', '..');
export const KLEIN = path.join(ROOT, 'bin', 'klein.js');

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

export function runKlein(args: string[], env: Record<string, string | undefined> = {}, timeoutMs = 600_000): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [KLEIN, ...args], { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

export function tmpDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `klein-${prefix}-`));
}

export interface ServeProcess {
  proc: ChildProcess;
  /** `http://127.0.0.1:PORT` from the "listening on" line. */
  url: string;
  /** Everything it printed so far (stdout and stderr). */
  out: () => string;
  /** Its stdout lines up to and including the start (the admin key, on a first start, is the last). */
  lines: string[];
}

/**
 * Starts `klein serve ARGS` (add `--port 0`), or `command ARGS`, and resolves once it listens — and, on a first start, once it has
 * printed the admin key that follows the listening line. The process is pushed to `track` for the caller's cleanup.
 */
export function startServe(args: string[], opts: { env?: Record<string, string | undefined>; track?: ChildProcess[]; timeoutMs?: number; command?: string[] } = {}): Promise<ServeProcess> {
  return new Promise((resolve, reject) => {
    // `command` runs klein serve another way (`npm start --`); ARGS follow it
    const [cmd, ...pre] = opts.command ?? [process.execPath, KLEIN, 'serve'];
    // a wrapper (npm) gets a process group of its own: stopProcess signals the whole group, klein serve included
    const proc = spawn(cmd, [...pre, ...args], { cwd: ROOT, env: { ...process.env, KLEIN_LOG_LEVEL: 'silent', ...opts.env }, detached: opts.command !== undefined });
    if (opts.command) groupLeaders.add(proc);
    opts.track?.push(proc);
    let out = '';
    let stdout = '';
    const timer = setTimeout(() => reject(new Error(`klein serve did not start: ${out}`)), opts.timeoutMs ?? 60_000);
    proc.stderr!.on('data', (d) => (out += d));
    proc.stdout!.on('data', (d) => {
      out += d;
      stdout += d;
      const m = stdout.match(/listening on (http:\/\/\S+)/);
      if (m && (!/first start/.test(stdout) || /first start.*\n(kl_live_\S+)\n/.test(stdout))) {
        clearTimeout(timer);
        resolve({ proc, url: m[1], out: () => out, lines: stdout.trim().split('\n') });
      }
    });
    proc.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`klein serve exited ${code}: ${out}`));
    });
  });
}

/** Processes started in a group of their own (startServe's `command`): stopped group and all. */
const groupLeaders = new WeakSet<ChildProcess>();

/** SIGTERM; resolves with the exit code once the process has exited. */
export function stopProcess(proc: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    if (proc.exitCode !== null || proc.signalCode !== null) return resolve(proc.exitCode);
    proc.once('exit', (code) => resolve(code));
    if (groupLeaders.has(proc) && proc.pid !== undefined) process.kill(-proc.pid, 'SIGTERM');
    else proc.kill('SIGTERM');
  });
}

/**
 * Each command that opens a pipeline, with what it needs to get as far as its option checks: `model` a model
 * folder, `dir` a scratch folder holding `ref.png` (edit's input image).
 */
export function pipelineCommands(model: string, dir: string): Array<{ name: string; args: string[] }> {
  const out = path.join(dir, 'never.png');
  return [
    { name: 'generate', args: ['generate', 'a fox', '-m', model, '--size', '64x64', '-o', out] },
    { name: 'edit', args: ['edit', 'a fox', '-i', path.join(dir, 'ref.png'), '-m', model, '--size', '64x64', '-o', out] },
    { name: 'serve', args: ['serve', '-m', model, '--port', '0', '--data', path.join(dir, 'serve-data')] },
    { name: 'worker', args: ['worker', '-m', model, '--queue', 'redis://127.0.0.1:1', '--api', 'http://127.0.0.1:1'] },
    { name: 'mcp', args: ['mcp', '-m', model, '--data', path.join(dir, 'mcp-data')] },
  ];
}
