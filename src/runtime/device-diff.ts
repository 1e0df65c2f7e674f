// Finds where a device's results part from the CPU's: every node output of a compiled graph becomes a graph
// output, the graph runs on the CPU provider and on `device` with the same feeds, and each intermediate is
// compared. The first node whose error jumps is the op that is missing a precise kernel on that provider.
//
// A developer tool (klein devices --diff): it holds every intermediate in memory, so use it on tiny models.
import fs from 'node:fs';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import ort from 'onnxruntime-node';
import { executionProviders, resolveDevice, type Device } from './device.ts';

const { onnx } = onnxProto;

export interface NodeDiff {
  /** Node index in the graph (topological: the builder emits nodes in dependency order). */
  index: number;
  node: string;
  opType: string;
  output: string;
  /** max |cpu - device| over the output. */
  maxAbsErr: number;
  /** max |cpu| over the output, to judge maxAbsErr against. */
  maxAbs: number;
}

export interface DiffOptions {
  /** Only compare outputs of these op types (default: all float outputs). */
  opTypes?: string[];
  /** Nodes to run on the CPU even on `device` (ORT's forceCpuNodeNames; WebGPU only). */
  forceCpu?: string[];
}

/** Runs `file` on the CPU and on `device`, returning one NodeDiff per float32 node output, in graph order. */
export async function diffAgainstCpu(file: string, feeds: Record<string, ort.Tensor>, device: Device, opts: DiffOptions = {}): Promise<NodeDiff[]> {
  await resolveDevice(device);
  const model = onnx.ModelProto.decode(fs.readFileSync(file));
  const graph = model.graph!;
  const existing = new Set((graph.output ?? []).map((o) => o.name));
  const owners = new Map<string, { index: number; node: string; opType: string }>();
  (graph.node ?? []).forEach((n, index) => {
    if (opts.opTypes && !opts.opTypes.includes(n.opType ?? '')) return;
    for (const o of n.output ?? []) {
      if (!o) continue;
      owners.set(o, { index, node: n.name ?? '', opType: n.opType ?? '' });
      // No type: ORT infers it. Outputs we cannot compare (int64 shapes, bool masks) are skipped below.
      if (!existing.has(o)) graph.output!.push({ name: o });
    }
  });
  // Beside the original: external data paths are relative to the model's folder.
  const tmp = path.join(path.dirname(file), `.klein-device-diff-${process.pid}.onnx`);
  fs.writeFileSync(tmp, onnx.ModelProto.encode(model).finish());
  try {
    const base: ort.InferenceSession.SessionOptions = { graphOptimizationLevel: 'disabled', logSeverityLevel: 3 };
    const cpu = await ort.InferenceSession.create(tmp, { ...base, executionProviders: ['cpu'] });
    const providers = executionProviders(device).map((p) => (typeof p !== 'string' && p.name === 'webgpu' && opts.forceCpu ? { ...p, forceCpuNodeNames: opts.forceCpu } : p));
    const dev = await ort.InferenceSession.create(tmp, { ...base, executionProviders: providers });
    const a = await cpu.run(feeds);
    const b = await dev.run(feeds);
    await cpu.release();
    await dev.release();
    const out: NodeDiff[] = [];
    for (const [name, owner] of owners) {
      const x = a[name];
      const y = b[name];
      if (!x || !y || x.type !== 'float32') continue;
      const xd = x.data as Float32Array;
      const yd = y.data as Float32Array;
      let maxAbsErr = xd.length === yd.length ? 0 : Infinity;
      let maxAbs = 0;
      for (let i = 0; i < xd.length && i < yd.length; i++) {
        const e = Math.abs(xd[i] - yd[i]);
        maxAbsErr = e > maxAbsErr || Number.isNaN(e) ? (Number.isNaN(e) ? Infinity : e) : maxAbsErr;
        maxAbs = Math.max(maxAbs, Math.abs(xd[i]));
      }
      out.push({ ...owner, output: name, maxAbsErr, maxAbs });
    }
    return out.sort((p, q) => p.index - q.index);
  } finally {
    fs.rmSync(tmp, { force: true });
  }
}
