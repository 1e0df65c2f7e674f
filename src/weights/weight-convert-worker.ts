// Worker thread of weight-store.ts: computes its group of a folder's weights (weight-values.ts) and writes each into
// `weights.bin` (made at its full size by the parent) at its offset, reporting progress, the spot checksums and the
// conversion statistics.
import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { computeWeight, type ConversionStats, type QuantizeMemo } from './weight-values.ts';
import { spotCrc, type ConvertJob, type ConvertMessage } from './weight-store.ts';

const { file, jobs } = workerData.data as { file: string; jobs: ConvertJob[] };
const post = (m: ConvertMessage) => parentPort!.postMessage(m);

try {
  const fd = fs.openSync(file, 'r+');
  try {
    const stats: ConversionStats = { fp16Overflows: 0 };
    const memo: QuantizeMemo = {};
    const crcs: Array<{ head: number; tail: number }> = [];
    for (const job of jobs) {
      const bytes = computeWeight(job.ref, stats, memo);
      if (bytes.byteLength !== job.length) throw new Error(`${job.ref.key}: computed ${bytes.byteLength} bytes, expected ${job.length}`);
      let done = 0;
      while (done < bytes.byteLength) done += fs.writeSync(fd, bytes, done, bytes.byteLength - done, job.offset + done);
      crcs.push(spotCrc(bytes));
      post({ kind: 'progress', key: job.ref.key });
    }
    fs.fsyncSync(fd);
    post({ kind: 'done', result: { crcs, stats } });
  } finally {
    fs.closeSync(fd);
  }
} catch (e) {
  post({ kind: 'error', message: (e as Error).message });
}
