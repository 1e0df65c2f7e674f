// `klein models`: what is installed in the model cache (or a given folder), with variant, layout, size and health.
import type { Command } from 'commander';
import { listInstalledModels, modelsDir, openModelFolder, ModelFolderError, type InstalledModel } from '../weights/model-folder.ts';
import { UsageError } from './errors.ts';
import { fmtBytes } from './progress-bars.ts';

function describe(m: InstalledModel) {
  return m.model
    ? { name: m.name, path: m.path, ok: true, variant: m.model.variant.id, layout: m.model.layout, bytes: m.model.bytes, steps: m.model.variant.defaultSteps, guidance: m.model.variant.distilled ? null : m.model.variant.defaultGuidance }
    : { name: m.name, path: m.path, ok: false, problem: m.error };
}

export function registerModels(program: Command): void {
  program
    .command('models')
    .description(`list the models in the cache (${modelsDir()}) or check one folder`)
    .argument('[folder]', 'check this model folder instead of listing the cache')
    .option('--json', 'print JSON')
    .action(async (folder: string | undefined, opts: { json?: boolean }) => {
      let list: InstalledModel[];
      if (folder) {
        try {
          list = [{ name: folder, path: folder, model: openModelFolder(folder) }];
        } catch (e) {
          if (e instanceof ModelFolderError) throw new UsageError(e.message);
          throw e;
        }
      } else list = listInstalledModels();
      const rows = list.map(describe);
      if (opts.json) {
        console.log(JSON.stringify({ dir: modelsDir(), models: rows }));
        return;
      }
      if (rows.length === 0) {
        console.log(`no models in ${modelsDir()}; get one with \`klein pull\` (black-forest-labs/FLUX.2-klein-4B) or set KLEIN_HOME`);
        return;
      }
      for (const r of rows) {
        if (r.ok) console.log(`${r.name}  ${r.variant}  ${r.layout} layout  ${fmtBytes(r.bytes ?? 0)}  ${r.steps} steps${r.guidance ? `, CFG ${r.guidance}` : ''}  ${r.path}`);
        else console.log(`${r.name}  INCOMPLETE  ${r.path}\n  ${String(r.problem).split('\n').join('\n  ')}`);
      }
    });
}
