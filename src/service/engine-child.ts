// The engine process: one KleinPipeline, driven by its parent (engine-host.ts) over the IPC channel. Its synchronous
// JavaScript (weight conversion, noise, image coding) and ONNX Runtime's threads run here, never on the API's event
// loop; a native crash or an OOM kill takes only this process. It exits when the parent goes away.
import fs from 'node:fs/promises';
import path from 'node:path';
import { KleinPipeline } from '../pipeline/pipeline.ts';
import type { GenerateRequest, GenerateResult } from '../pipeline/types.ts';
import { engineInfo, type EngineOptions, type FromEngine, type HandedOverResult, serializeError, type ToEngine } from './engine-protocol.ts';

let pipeline: KleinPipeline | undefined;
let handoverDir = '';
const running = new Map<number, AbortController>();

function send(m: FromEngine): void {
  // a parent that vanished mid-send makes this throw: the 'disconnect' handler ends the process
  try {
    process.send!(m);
  } catch {
    // nothing to tell anyone
  }
}

async function open(options: EngineOptions, dir: string): Promise<void> {
  handoverDir = dir;
  try {
    pipeline = await KleinPipeline.open(options);
    send({ type: 'ready', info: engineInfo(pipeline) });
  } catch (e) {
    send({ type: 'open-failed', error: serializeError(e) });
  }
}

async function generate(id: number, req: GenerateRequest): Promise<void> {
  const ac = new AbortController();
  running.set(id, ac);
  try {
    if (!pipeline) throw new Error('the engine was asked to generate before it opened its model');
    const result = await pipeline.generate(req, { signal: ac.signal, onProgress: (event) => send({ type: 'progress', id, event }) });
    send({ type: 'result', id, result: await handOver(id, result) });
  } catch (e) {
    send({ type: 'error', id, error: serializeError(e) });
  } finally {
    running.delete(id);
  }
}

/** The images' bytes go to files in the host's hand-over folder; the message carries their names. */
async function handOver(id: number, result: GenerateResult): Promise<HandedOverResult> {
  const images = await Promise.all(result.images.map(async ({ data, ...image }, i) => {
    const name = `${id}-${i}`;
    await fs.writeFile(path.join(handoverDir, name), data);
    return { ...image, name };
  }));
  return { ...result, images };
}

async function close(): Promise<void> {
  for (const ac of running.values()) ac.abort(new Error('the engine is closing'));
  await pipeline?.close().catch(() => undefined);
  process.exit(0);
}

process.on('message', (m: ToEngine) => {
  if (m.type === 'open') void open(m.options, m.handoverDir);
  else if (m.type === 'generate') void generate(m.id, m.req);
  else if (m.type === 'cancel') running.get(m.id)?.abort(new Error('cancelled'));
  else if (m.type === 'close') void close();
});
// the API process died or closed the channel: an engine nobody can talk to must not keep the model in memory
process.on('disconnect', () => process.exit(0));
// Ctrl+C in a terminal (and systemd's stop) signal the whole process group: the parent decides when the engine
// stops (after its runs were put back in the queue), so the engine does not die under it first
process.on('SIGINT', () => undefined);
process.on('SIGTERM', () => undefined);
