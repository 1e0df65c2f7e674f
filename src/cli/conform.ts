import type { Command } from 'commander';
import { COMPONENTS } from '../conform/index.ts';
import type { CaseResult } from '../conform/types.ts';
import { DEVICE_HELP, GPU_DTYPE_HELP, targetFromFlags, type TargetFlags } from './target-options.ts';
import { EXIT_FAILED, UsageError } from './errors.ts';
import fs from 'node:fs';
import path from 'node:path';

/** The golden vectors shipped with the repository (test/golden, see its README). */
export const DEFAULT_GOLDEN_DIR = path.resolve(import.meta.dirname, '../../test/golden');

function fmt(x: number): string {
  return Number.isFinite(x) ? x.toExponential(2) : String(x);
}

export function registerConform(program: Command): void {
  program
    .command('conform')
    .description('run every golden case under DIR (laid out like test/golden) and compare with the reference numbers')
    .argument('[dir]', 'golden folder', path.relative(process.cwd(), DEFAULT_GOLDEN_DIR) || '.')
    .option('--component <name>', `only one component: ${COMPONENTS.map((c) => c.name).join(', ')}`)
    .option('--device <device>', DEVICE_HELP)
    .option('--gpu-dtype <dtype>', GPU_DTYPE_HELP)
    .option('--json', 'print one JSON object per case')
    .action(async (dir: string, opts: { component?: string; json?: boolean } & TargetFlags) => {
      if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new UsageError(`golden folder not found: ${dir}`);
      const comps = opts.component ? COMPONENTS.filter((c) => c.name === opts.component) : COMPONENTS;
      if (comps.length === 0) throw new UsageError(`unknown component "${opts.component}"; known: ${COMPONENTS.map((c) => c.name).join(', ')}`);
      // conformance checks the reference numbers: exact (fast mode's int8 error is stated, not conformant)
      const target = { ...(await targetFromFlags({ ...opts, precision: 'exact' })), precision: 'exact' as const };
      if (target.device !== 'cpu') console.log(`device: ${target.device} (${target.gpuDtype})`);
      let passed = 0;
      let failed = 0;
      for (const comp of comps) {
        for await (const r of comp.run(dir, { target })) {
          report(r, opts.json);
          if (r.passed) passed++;
          else failed++;
        }
      }
      if (passed + failed === 0) {
        console.log(`no golden case found under ${dir}${opts.component ? ` for ${opts.component}` : ''}`);
        failed = 1;
      }
      console.log(`${passed} passed, ${failed} failed`);
      if (failed > 0) process.exitCode = EXIT_FAILED;
    });
}

function report(r: CaseResult, json?: boolean): void {
  if (json) {
    console.log(JSON.stringify(r));
    return;
  }
  const status = r.passed ? 'PASS' : 'FAIL';
  const nums = Number.isNaN(r.maxAbsErr) ? '' : ` max_abs_err=${fmt(r.maxAbsErr)} tol=${fmt(r.tolerance)}`;
  console.log(`${status} ${r.name}${nums}${r.error ? ` (${r.error})` : ''}`);
}
