// Worker thread of weight-store.ts: computes its group of a folder's weights (weight-values.ts) and writes each into
// `weights.bin` (made at its full size by the parent) at its offset, reporting progress, the spot checksums and the
// conversion statistics. Quantized weights go through the quantizer module the store was given.
import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import type { Int8Quantizer } from './quantize.ts';
import { computeWeight, conversionState } from './weight-values.ts';
import { spotCrc, type ConvertJob, type ConvertMessage } from './weight-store.ts';

const { file, jobs, quantizer } = workerData.data as { file: string; jobs: ConvertJob[]; quantizer?: string };
const post = (m: ConvertMessage) => parentPort!.postMessage(m);

async function loadQuantizer(): Promise<Int8Quantizer | undefined> {
  if (!quantizer || !jobs.some((j) => j.ref.transform.kind === 'quantize')) return undefined;
  const module = (await import(quantizer)) as { createQuantizer: () => Promise<Int8Quantizer> };
  return module.createQuantizer();
}

try {
  const state = conversionState(await loadQuantizer());
  const fd = fs.openSync(file, 'r+');
  try {
    const crcs: Array<{ head: number; tail: number }> = [];
    for (const job of jobs) {
      const bytes = await computeWeight(job.ref, state);
      if (bytes.byteLength !== job.length) throw new Error(`${job.ref.key}: computed ${bytes.byteLength} bytes, expected ${job.length}`);
      let done = 0;
      while (done < bytes.byteLength) done += fs.writeSync(fd, bytes, done, bytes.byteLength - done, job.offset + done);
      crcs.push(spotCrc(bytes));
      post({ kind: 'progress', key: job.ref.key });
    }
    fs.fsyncSync(fd);
    await state.quantizer?.release();
    post({ kind: 'done', result: { crcs, stats: state.stats } });
  } finally {
    fs.closeSync(fd);
  }
} catch (e) {
  post({ kind: 'error', message: (e as Error).message });
}
