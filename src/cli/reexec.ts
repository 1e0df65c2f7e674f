// One-shot commands that run the engine in this process (generate, edit, bench) start it again, once, with glibc's
// malloc tunables in its environment (runtime/malloc-env.ts): glibc reads them only at start. `klein serve` and
// `klein worker` are not re-executed (a supervisor's SIGKILL must end the server itself); their engine child
// processes get the tunables when they are forked.
import { spawn } from 'node:child_process';
import process from 'node:process';
import { engineProcessEnv, hasEngineTunables } from '../runtime/malloc-env.ts';

const ENGINE_COMMANDS = new Set(['generate', 'edit', 'bench']);

/**
 * Starts this command again with the tunables when it runs the engine and they are missing; returns true then (the
 * caller does nothing more: the child's exit code or signal becomes this process's).
 */
export function reexecWithMallocTunables(argv: readonly string[]): boolean {
  if (!ENGINE_COMMANDS.has(argv[2] ?? '') || hasEngineTunables()) return false;
  const child = spawn(process.execPath, [...process.execArgv, ...argv.slice(1)], { stdio: 'inherit', env: engineProcessEnv() });
  // a terminal's Ctrl-C reaches the child directly (same process group); TERM and HUP are sent to this process alone
  process.on('SIGINT', () => {});
  for (const sig of ['SIGTERM', 'SIGHUP'] as const) process.on(sig, () => child.kill(sig));
  child.on('error', (e) => {
    console.error(`klein: cannot start the engine process: ${e.message}`);
    process.exit(70);
  });
  child.on('exit', (code, signal) => {
    if (!signal) process.exit(code ?? 1);
    process.removeAllListeners(signal);
    process.kill(process.pid, signal);
  });
  return true;
}
