// Where pulled models live: `$KLEIN_HOME/models/<owner>--<name>`. A leaf module, so the model-folder and
// matting-folder code can both name cache folders without importing each other.
import os from 'node:os';
import path from 'node:path';
import { UserError } from '../errors.ts';

/** `$KLEIN_HOME` (default `~/.cache/klein`): models, compiled-graph links, prompt caches. */
export function kleinHome(): string {
  return process.env.KLEIN_HOME ?? path.join(os.homedir(), '.cache', 'klein');
}

export function modelsDir(): string {
  return path.join(kleinHome(), 'models');
}

const REPO_RE = /^[A-Za-z0-9][\w.-]*\/[\w.-]+$/;

export function isRepoId(s: string): boolean {
  return REPO_RE.test(s) && !s.startsWith('.') && !s.includes('..');
}

/** The cache folder of a Hub repository: `<models>/<owner>--<name>`. */
export function modelCacheDir(repo: string): string {
  if (!isRepoId(repo)) throw new UserError(`"${repo}" is not a Hub repository id (owner/name)`);
  return path.join(modelsDir(), repo.replace('/', '--'));
}

/** The repository a cache folder was pulled from (`owner--name` → `owner/name`), if it is one. */
export function repoOfCacheDir(dir: string): string | undefined {
  const rel = path.relative(modelsDir(), dir);
  if (rel.startsWith('..') || rel.includes(path.sep)) return undefined;
  const i = rel.indexOf('--');
  return i > 0 ? `${rel.slice(0, i)}/${rel.slice(i + 2)}` : undefined;
}
