// `klein serve`: the runs API on one machine — SQLite and files in a data folder, the pipeline in engine processes
// beside this one (engine-host.ts), so the API answers while the engine computes.
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { ModelFolderError } from '../weights/model-folder.ts';
import { createApp, type Service } from '../service/app.ts';
import { mattingProbe } from '../service/background.ts';
import { EngineHost, openEngines } from '../service/engine-host.ts';
import { PipelinePool } from '../service/pool.ts';
import { ensureAdminKey } from '../service/auth.ts';
import { defaultDataDir, loadConfig, type ServiceConfig } from '../service/config.ts';
import { createLogger } from '../service/logger.ts';
import { addModelPull } from './auto-pull.ts';
import { UsageError } from './errors.ts';
import { parseIntOption } from './option-parsers.ts';
import { DEVICE_HELP, GPU_DTYPE_HELP, MEMORY_LIMIT_HELP, CPU_DEFAULT_PRECISION, IMAGE_PRECISION_HELP, defaultPrecisionNote, describeTarget, memoryLimitFromFlag, targetFromFlags } from './target-options.ts';
import { startScale } from './worker.ts';

/** Scaled out: how long a stop may take beyond the remote runs' drain before the process exits anyway. */
const STOP_GRACE_MS = 10_000;

interface ServeOptions {
  model?: string;
  data?: string;
  port?: string;
  host: string;
  publicUrl?: string;
  device?: string;
  threads?: string;
  keepLoaded: boolean;
  workers: string;
  queue?: string;
  precision?: string;
  gpuDtype?: string;
  memoryLimit?: string;
  mattingModel?: string;
  loraDir?: string;
  inProcess?: boolean;
}

export function parsePort(v: string | undefined, name: string): number | undefined {
  const n = parseIntOption(v, name);
  if (n !== undefined && n > 65535) throw new UsageError(`${name} must be 0–65535, got ${n}`);
  return n;
}

/**
 * What a stop does to the runs, as the stop line says it (see Service.close): alone, running runs are cut and wait
 * in the queue for the next start; scaled out, runs on workers first get the drain time to finish.
 */
export function stopPlan(drainMs: number | undefined, localWorkers: number): string {
  if (drainMs === undefined) return 'running runs stop and go back to the queue for the next start';
  const local = localWorkers > 0 ? 'local workers finish their current run, ' : '';
  return `${local}runs on remote workers get up to ${Math.round(drainMs / 1000)} s to finish, the rest go back to the queue for the next start`;
}

export function registerServe(program: Command): void {
  program
    .command('serve')
    .description('run the HTTP API (Runflow-compatible runs, callbacks, keys, usage) with the model in an engine process beside it')
    .option('-m, --model <folder|repo>', 'model folder or Hub repo id (default: $KLEIN_MODEL_DIR, $KLEIN_MODEL or the pulled klein 4B)')
    .option('--data <dir>', 'data folder: database, output images, config.json (default: $KLEIN_DATA_DIR or ~/.klein)')
    .option('-p, --port <n>', 'port (default: $PORT or 8080; 0 picks a free one)')
    .option('--host <addr>', 'address to listen on (0.0.0.0 for every interface)', '127.0.0.1')
    .option('--public-url <url>', 'origin used in file URLs and callbacks (default: the listening address)')
    .option('--device <device>', DEVICE_HELP)
    .option('--threads <n>', 'CPU threads (default: all cores)')
    .option('--workers <n>', 'generations at once; each loads its own copy of the model (with --queue: local workers, 0 for none)', '1')
    .option('--queue <redis-url>', 'scale out: runs go through this Redis (BullMQ) to `klein worker` processes; needs $KLEIN_WORKER_TOKEN')
    .option('--no-keep-loaded', 'load model components per stage instead of keeping them resident when they fit (less memory, slower)')
    .option('--matting-model <folder>', 'BiRefNet weights for transparent backgrounds (default: $KLEIN_MATTING_MODEL, the model folder\'s matting/, or `klein pull --matting`)')
    .option('--precision <mode>', IMAGE_PRECISION_HELP)
    .option('--gpu-dtype <dtype>', GPU_DTYPE_HELP)
    .option('--memory-limit <size>', MEMORY_LIMIT_HELP)
    .option('--lora-dir <folder>', 'LoRA files requests may name by a relative path (default: config.json loras.dir or $KLEIN_LORA_DIR; URLs and Hub references need none)')
    .option('--in-process', 'run the engine on the API\'s own event loop instead of a child process (debugging: requests wait while it computes)')
    .action((o: ServeOptions) => runServe(o));
  addModelPull(program.commands.find((c) => c.name() === 'serve')!); // a missing model is pulled first (auto-pull.ts)
}

