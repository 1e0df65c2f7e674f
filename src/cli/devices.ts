// `klein devices`: which execution devices work on this machine, and why the others do not.
import type { Command } from 'commander';
import ort from 'onnxruntime-node';
import os from 'node:os';
import { executionProviders, probeDevices, resolveDevice, type Device } from '../graph/device.ts';
import { Graph, MS_DOMAIN } from '../graph/onnx-graph.ts';

export function registerDevices(program: Command): void {
  program
    .command('devices')
    .description('probe each execution device (cpu, webgpu, cuda) with a tiny session and say which --device auto picks')
    .option('--json', 'print one JSON object per device, then {"auto": …}')
    .option('--attention', 'also run ORT\'s MultiHeadAttention kernel unpinned on each GPU device and print its error against the CPU')
    .action(async (opts: { json?: boolean; attention?: boolean }) => {
      const probes = await probeDevices();
      const auto = await resolveDevice('auto');
      if (opts.json) {
        for (const p of probes) console.log(JSON.stringify(p));
        console.log(JSON.stringify({ auto }));
      } else {
        for (const p of probes) {
          console.log(`${p.device.padEnd(7)} ${p.available ? 'available' : 'unavailable'} (${p.ms} ms)${p.reason ? `: ${p.reason}` : ''}`);
        }
        console.log(`auto    -> ${auto}`);
      }
      if (opts.attention) {
        for (const p of probes) if (p.available && p.device !== 'cpu') await attentionCheck(p.device, opts.json);
      }
    });
}

/**
 * device.ts pins MultiHeadAttention to the CPU on webgpu because its kernel was wrong on lavapipe. This runs the
 * kernel itself (no pinning) on another adapter, so a GPU machine can tell whether the pin is still needed there.
 */
async function attentionCheck(device: Device, json?: boolean): Promise<void> {
  for (const s of [16, 64, 256]) {
    const [heads, dh] = [2, 64];
    const g = new Graph('klein-attention-check');
    const ins = ['q', 'k', 'v'].map((n) => g.input(n, 'float32', [1, s, heads * dh]));
    g.output(g.op('MultiHeadAttention', ins, { num_heads: heads }, { domain: MS_DOMAIN }), 'y');
    const model = g.serialize(os.tmpdir());
    let seed = 1;
    const rnd = (amp: number) => Float32Array.from({ length: s * heads * dh }, () => ((seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0) / 2 ** 31 - 1) * amp);
    const feeds = { q: new ort.Tensor('float32', rnd(4), [1, s, heads * dh]), k: new ort.Tensor('float32', rnd(4), [1, s, heads * dh]), v: new ort.Tensor('float32', rnd(1), [1, s, heads * dh]) };
    const out: Float32Array[] = [];
    for (const d of ['cpu', device] as Device[]) {
      const session = await ort.InferenceSession.create(model, { executionProviders: executionProviders(d), logSeverityLevel: 3 });
      out.push((await session.run(feeds)).y.data as Float32Array);
      await session.release();
    }
    let err = 0;
    for (let i = 0; i < out[0].length; i++) err = Math.max(err, Math.abs(out[0][i] - out[1][i]));
    const ok = err < 1e-4;
    if (json) console.log(JSON.stringify({ attentionCheck: device, positions: s, heads, headDim: dh, maxAbsErr: err, ok }));
    else console.log(`attention ${device} MultiHeadAttention ${s} positions × ${heads} heads of ${dh}: max |Δ| vs cpu ${err.toExponential(2)} (${ok ? 'ok' : 'WRONG'}; outputs are in [-1, 1])`);
  }
}
