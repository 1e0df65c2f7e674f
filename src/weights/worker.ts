// Runs a TypeScript module in a worker thread (multi-GB weight conversion must never block the event loop that
// serves HTTP). The module reads `workerData.data` and talks through `parentPort`.
import { Worker } from 'node:worker_threads';

/** Starts `module` (a file URL of a .ts file) in a worker thread with `data` as its `workerData.data`. */
export function startWorker(module: URL, data: unknown): Worker {
  return new Worker(new URL('./worker-bootstrap.mjs', import.meta.url), { workerData: { module: module.href, data } });
}
