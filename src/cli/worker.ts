// `klein worker`: a scale-out worker on another host (or beside the API), and the API side of `klein serve --queue`.
import type { Command } from 'commander';
import type { Logger } from 'pino';
import type { ImagePipeline } from '../pipeline/types.ts';
import { openEngines } from '../service/engine-host.ts';
import { createLogger } from '../service/logger.ts';
import { ScaleApi } from '../service/scale/api.ts';
import { parseRedisUrl } from '../service/scale/redis.ts';
import { RemotePipeline } from '../service/scale/remote-pipeline.ts';
import { KleinWorker } from '../service/scale/worker.ts';
import { ModelFolderError } from '../weights/model-folder.ts';
import { UsageError } from './errors.ts';
import { parseIntOption } from './option-parsers.ts';
import { DEVICE_HELP, GPU_DTYPE_HELP, MEMORY_LIMIT_HELP, CPU_DEFAULT_PRECISION, IMAGE_PRECISION_HELP, defaultPrecisionNote, describeTarget, memoryLimitFromFlag, targetFromFlags } from './target-options.ts';
import type { GpuDtype, Precision } from '../runtime/target.ts';

function workerToken(): string {
  const t = process.env.KLEIN_WORKER_TOKEN;
  if (!t) throw new UsageError('set KLEIN_WORKER_TOKEN (the same secret on the API and every worker, 16+ characters; e.g. `openssl rand -hex 24`)');
  if (t.length < 16) throw new UsageError('KLEIN_WORKER_TOKEN must be at least 16 characters');
  return t;
}

function checkQueueUrl(url: string): void {
  try {
    parseRedisUrl(url);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

/** For `klein serve --queue`: the Redis-backed pipeline, its routes, and optional in-process workers. */
export function startScale(queueUrl: string, modelId: string, log: Logger, precision: Precision = 'exact', gpuDtype?: GpuDtype) {
  checkQueueUrl(queueUrl);
  const token = workerToken();
  const remote = new RemotePipeline(queueUrl, modelId, log.child({ part: 'scale' }));
  const api = new ScaleApi(remote, token);
  return {
    remote, api,
    async startLocal(apiUrl: string, pipeline: ImagePipeline, n: number, device: string): Promise<KleinWorker[]> {
      const workers: KleinWorker[] = [];
      // one pipeline runs one request at a time: local workers share it through the pool's waiting line
      for (let i = 0; i < n; i++) {
        const w = new KleinWorker({ queueUrl, apiUrl, token, pipeline, modelId, device, precision, gpuDtype, log: log.child({ part: 'local-worker', i }) });
        await w.start();
        workers.push(w);
      }
      return workers;
    },
  };
}

interface WorkerCliOptions {
  queue: string;
  api: string;
  model?: string;
  device?: string;
  threads?: string;
  keepLoaded: boolean;
  lockMs: string;
  precision?: string;
  gpuDtype?: string;
  memoryLimit?: string;
  mattingModel?: string;
  inProcess?: boolean;
}

export function registerWorker(program: Command): void {
  program
    .command('worker')
    .description('take runs from a Redis queue shared with `klein serve --queue`, and upload the images to that API')
    .requiredOption('--queue <redis-url>', 'the Redis the API uses, e.g. redis://10.0.0.5:6379')
    .requiredOption('--api <url>', 'the API this worker reports to, e.g. http://10.0.0.5:8080')
    .option('-m, --model <folder|repo>', 'model folder (default: $KLEIN_MODEL_DIR, $KLEIN_MODEL or the pulled klein 4B)')
    .option('--device <device>', DEVICE_HELP)
    .option('--threads <n>', 'CPU threads (default: all cores)')
    .option('--lock-ms <n>', 'job lock; a worker silent this long is presumed dead and its run goes to another', '30000')
    .option('--no-keep-loaded', 'load model components per stage (less memory, slower)')
    .option('--precision <mode>', IMAGE_PRECISION_HELP)
    .option('--gpu-dtype <dtype>', GPU_DTYPE_HELP)
    .option('--memory-limit <size>', MEMORY_LIMIT_HELP)
    .option('--matting-model <folder>', 'BiRefNet weights for transparent backgrounds (default: $KLEIN_MATTING_MODEL, the model folder\'s matting/, or `klein pull --matting`)')
    .option('--in-process', 'run the engine on this process\'s event loop instead of a child process (debugging: the heartbeat to Redis waits while it computes)')
    .action(async (o: WorkerCliOptions) => {
      checkQueueUrl(o.queue);
      const token = workerToken();
      if (!/^https?:\/\/[^/]+\/?$/.test(o.api)) throw new UsageError(`--api must be an origin like http://10.0.0.5:8080, got "${o.api}"`);
      const lockMs = parseIntOption(o.lockMs, '--lock-ms')!;
      if (lockMs < 1000) throw new UsageError('--lock-ms must be at least 1000');
      const memoryLimit = memoryLimitFromFlag(o.memoryLimit);
      const target = await targetFromFlags(o, { cpuPrecision: CPU_DEFAULT_PRECISION });
      const { device, precision } = target;
      const gpuDtype = device === 'cpu' ? undefined : target.gpuDtype;
      const log = createLogger();
      let engines;
      try {
        // the engine computes in its own process: BullMQ's lock renewal and the announcements keep their rhythm
        engines = await openEngines({ model: o.model ?? process.env.KLEIN_MODEL_DIR, target, keepLoaded: o.keepLoaded ? 'auto' : false, memoryLimit, mattingModel: o.mattingModel }, 1, { log: log.child({ part: 'engine' }), inProcess: o.inProcess });
      } catch (e) {
        if (e instanceof ModelFolderError) throw new UsageError(e.message);
        throw e;
      }
      const pipeline = engines.members[0];
      const modelId = engines.info.variant.id;
      const worker = new KleinWorker({ queueUrl: o.queue, apiUrl: o.api.replace(/\/$/, ''), token, pipeline, modelId, device: String(device), precision, gpuDtype, log, lockMs });
      try {
        await worker.start();
      } catch (e) {
        await pipeline.close();
        throw new UsageError(`cannot join ${o.api}: ${(e as Error).message}`);
      }
      // the stop handlers before the ready line: whoever reads it may signal at once (pipe writes are synchronous)
      const stopped = new Promise<void>((resolve) => {
        process.once('SIGINT', resolve);
        process.once('SIGTERM', resolve);
      });
      console.log(`klein worker ${worker.id}: ${modelId} on ${describeTarget(target)} (${precision} precision${defaultPrecisionNote(o, target)}), queue ${o.queue}, reporting to ${o.api}`);
      await stopped;
      console.log('klein worker: stopping after the current run (signal again to hand it back now)');
      const again = () => {
        console.log('klein worker: handing the current run back');
        void worker.stop(true).then(() => process.exit(0));
      };
      process.once('SIGINT', again);
      process.once('SIGTERM', again);
      await worker.stop();
      await pipeline.close();
      console.log('klein worker: stopped');
    });
}
