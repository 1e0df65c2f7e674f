// glibc's malloc settings for a process that runs the engine. ONNX Runtime allocates its packed int8 weights and
// its activations as GB-sized heap buffers: in transparent huge pages they fault in 2 MiB at a time instead of
// 4 KiB (fast mode's transformer opens in 10 s instead of 19 s), and from 1 MiB up each buffer is a mapping of its own
// that goes back to the kernel when freed (a released component no longer leaves ~2 GiB in malloc's heap).
// glibc reads these only when a process starts, so they go into the environment of the processes klein starts.
import process from 'node:process';

/** `GLIBC_TUNABLES` entries: huge pages by madvise (glibc ≥ 2.35), and a fixed mmap threshold of 1 MiB. */
export const ENGINE_MALLOC_TUNABLES: Readonly<Record<string, string>> = { 'glibc.malloc.hugetlb': '1', 'glibc.malloc.mmap_threshold': '1048576' };

let glibc: [number, number] | null | undefined;

/** glibc's version on this process, e.g. [2, 36]; null on other C libraries and systems (read once: a report is slow). */
function glibcVersion(): [number, number] | null {
  if (glibc === undefined) {
    const header = (process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined)?.header;
    const m = /^(\d+)\.(\d+)/.exec(header?.glibcVersionRuntime ?? '');
    glibc = m ? [Number(m[1]), Number(m[2])] : null;
  }
  return glibc;
}

/** Whether the tunables apply here: Linux with glibc 2.35 or later, and not turned off by `KLEIN_MALLOC_TUNABLES=0`. */
export function mallocTunablesApply(env: NodeJS.ProcessEnv = process.env): boolean {
  if (process.platform !== 'linux' || env.KLEIN_MALLOC_TUNABLES === '0') return false;
  const v = glibcVersion();
  return v !== null && (v[0] > 2 || (v[0] === 2 && v[1] >= 35));
}

/** The entries of `env.GLIBC_TUNABLES` (`key=value:key=value`), in order. */
function tunables(env: NodeJS.ProcessEnv): Map<string, string> {
  const entries = new Map<string, string>();
  for (const item of (env.GLIBC_TUNABLES ?? '').split(':').filter(Boolean)) {
    const [key, ...value] = item.split('=');
    entries.set(key, value.join('='));
  }
  return entries;
}

/** `env` with the engine's tunables added to its `GLIBC_TUNABLES` (the user's own entries win). */
export function engineProcessEnv(env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  if (!mallocTunablesApply(env)) return env;
  const entries = new Map([...Object.entries(ENGINE_MALLOC_TUNABLES), ...tunables(env)]);
  return { ...env, GLIBC_TUNABLES: [...entries].map(([k, v]) => `${k}=${v}`).join(':') };
}

/** True when this process started with the engine's tunables in force (or they do not apply here). */
export function hasEngineTunables(env: NodeJS.ProcessEnv = process.env): boolean {
  const set = tunables(env);
  return !mallocTunablesApply(env) || Object.keys(ENGINE_MALLOC_TUNABLES).every((k) => set.has(k));
}
