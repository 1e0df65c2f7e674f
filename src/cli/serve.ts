// `klein serve`: the runs API on one machine — SQLite and files in a data folder, the pipeline in engine processes
// beside this one (engine-host.ts), so the API answers while the engine computes.
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { resolveDevice } from '../graph/device.ts';
import { ModelFolderError } from '../weights/model-folder.ts';
import { createApp } from '../service/app.ts';
import { mattingProbe } from '../service/background.ts';
import { EngineHost, openEngines } from '../service/engine-host.ts';
import { PipelinePool } from '../service/pool.ts';
import { ensureAdminKey } from '../service/auth.ts';
import { defaultDataDir, loadConfig } from '../service/config.ts';
import { createLogger } from '../service/logger.ts';
import { DEVICE_HELP, requestedDevice } from './device-option.ts';
import { addModelPull } from './auto-pull.ts';
import { UsageError } from './errors.ts';
import { parseIntOption } from './generate.ts';
import { GPU_DTYPE_HELP, describeDevice, parseGpuDtypeFlag, resolveGpuDtype } from './gpu-dtype.ts';
import { PRECISION_HELP, refuseFastOnGpu, resolvePrecision } from './precision.ts';
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
  mattingModel?: string;
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
    .option('--no-keep-loaded', 'load model components per stage instead of keeping them resident (less memory, slower)')
    .option('--matting-model <folder>', 'BiRefNet weights for transparent backgrounds (default: $KLEIN_MATTING_MODEL, the model folder\'s matting/, or `klein pull --matting`)')
    .option('--precision <mode>', PRECISION_HELP)
    .option('--gpu-dtype <dtype>', GPU_DTYPE_HELP)
    .option('--in-process', 'run the engine on the API\'s own event loop instead of a child process (debugging: requests wait while it computes)')
    .action(async (o: ServeOptions) => {
      const dataDir = path.resolve(o.data ?? defaultDataDir());
      const port = parsePort(o.port ?? process.env.PORT, o.port !== undefined ? '--port' : 'PORT') ?? 8080;
      const precision = resolvePrecision(o.precision);
      parseGpuDtypeFlag(o.gpuDtype); // an unknown dtype fails before a GPU is probed
      const deviceReq = requestedDevice(o.device);
      refuseFastOnGpu(precision, deviceReq, o);
      const threads = parseIntOption(o.threads, '--threads');
      if (threads === 0) throw new UsageError('--threads must be at least 1');
      const workers = parseIntOption(o.workers, '--workers')!;
      if (workers < (o.queue ? 0 : 1) || workers > 16) throw new UsageError(`--workers must be 1–16, got ${workers}`);
      if (o.publicUrl && !/^https?:\/\/[^/]+$/.test(o.publicUrl.replace(/\/$/, ''))) throw new UsageError(`--public-url must be an origin like https://images.example.com, got "${o.publicUrl}"`);
      fs.mkdirSync(dataDir, { recursive: true });
      let config;
      try {
        config = loadConfig(dataDir, o.publicUrl ? { publicUrl: o.publicUrl.replace(/\/$/, '') } : {});
      } catch (e) {
        throw new UsageError((e as Error).message);
      }
      const device = await resolveDevice(deviceReq);
      refuseFastOnGpu(precision, device, o);
      const gpuDtype = resolveGpuDtype(o.gpuDtype, device);
      const modelSpec = o.model ?? process.env.KLEIN_MODEL_DIR;
      const log = createLogger();
      let engines;
      try {
        engines = await openEngines({ model: modelSpec, device, threads, keepLoaded: o.keepLoaded, precision, gpuDtype, mattingModel: o.mattingModel }, Math.max(1, workers), { log: log.child({ part: 'engine' }), inProcess: o.inProcess });
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
      let listening;
      try {
        listening = await svc.listen(port, o.host);
      } catch (e) {
        await svc.close();
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EADDRINUSE' || code === 'EACCES' || code === 'EADDRNOTAVAIL') throw new UsageError(`cannot listen on ${o.host}:${port}: ${code}`);
        throw e;
      }
      const localWorkers = scale ? await scale.startLocal(listening.url, local, workers, String(device)) : [];
      console.log(`klein serve: ${info.variant.id} (${precision} precision) on ${describeDevice(device, gpuDtype)} from ${info.modelRoot} (${workers} ${scale ? 'local queue ' : ''}worker${workers !== 1 ? 's' : ''}), data in ${dataDir}`);
      if (scale) console.log(`klein serve: queue ${o.queue} (workers: klein worker --queue ${o.queue} --api ${listening.url} --model DIR)`);
      console.log(`klein serve: listening on ${listening.url} (docs: ${listening.url}/docs)`);
      if (admin) {
        console.log('klein serve: first start: an admin API key was created. It is shown only this once; keep it safe:');
        console.log(admin.key);
      }
      await new Promise<void>((resolve) => {
        const stop = () => {
          console.log(`klein serve: stopping (${stopPlan(scale?.api.drainMs, localWorkers.length)})`);
          resolve();
        };
        process.once('SIGINT', stop);
        process.once('SIGTERM', stop);
      });
      // Scaled out, every step of the stop talks to Redis, and BullMQ waits for an unreachable Redis forever (its
      // commands queue up while ioredis reconnects; QueueEvents.close() never resolves): a stop with Redis down hung
      // for good. So the stop gets the drain's time plus a grace, then the process exits with what it has; runs left
      // `running` in SQLite are recovered at the next start, as after a kill.
      if (scale) {
        const limitS = Math.round((scale.api.drainMs + STOP_GRACE_MS) / 1000);
        setTimeout(() => {
          console.error(`klein serve: the stop did not finish in ${limitS} s (is Redis at ${o.queue} reachable?); exiting, unfinished runs are recovered at the next start`);
          process.exit(1);
        }, scale.api.drainMs + STOP_GRACE_MS).unref();
      }
      // local queue workers finish their current run; then the API drains the remote runs (scaled out) and puts what
      // is still running back in the queue
      await Promise.all(localWorkers.map((w) => w.stop()));
      await svc.close();
      await pipeline.close();
      if (scale) await local.close();
    });
  addModelPull(program.commands.find((c) => c.name() === 'serve')!); // a missing model is pulled first (auto-pull.ts)
}
