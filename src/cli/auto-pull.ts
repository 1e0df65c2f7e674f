// `klein serve` (and so `npm start`) on a machine without its model: the model is pulled first, the way `klein pull`
// does it (resumable, verified, with progress), then served. A person at a terminal is asked first; scripts decide
// with --pull / --no-pull or $KLEIN_PULL, and without either the pull goes ahead (the command's job is to serve).
// Only models of the cache are pulled (a Hub repo id, $KLEIN_MODEL, or the default klein 4B): a folder named by path
// is the user's own and is reported as it is.
import readline from 'node:readline/promises';
import type { Command } from 'commander';
import { DEFAULT_HUB_URL, PullError } from '../weights/hub.ts';
import { DEFAULT_REPO, ModelFolderError, openModelFolder, resolveModelPath } from '../weights/model-folder.ts';
import { repoOfCacheDir } from '../weights/cache-dirs.ts';
import { UsageError } from './errors.ts';
import { pullWithProgress } from './pull.ts';

export const PULL_ENV = 'KLEIN_PULL';

/** How the decision is taken when the model is missing. */
export type PullChoice = 'pull' | 'refuse' | 'ask';

/** `--pull` / `--no-pull` first, then $KLEIN_PULL, then: ask a terminal, pull for a script. */
export function pullChoice(flag: boolean | undefined, env: string | undefined, interactive: boolean): PullChoice {
  if (flag !== undefined) return flag ? 'pull' : 'refuse';
  const v = env?.trim().toLowerCase();
  if (v) {
    if (['1', 'true', 'yes', 'always'].includes(v)) return 'pull';
    if (['0', 'false', 'no', 'never'].includes(v)) return 'refuse';
    throw new UsageError(`$${PULL_ENV} must be 1 (pull a missing model) or 0 (never), got "${env}"`);
  }
  return interactive ? 'ask' : 'pull';
}

/** What is missing, and from where it would come; null when the model is usable or not ours to fetch. */
function missingModel(spec: string | undefined): { error: ModelFolderError; repo: string; dir: string } | null {
  let dir: string;
  try {
    dir = resolveModelPath(spec);
  } catch {
    return null; // not a folder nor a repo id: the command reports it
  }
  const repo = repoOfCacheDir(dir);
  if (!repo) return null;
  try {
    openModelFolder(dir);
    return null;
  } catch (e) {
    // an incomplete folder is an interrupted pull: pulling again resumes it; a wrong one is the user's to look at
    if (e instanceof ModelFolderError && (e.code === 'model_not_found' || e.code === 'model_incomplete')) return { error: e, repo, dir };
    return null;
  }
}

async function askYesNo(question: string): Promise<boolean> {
  const rl = readline.createInterface({ input: process.stdin, output: process.stderr });
  try {
    const answer = (await rl.question(question)).trim().toLowerCase();
    return answer === '' || answer === 'y' || answer === 'yes';
  } finally {
    rl.close();
  }
}

/**
 * Makes sure the model `spec` names is on this machine, pulling it when missing and allowed. Refused, declined or
 * failed, it throws the usual "no model" message (exit 2), with why the download did not happen.
 */
export async function ensureModel(spec: string | undefined, flag: boolean | undefined): Promise<void> {
  const missing = missingModel(spec);
  if (!missing) return;
  const { error, repo, dir } = missing;
  const choice = pullChoice(flag, process.env[PULL_ENV], process.stdin.isTTY === true);
  const hub = (process.env.HF_ENDPOINT ?? DEFAULT_HUB_URL).replace(/\/+$/, '');
  if (choice === 'refuse') throw new UsageError(error.message);
  if (choice === 'ask' && !(await askYesNo(`klein: the model ${repo} is not on this machine (${dir}).\nDownload it from ${hub} now (resumable${repo === DEFAULT_REPO ? '; about 16 GB' : ''})? [Y/n] `))) {
    throw new UsageError(error.message);
  }
  process.stderr.write(`klein: pulling ${repo} from ${hub} into ${dir} (--no-pull or ${PULL_ENV}=0 to refuse)\n`);
  try {
    await pullWithProgress({ repo, kind: 'klein' });
  } catch (e) {
    if (e instanceof PullError) throw new UsageError(`${error.message}\nThe download did not succeed: ${e.message}`);
    throw e;
  }
}

/** The `--pull` / `--no-pull` options, and the pull before the command's action. */
export function addModelPull(cmd: Command): Command {
  return cmd
    .option('--pull', `when the model is missing, download it without asking (the default for scripts; $${PULL_ENV}=1)`)
    .option('--no-pull', `when the model is missing, fail instead of downloading it ($${PULL_ENV}=0)`)
    .hook('preAction', async (_program, action) => {
      const o = action.opts<{ model?: string; pull?: boolean }>();
      await ensureModel(o.model ?? process.env.KLEIN_MODEL_DIR, o.pull);
    });
}
