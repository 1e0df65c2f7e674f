// `klein mcp`: the MCP tools (generate_image, edit_image, get_run) over stdio for a local agent, with the model in
// this process. Runs go through the same service as `klein serve` (store, queue, pricing, files in the data folder);
// the service also listens on 127.0.0.1 so the image URLs in tool results can be opened.
import path from 'node:path';
import type { Command } from 'commander';
import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
import { KleinPipeline } from '../pipeline/pipeline.ts';
import { ModelFolderError } from '../weights/model-folder.ts';
import { createApp } from '../service/app.ts';
import { mattingProbe } from '../service/background.ts';
import { authenticate, createKey, RateLimiter } from '../service/auth.ts';
import { defaultDataDir } from '../service/config.ts';
import { ApiError } from '../service/errors.ts';
import { createLogger } from '../service/logger.ts';
import { createMcpServer } from '../service/mcp.ts';
import { type KeyRow, Store } from '../service/store.ts';
import { UsageError } from './errors.ts';
import { loadServiceConfig, parsePort } from './serve.ts';
import { DEVICE_HELP, GPU_DTYPE_HELP, MEMORY_LIMIT_HELP, CPU_DEFAULT_PRECISION, IMAGE_PRECISION_HELP, memoryLimitFromFlag, requestedDevice, requestedPrecision, refuseFastOnGpu, targetFromFlags } from './target-options.ts';

interface McpOptions {
  model?: string;
  data?: string;
  port?: string;
  publicUrl?: string;
  device?: string;
  threads?: string;
  keepLoaded: boolean;
  apiKey?: string;
  precision?: string;
  gpuDtype?: string;
  memoryLimit?: string;
  mattingModel?: string;
}

/** The key named for local stdio use; its secret is never needed (nothing authenticates over stdio). */
const LOCAL_KEY_NAME = 'klein mcp (stdio)';

/** The runs of this process belong to the given API key, else to the data folder's local stdio key. */
function stdioKey(store: Store, apiKey: string | undefined): KeyRow {
  if (apiKey) {
    try {
      return authenticate(store, `Bearer ${apiKey}`);
    } catch (e) {
      if (e instanceof ApiError) throw new UsageError(`--api-key / KLEIN_API_KEY: ${e.message}`);
      throw e;
    }
  }
  return store.listKeys().find((k) => k.name === LOCAL_KEY_NAME && !k.revoked_at) ?? createKey(store, { name: LOCAL_KEY_NAME }).row;
}

export function registerMcp(program: Command): void {
  program
    .command('mcp')
    .description('serve the MCP tools generate_image, edit_image and get_run over stdio (for a local agent); logs go to stderr')
    .option('-m, --model <folder|repo>', 'model folder or Hub repo id (default: $KLEIN_MODEL_DIR, $KLEIN_MODEL or the pulled klein 4B)')
    .option('--data <dir>', 'data folder (default: $KLEIN_DATA_DIR or ~/.klein); not one a running klein serve uses')
    .option('-p, --port <n>', 'loopback port that serves the image URLs (default 0: a free one)')
    .option('--public-url <url>', 'origin used in image URLs (default: the loopback address)')
    .option('--api-key <key>', 'bill runs to this API key of the data folder (default: $KLEIN_API_KEY, else a local "klein mcp (stdio)" key)')
    .option('--device <device>', DEVICE_HELP)
    .option('--threads <n>', 'CPU threads (default: all cores)')
    .option('--no-keep-loaded', 'load model components per stage instead of keeping them resident (less memory, slower)')
    .option('--matting-model <folder>', 'BiRefNet weights for transparent backgrounds (default: $KLEIN_MATTING_MODEL, the model folder\'s matting/, or `klein pull --matting`)')
    .option('--precision <mode>', IMAGE_PRECISION_HELP)
    .option('--gpu-dtype <dtype>', GPU_DTYPE_HELP)
    .option('--memory-limit <size>', MEMORY_LIMIT_HELP)
    .action(async (o: McpOptions) => {
      const dataDir = path.resolve(o.data ?? defaultDataDir());
      const port = parsePort(o.port, '--port') ?? 0;
      // bad values fail before the key and the model are touched
      const asked = requestedPrecision(o.precision);
      if (asked) refuseFastOnGpu(asked, requestedDevice(o.device), o);
      const memoryLimit = memoryLimitFromFlag(o.memoryLimit);
      const config = loadServiceConfig(dataDir, o.publicUrl);
      // the key first: a wrong one is refused before the model loads
      const store = Store.open(dataDir);
      let key: KeyRow;
      let pipeline: KleinPipeline;
      try {
        key = stdioKey(store, o.apiKey ?? process.env.KLEIN_API_KEY);
        const target = await targetFromFlags(o, { cpuPrecision: CPU_DEFAULT_PRECISION });
        pipeline = await KleinPipeline.open({ model: o.model ?? process.env.KLEIN_MODEL_DIR, target, keepLoaded: o.keepLoaded ? 'auto' : false, memoryLimit, mattingModel: o.mattingModel });
      } catch (e) {
        store.close();
        if (e instanceof ModelFolderError) throw new UsageError(e.message);
        throw e;
      }
      config.precision = pipeline.target.precision;
      config.variant = pipeline.variant.id;
      if (pipeline.target.device !== 'cpu') config.gpuDtype = pipeline.target.gpuDtype;
      // stdout carries the MCP messages: everything else goes to stderr
      const log = createLogger(process.env.KLEIN_LOG_LEVEL ?? 'warn');
      const svc = createApp({ pipeline, config, store, logger: log, modelDir: pipeline.model.root, matting: mattingProbe({ explicit: o.mattingModel, modelRoot: pipeline.model.root }) });
      let url: string;
      try {
        url = (await svc.listen(port, '127.0.0.1')).url;
      } catch (e) {
        await svc.close();
        await pipeline.close();
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EADDRINUSE' || code === 'EACCES') throw new UsageError(`cannot listen on 127.0.0.1:${port}: ${code}`);
        throw e;
      }
      const deps = { store: svc.store, queue: svc.queue, cfg: svc.config, limiter: new RateLimiter(), log, files: svc.files, modelDir: pipeline.model.root };
      const server = createMcpServer({ deps, key, baseUrl: config.publicUrl ?? url });
      const transport = new StdioServerTransport();
      await new Promise<void>((resolve) => {
        // the client closing our stdin is the normal end of a stdio MCP server
        process.stdin.once('end', resolve);
        process.stdin.once('close', resolve);
        process.once('SIGINT', resolve);
        process.once('SIGTERM', resolve);
        transport.onclose = resolve;
        void server.connect(transport).then(() => console.error(`klein mcp: ${pipeline.variant.id} from ${pipeline.model.root}, data in ${dataDir}, images at ${url}; MCP on stdio`));
      });
      await server.close().catch(() => undefined);
      await svc.close();
      await pipeline.close();
    });
}
