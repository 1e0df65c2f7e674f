// Worker threads cannot load a .ts entry directly: this bootstrap registers tsx in the worker, then imports it.
import { workerData } from 'node:worker_threads';
import { register } from 'tsx/esm/api';

register();
await import(workerData.module);
