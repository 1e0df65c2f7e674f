import fs from 'node:fs';
import path from 'node:path';
import type { CaseResult, ConformComponent } from './types.ts';

/** A component whose engine part does not exist yet: its golden cases are reported failing, never skipped. */
export function notImplemented(name: string, folder: string): ConformComponent {
  return {
    name,
    async *run(goldenDir: string): AsyncIterable<CaseResult> {
      const dir = path.join(goldenDir, folder);
      if (!fs.existsSync(dir)) return;
      const cases = fs.readdirSync(dir).filter((f) => /case|\.json$|\.safetensors$/.test(f) && !f.startsWith('model'));
      for (const c of cases.length ? cases : [folder]) {
        yield { component: name, name: `${folder}/${c}`, maxAbsErr: NaN, tolerance: NaN, passed: false, error: 'not implemented yet' };
      }
    },
  };
}
