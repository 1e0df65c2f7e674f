// `klein pull [REPO]`: download a model from the Hugging Face Hub (or a mirror) into the model cache.
// `klein pull --matting [REPO]`: the matting weights for transparent backgrounds (default ZhengPeng7/BiRefNet-matting);
// a BiRefNet repository named without --matting is recognised from its listing.
import path from 'node:path';
import type { Command } from 'commander';
import { DEFAULT_MATTING_REPO, defaultMattingDir, openMattingFolder } from '../weights/matting-folder.ts';
import { isRepoId } from '../weights/cache-dirs.ts';
import { DEFAULT_REPO, openModelFolder } from '../weights/model-folder.ts';
import { inspectMattingFolder } from '../pipeline/matting-model.ts';
import { PullError, pullModel, type PullOptions, type PullResult } from '../weights/hub.ts';
import { EXIT_FAILED, UsageError } from './errors.ts';
import { fmtBytes, stageBar } from './progress-bars.ts';

interface PullCliOptions {
  revision: string;
  hubUrl?: string;
  dir?: string;
  retries: string;
  json?: boolean;
  quiet?: boolean;
  matting?: boolean;
}

/** What a pulled folder is good for, or why it is not usable yet. */
function check(kind: 'klein' | 'matting', dir: string): { variant?: string; matting?: { geometry: string; input_size: unknown }; problem?: string } {
  try {
    if (kind === 'klein') return { variant: openModelFolder(dir).variant.id };
    const m = inspectMattingFolder(openMattingFolder(dir));
    return { matting: { geometry: m.geometry, input_size: m.inputSize } };
  } catch (e) {
    return { problem: (e as Error).message };
  }
}

/** `pullModel` with the progress `klein pull` shows on stderr: a bar per file, a line when a download resumes. */
export async function pullWithProgress(opts: PullOptions, quiet = false): Promise<PullResult> {
  const bar = stageBar({ quiet });
  let current = '';
  try {
    return await pullModel({
      ...opts,
      onProgress: (p) => {
        if (p.phase === 'list') bar.stage(`listing ${opts.repo}`, 1);
        if (p.phase === 'download' && p.file && p.file !== current) {
          current = p.file;
          bar.stage(p.file.length > 40 ? `…${p.file.slice(-39)}` : p.file, p.fileTotal ?? 0, 'bytes');
          if (p.resumedFrom && !quiet) process.stderr.write(`klein: resuming ${p.file} at ${fmtBytes(p.resumedFrom)}\n`);
        }
        if (p.phase === 'download') bar.update(p.fileBytes ?? 0);
      },
    });
  } finally {
    bar.stop();
  }
}

export function registerPull(program: Command): void {
  program
    .command('pull')
    .description('download a FLUX.2 [klein] model (or, with --matting, the matting model for transparent backgrounds) from the Hugging Face Hub into the model cache (resumable, verified)')
    .argument('[repo]', `Hub repository (owner/name); default ${DEFAULT_REPO}, with --matting ${DEFAULT_MATTING_REPO}`)
    .option('--matting', `pull BiRefNet matting weights (model.safetensors + config.json) for --background transparent`)
    .option('--revision <rev>', 'branch, tag or commit', 'main')
    .option('--hub-url <url>', 'Hub endpoint, for mirrors (default: $HF_ENDPOINT or https://huggingface.co)')
    .option('--dir <folder>', 'download into this folder instead of the cache ($KLEIN_HOME/models/<owner>--<name>)')
    .option('--retries <n>', 'automatic resumes per file after a broken connection', '5')
    .option('--json', 'print the result as JSON on stdout')
    .option('-q, --quiet', 'no progress output')
    .addHelpText('after', '\nThe token for gated repositories comes from $HF_TOKEN. An interrupted pull resumes where it stopped.\nThe pipeline finds the matting weights pulled into the cache by itself; pulled elsewhere (--dir), point $KLEIN_MATTING_MODEL at them.')
    .action(async (repoArg: string | undefined, opts: PullCliOptions) => {
      const repo = repoArg ?? (opts.matting ? DEFAULT_MATTING_REPO : DEFAULT_REPO);
      if (!isRepoId(repo)) throw new UsageError(`"${repo}" is not a Hub repository id (owner/name)`);
      if (opts.hubUrl && !/^https?:\/\//.test(opts.hubUrl)) throw new UsageError(`--hub-url must be an http(s) URL, got "${opts.hubUrl}"`);
      const retries = Number(opts.retries);
      if (!Number.isInteger(retries) || retries < 0) throw new UsageError(`--retries must be a whole number ≥ 0, got "${opts.retries}"`);
      try {
        const r = await pullWithProgress({ repo, revision: opts.revision, hubUrl: opts.hubUrl, dest: opts.dir, retries, kind: opts.matting ? 'matting' : 'auto' }, opts.quiet);
        const { variant, matting, problem } = check(r.kind, r.dir);
        if (opts.json) {
          console.log(JSON.stringify({ repo: r.repo, revision: r.revision, kind: r.kind, dir: r.dir, bytes: r.bytes, variant, matting, problem, files: r.files }));
        } else {
          const fresh = r.files.filter((f) => f.status !== 'present').length;
          console.log(`${r.repo}@${r.revision}: ${r.files.length} files (${fmtBytes(r.bytes)}), ${fresh} downloaded, ${r.files.length - fresh} already present → ${r.dir}`);
          if (variant) console.log(`model: ${variant}`);
          if (matting) {
            const size = Array.isArray(matting.input_size) ? matting.input_size.join('×') : matting.input_size === 'dynamic' ? 'dynamic' : `${String(matting.input_size)}²`;
            console.log(`matting model: BiRefNet (${matting.geometry} geometry, ${size} input) for --background transparent`);
            // only the default repo in the cache is found without configuration
            const found = path.resolve(r.dir) === defaultMattingDir();
            if (!found) console.log(`use it with --matting-model ${r.dir} or KLEIN_MATTING_MODEL=${r.dir}`);
          }
          if (problem) console.log(`warning: the folder is not usable yet:\n${problem}`);
        }
      } catch (e) {
        // 4xx (no such repo, no access) is the user's to fix: exit 2; a network or checksum failure: exit 1
        if (e instanceof PullError && (e.usage || (e.status !== undefined && e.status >= 400 && e.status < 500))) throw new UsageError(e.message);
        if (e instanceof PullError) {
          console.error(`klein: ${e.message}`);
          process.exitCode = EXIT_FAILED;
          return;
        }
        throw e;
      }
    });
}