async function runServe(o: ServeOptions): Promise<void> {
  const dataDir = path.resolve(o.data ?? defaultDataDir());
  const port = parsePort(o.port ?? process.env.PORT, o.port !== undefined ? '--port' : 'PORT') ?? 8080;
  const memoryLimit = memoryLimitFromFlag(o.memoryLimit);
  const workers = parseIntOption(o.workers, '--workers')!;
  if (workers < (o.queue ? 0 : 1) || workers > 16) throw new UsageError(`--workers must be 1–16, got ${workers}`);
  const config = serviceConfigFromFlags(o, dataDir);
  const target = await targetFromFlags(o, { cpuPrecision: CPU_DEFAULT_PRECISION });
  const { device, precision } = target;
  const gpuDtype = device === 'cpu' ? undefined : target.gpuDtype;
  const modelSpec = o.model ?? process.env.KLEIN_MODEL_DIR;
  const log = createLogger();
  let engines;
  try {
    engines = await openEngines({ model: modelSpec, target, keepLoaded: o.keepLoaded ? 'auto' : false, memoryLimit, mattingModel: o.mattingModel }, Math.max(1, workers), { log: log.child({ part: 'engine' }), inProcess: o.inProcess });
  } catch (e) {
    if (e instanceof ModelFolderError) throw new UsageError(e.message);
    throw e;
  }
  const { members, info } = engines;
  const local = members.length === 1 ? members[0] : new PipelinePool(members);
  // with a queue, the scheduler hands runs to Redis as fast as keys' concurrency allows: the workers pace them
  const scale = o.queue ? startScale(o.queue, info.variant.id, log, precision, gpuDtype) : null;
  const pipeline = scale ? scale.remote : local;
  config.workers = scale ? 256 : workers;
  config.precision = precision;
  config.variant = info.variant.id;
  if (gpuDtype) config.gpuDtype = gpuDtype;
  // transparent requests are checked against the matting weights at creation; scaled out, the API cannot see the
  // workers' files, so a worker without them fails the run instead
  const matting = scale ? undefined : mattingProbe({ explicit: o.mattingModel, modelRoot: info.modelRoot });
  const engineHosts = members.filter((m): m is EngineHost => m instanceof EngineHost);
  const svc = createApp({ pipeline, config, logger: log, modelDir: info.modelRoot, engines: engineHosts, ...(scale ? { scale: scale.api } : {}), ...(matting ? { matting } : {}) });
  const admin = ensureAdminKey(svc.store);
  const listening = await listenOrUsageError(svc, port, o.host);
  const localWorkers = scale ? await scale.startLocal(listening.url, local, workers, String(device)) : [];
  console.log(`klein serve: ${info.variant.id} (${precision} precision${defaultPrecisionNote(o, target)}) on ${describeTarget(target)} from ${info.modelRoot} (${workers} ${scale ? 'local queue ' : ''}worker${workers !== 1 ? 's' : ''}), data in ${dataDir}`);
  if (scale) console.log(`klein serve: queue ${o.queue} (workers: klein worker --queue ${o.queue} --api ${listening.url} --model DIR)`);
  // the stop handlers first: writes to a pipe are synchronous, so whoever reads the listening line may signal at once
  const stopped = stopSignal(() => console.log(`klein serve: stopping (${stopPlan(scale?.api.drainMs, localWorkers.length)})`));
  // one write: a reader that acts on the listening line (tests, scripts) then has the first start's key with it
  const firstStart = admin ? `\nklein serve: first start: an admin API key was created. It is shown only this once; keep it safe:\n${admin.key}` : '';
  console.log(`klein serve: listening on ${listening.url} (docs: ${listening.url}/docs)${firstStart}`);
  await stopped;
  if (scale) exitIfTheStopHangs(scale.api.drainMs, o.queue!);
  // local queue workers finish their current run; then the API drains the remote runs (scaled out) and puts what
  // is still running back in the queue
  await Promise.all(localWorkers.map((w) => w.stop()));
  await svc.close();
  await pipeline.close();
  if (scale) await local.close();
}

/** The data folder (made if missing) and its config.json with --public-url over it; a bad value is a UsageError. */
export function loadServiceConfig(dataDir: string, publicUrl: string | undefined): ServiceConfig {
  if (publicUrl && !/^https?:\/\/[^/]+$/.test(publicUrl.replace(/\/$/, ''))) throw new UsageError(`--public-url must be an origin like https://images.example.com, got "${publicUrl}"`);
  fs.mkdirSync(dataDir, { recursive: true });
  try {
    return loadConfig(dataDir, publicUrl ? { publicUrl: publicUrl.replace(/\/$/, '') } : {});
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

/** The data folder's config.json with the flags' --public-url and --lora-dir over it (a bad value: UsageError). */
function serviceConfigFromFlags(o: ServeOptions, dataDir: string): ServiceConfig {
  const config = loadServiceConfig(dataDir, o.publicUrl);
  if (o.loraDir) config.loras.dir = o.loraDir;
  if (config.loras.dir) {
    config.loras.dir = path.resolve(config.loras.dir);
    if (!fs.existsSync(config.loras.dir) || !fs.statSync(config.loras.dir).isDirectory()) throw new UsageError(`the LoRA folder ${config.loras.dir} does not exist`);
  }
  return config;
}

/** Listens; an address the user can change (in use, not allowed, not here) is a UsageError, after closing the service. */
async function listenOrUsageError(svc: Service, port: number, host: string): Promise<{ port: number; url: string }> {
  try {
    return await svc.listen(port, host);
  } catch (e) {
    await svc.close();
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EADDRINUSE' || code === 'EACCES' || code === 'EADDRNOTAVAIL') throw new UsageError(`cannot listen on ${host}:${port}: ${code}`);
    throw e;
  }
}

/** Resolves at the first SIGINT or SIGTERM, after `onStop`. */
function stopSignal(onStop: () => void): Promise<void> {
  return new Promise<void>((resolve) => {
    const stop = () => {
      onStop();
      resolve();
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
}

/**
 * Scaled out, every step of the stop talks to Redis, and BullMQ waits for an unreachable Redis forever (its commands
 * queue up while ioredis reconnects; QueueEvents.close() never resolves): a stop with Redis down hung for good. So the
 * stop gets the drain's time plus a grace, then the process exits with what it has; runs left `running` in SQLite
 * are recovered at the next start, as after a kill.
 */
function exitIfTheStopHangs(drainMs: number, queueUrl: string): void {
  const limitS = Math.round((drainMs + STOP_GRACE_MS) / 1000);
  setTimeout(() => {
    console.error(`klein serve: the stop did not finish in ${limitS} s (is Redis at ${queueUrl} reachable?); exiting, unfinished runs are recovered at the next start`);
    process.exit(1);
  }, drainMs + STOP_GRACE_MS).unref();
}
