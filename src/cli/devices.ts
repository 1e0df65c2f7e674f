// `klein devices`: which execution devices work on this machine, and why the others do not.
import type { Command } from 'commander';
import { probeDevices, resolveDevice } from '../graph/device.ts';

export function registerDevices(program: Command): void {
  program
    .command('devices')
    .description('probe each execution device (cpu, webgpu, cuda) with a tiny session and say which --device auto picks')
    .option('--json', 'print one JSON object per device, then {"auto": …}')
    .action(async (opts: { json?: boolean }) => {
      const probes = await probeDevices();
      const auto = await resolveDevice('auto');
      if (opts.json) {
        for (const p of probes) console.log(JSON.stringify(p));
        console.log(JSON.stringify({ auto }));
        return;
      }
      for (const p of probes) {
        console.log(`${p.device.padEnd(7)} ${p.available ? 'available' : 'unavailable'} (${p.ms} ms)${p.reason ? `: ${p.reason}` : ''}`);
      }
      console.log(`auto    -> ${auto}`);
    });
}
