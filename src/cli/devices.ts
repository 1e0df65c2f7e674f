// `klein devices`: which execution devices work on this machine, and why the others do not.
import type { Command } from 'commander';
import { attentionError, probeDevices, resolveDevice, type Device } from '../runtime/device.ts';

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

/** The unpinned MultiHeadAttention kernel against the CPU: is device.ts's pin needed on this adapter? */
async function attentionCheck(device: Device, json?: boolean): Promise<void> {
  for (const positions of [16, 64, 256]) {
    const err = await attentionError(device, positions);
    const ok = err < 1e-4;
    if (json) console.log(JSON.stringify({ attentionCheck: device, positions, heads: 2, headDim: 64, maxAbsErr: err, ok }));
    else console.log(`attention ${device} MultiHeadAttention ${positions} positions × 2 heads of 64: max |Δ| vs cpu ${err.toExponential(2)} (${ok ? 'ok' : 'WRONG: pinned to the CPU'}; outputs are in [-1, 1])`);
  }
}
