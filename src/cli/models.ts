// `klein models`: what is installed in the model cache (or a given folder), with variant, layout, size and health;
// matting weights (transparent backgrounds) are listed with their geometry.
import type { Command } from 'commander';
import { modelsDir } from '../weights/cache-dirs.ts';
import { listInstalledModels, openModelFolder, ModelFolderError, type InstalledModel } from '../weights/model-folder.ts';
import { openMattingFolder, type MattingFolder } from '../weights/matting-folder.ts';
import { inspectMattingFolder } from '../pipeline/matting-model.ts';
import { UsageError } from './errors.ts';
import { fmtBytes } from './progress-bars.ts';

function inputSizeText(s: unknown): string {
  return Array.isArray(s) ? `${s[1]}×${s[0]}` : s === 'dynamic' ? 'dynamic size' : `${String(s)}²`;
}

/** A matting folder's geometry and input size (read off its weights), or why it is unusable. */
function describeMatting(m: InstalledModel, matting: MattingFolder) {
  try {
    const info = inspectMattingFolder(matting);
    return { name: m.name, path: m.path, ok: true, kind: 'matting' as const, geometry: info.geometry, input_size: info.inputSize, bytes: info.bytes };
  } catch (e) {
    return { name: m.name, path: m.path, ok: false, problem: (e as Error).message };
  }
}

function describe(m: InstalledModel) {
  if (m.matting) return describeMatting(m, m.matting);
  return m.model
    ? { name: m.name, path: m.path, ok: true, kind: 'klein' as const, variant: m.model.variant.id, layout: m.model.layout, bytes: m.model.bytes, steps: m.model.variant.defaultSteps, guidance: m.model.variant.distilled ? null : m.model.variant.defaultGuidance }
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
          list = [{ name: folder, path: folder, kind: 'klein', model: openModelFolder(folder) }];
        } catch (e) {
          if (!(e instanceof ModelFolderError)) throw e;
          // not a klein folder: it may be matting weights
          let matting: MattingFolder | undefined;
          try {
            if (e.code === 'model_invalid') matting = openMattingFolder(folder);
          } catch {
            // neither: the klein error says what a model folder is
          }
          if (!matting) throw new UsageError(e.message);
          list = [{ name: folder, path: folder, kind: 'matting', matting }];
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
        if (r.kind === 'matting') console.log(`${r.name}  matting model (BiRefNet ${r.geometry}, ${inputSizeText(r.input_size)} input) for --background transparent  ${fmtBytes(r.bytes ?? 0)}  ${r.path}`);
        else if (r.ok) console.log(`${r.name}  ${r.variant}  ${r.layout} layout  ${fmtBytes(r.bytes ?? 0)}  ${r.steps} steps${r.guidance ? `, CFG ${r.guidance}` : ''}  ${r.path}`);
        else console.log(`${r.name}  INCOMPLETE  ${r.path}\n  ${String(r.problem).split('\n').join('\n  ')}`);
      }
    });
}
