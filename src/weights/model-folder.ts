// Model folders: where models live, which layout a folder has, which FLUX.2 [klein] variant it holds, and whether
// every file the pipeline needs is there. Two layouts are recognised:
//   * Hugging Face (diffusers) — `black-forest-labs/FLUX.2-klein-4B`: model_index.json, transformer/, vae/,
//     text_encoder/, tokenizer/, scheduler/;
//   * BFL single file — `flux-2-klein-4b.safetensors` + `ae.safetensors` + a Qwen3 text-encoder folder
//     (`text_encoder/` or `qwen3/`, with its tokenizer inside or in `tokenizer/`).
// A folder that is missing pieces is reported once, listing everything missing and how to get it.
import fs from 'node:fs';
import path from 'node:path';
import { isRepoId, modelCacheDir, modelsDir, repoOfCacheDir } from './cache-dirs.ts';
import { openMattingFolder, type MattingFolder } from './matting-folder.ts';
import { SafetensorsFile } from './safetensors.ts';

export type VariantId = 'klein-4b' | 'klein-9b' | 'klein-base-4b' | 'klein-base-9b';

export interface VariantInfo {
  id: VariantId;
  /** Distilled klein: 4 steps, guidance ignored. Base: CFG against the empty prompt. */
  distilled: boolean;
  defaultSteps: number;
  defaultGuidance: number;
  /** The Hub repository the official weights come from. */
  repo: string;
  /** The BFL single-file checkpoint name. */
  bflFile: string;
}

/** Defaults from flux2 `FLUX2_MODEL_INFO` (copied into the golden sampler/schedules.json). */
export const VARIANTS: Record<VariantId, VariantInfo> = {
  'klein-4b': { id: 'klein-4b', distilled: true, defaultSteps: 4, defaultGuidance: 1.0, repo: 'black-forest-labs/FLUX.2-klein-4B', bflFile: 'flux-2-klein-4b.safetensors' },
  'klein-9b': { id: 'klein-9b', distilled: true, defaultSteps: 4, defaultGuidance: 1.0, repo: 'black-forest-labs/FLUX.2-klein-9B', bflFile: 'flux-2-klein-9b.safetensors' },
  'klein-base-4b': { id: 'klein-base-4b', distilled: false, defaultSteps: 50, defaultGuidance: 4.0, repo: 'black-forest-labs/FLUX.2-klein-base-4B', bflFile: 'flux-2-klein-base-4b.safetensors' },
  'klein-base-9b': { id: 'klein-base-9b', distilled: false, defaultSteps: 50, defaultGuidance: 4.0, repo: 'black-forest-labs/FLUX.2-klein-base-9B', bflFile: 'flux-2-klein-base-9b.safetensors' },
};

export const DEFAULT_REPO = VARIANTS['klein-4b'].repo;

export function isVariantId(s: string): s is VariantId {
  return Object.hasOwn(VARIANTS, s);
}

/** Why a model folder cannot be used; `code` lets the CLI (exit 2) and the service (4xx/5xx) map it. */
export class ModelFolderError extends Error {
  override name = 'ModelFolderError';
  constructor(
    readonly code: 'model_not_found' | 'model_incomplete' | 'model_invalid',
    message: string,
    readonly missing: string[] = [],
  ) {
    super(message);
  }
}

export interface ComponentFiles {
  /** 'bfl' = BFL key names (single-file checkpoints), 'diffusers' = diffusers key names, 'hf' = transformers. */
  format: 'bfl' | 'diffusers' | 'hf';
  /** What `Checkpoint.open` takes: a .safetensors file, or a folder with one file or a sharded index. */
  checkpoint: string;
  /** Every weight file, for the compiled-graph cache key and size reports. */
  files: string[];
  /** config.json when the layout has one. */
  config?: string;
}

export interface ModelFolder {
  root: string;
  layout: 'diffusers' | 'bfl';
  variant: VariantInfo;
  /** How the variant was decided (for `klein models` and error messages). */
  variantSource: string;
  transformer: ComponentFiles;
  vae: ComponentFiles;
  textEncoder: ComponentFiles;
  /** Folder holding tokenizer.json and tokenizer_config.json. */
  tokenizer: string;
  /** Total bytes of weights. */
  bytes: number;
}

// ---------------------------------------------------------------------------------------------- locations

/**
 * `--model` to a folder: an existing path is used as is; `owner/name` means its cache folder; nothing means
 * `$KLEIN_MODEL` or the default repository. Does not validate the folder (see `openModelFolder`).
 */
export function resolveModelPath(spec?: string): string {
  const s = spec ?? process.env.KLEIN_MODEL ?? DEFAULT_REPO;
  if (fs.existsSync(s)) return path.resolve(s);
  if (isRepoId(s) && !s.startsWith('.')) return modelCacheDir(s);
  // a path that does not exist (yet): openModelFolder reports it with how to get a model
  if (path.isAbsolute(s) || s.startsWith('.') || s.includes(path.sep)) return path.resolve(s);
  throw new ModelFolderError('model_not_found', `model "${s}" is neither a folder nor a Hub repository id (owner/name)`);
}

// ---------------------------------------------------------------------------------------------- detection

function readJson(file: string): Record<string, unknown> {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new ModelFolderError('model_invalid', `${file} is not valid JSON: ${(e as Error).message}`);
  }
}

/** Collects what is missing or broken, so the user gets one complete list instead of one error per try. */
class Findings {
  readonly missing: string[] = [];
  readonly broken: string[] = [];
  constructor(readonly root: string) {}
  rel(p: string): string {
    return path.relative(this.root, p) || '.';
  }
  file(p: string): boolean {
    if (fs.existsSync(p) && fs.statSync(p).isFile()) return true;
    this.missing.push(this.rel(p) + (fs.existsSync(`${p}.part`) ? ' (download incomplete: a .part file is there)' : ''));
    return false;
  }
  /** The weight files of a checkpoint folder (single file or sharded index), each header-checked. */
  weights(dir: string, preferred: string[]): string[] {
    if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) {
      this.missing.push(`${this.rel(dir)}/ (${preferred.join(' or ')})`);
      return [];
    }
    const entries = fs.readdirSync(dir);
    const index = entries.find((e) => e.endsWith('.safetensors.index.json'));
    let files: string[];
    if (index) {
      const map = (readJson(path.join(dir, index)).weight_map ?? {}) as Record<string, string>;
      files = [...new Set(Object.values(map))].sort().map((f) => path.join(dir, f));
      if (files.length === 0) this.broken.push(`${this.rel(path.join(dir, index))} has an empty weight_map`);
    } else {
      const found = preferred.find((f) => entries.includes(f)) ?? entries.find((e) => e.endsWith('.safetensors'));
      if (!found) {
        this.missing.push(`${this.rel(dir)}/${preferred[0]}${entries.some((e) => e.endsWith('.part')) ? ' (download incomplete: a .part file is there)' : ''}`);
        return [];
      }
      files = [path.join(dir, found)];
    }
    return files.filter((f) => this.safetensors(f));
  }
  safetensors(f: string): boolean {
    if (!this.file(f)) return false;
    try {
      new SafetensorsFile(f); // header only: catches truncated downloads without reading gigabytes
      return true;
    } catch (e) {
      this.broken.push(`${this.rel(f)}: ${(e as Error).message.replace(`${f}: `, '')}`);
      return false;
    }
  }
}

function bytesOf(files: string[]): number {
  return files.reduce((n, f) => n + (fs.existsSync(f) ? fs.statSync(f).size : 0), 0);
}

/** 4B or 9B from the transformer's text width (7680 = 3·2560 for Qwen3-4B, 12288 = 3·4096 for Qwen3-8B). */
function sizeFromContextDim(dim: number | undefined): '4b' | '9b' {
  return dim === 12288 ? '9b' : '4b';
}

function variantOf(distilled: boolean, size: '4b' | '9b'): VariantInfo {
  return VARIANTS[`${distilled ? 'klein' : 'klein-base'}-${size}` as VariantId];
}

function tokenizerFolder(f: Findings, candidates: string[]): string {
  for (const c of candidates) if (fs.existsSync(path.join(c, 'tokenizer.json'))) return c;
  f.missing.push(`${f.rel(candidates[0])}/tokenizer.json`);
  return candidates[0];
}

function detectDiffusers(root: string, f: Findings, override?: VariantId): Omit<ModelFolder, 'bytes'> {
  const index = readJson(path.join(root, 'model_index.json'));
  const cls = String(index._class_name ?? '');
  if (cls && !cls.startsWith('Flux2')) {
    throw new ModelFolderError('model_invalid', `${root} holds a ${cls}, not a FLUX.2 [klein] pipeline (model_index.json _class_name)`);
  }
  const tDir = path.join(root, 'transformer');
  const tConfig = path.join(tDir, 'config.json');
  const tFiles = f.weights(tDir, ['diffusion_pytorch_model.safetensors']);
  f.file(tConfig);
  const vDir = path.join(root, 'vae');
  const vFiles = f.weights(vDir, ['diffusion_pytorch_model.safetensors']);
  f.file(path.join(vDir, 'config.json'));
  const teDir = path.join(root, 'text_encoder');
  const teFiles = f.weights(teDir, ['model.safetensors']);
  f.file(path.join(teDir, 'config.json'));
  const tok = tokenizerFolder(f, [path.join(root, 'tokenizer'), teDir]);
  f.file(path.join(tok, 'tokenizer_config.json'));
  f.file(path.join(root, 'scheduler', 'scheduler_config.json'));

  let variant: VariantInfo;
  let source: string;
  if (override) {
    variant = VARIANTS[override];
    source = 'given explicitly';
  } else {
    const tcfg = fs.existsSync(tConfig) ? readJson(tConfig) : {};
    const size = sizeFromContextDim(tcfg.joint_attention_dim as number | undefined);
    // model_index.json of the official repos says `is_distilled`; a folder named *base* without it is a base model
    const distilled = typeof index.is_distilled === 'boolean' ? index.is_distilled : !/base/i.test(path.basename(root));
    variant = variantOf(distilled, size);
    source = `model_index.json is_distilled=${String(index.is_distilled ?? 'absent')}, transformer joint_attention_dim=${String(tcfg.joint_attention_dim ?? 'absent')}`;
  }
  return {
    root,
    layout: 'diffusers',
    variant,
    variantSource: source,
    transformer: { format: 'diffusers', checkpoint: tFiles.length > 1 ? tDir : (tFiles[0] ?? tDir), files: tFiles, config: tConfig },
    vae: { format: 'diffusers', checkpoint: vFiles[0] ?? vDir, files: vFiles, config: path.join(vDir, 'config.json') },
    textEncoder: { format: 'hf', checkpoint: teFiles.length > 1 ? teDir : (teFiles[0] ?? teDir), files: teFiles, config: path.join(teDir, 'config.json') },
    tokenizer: tok,
  };
}

const BFL_FILE_RE = /^flux-2-klein-(base-)?(4b|9b)(-[\w]+)?\.safetensors$/i;
const AE_FILES = ['ae.safetensors', 'flux2-vae.safetensors'];
const TE_FOLDERS = ['text_encoder', 'qwen3', 'Qwen3-4B', 'Qwen3-8B'];

function detectBfl(root: string, entries: string[], f: Findings, override?: VariantId): Omit<ModelFolder, 'bytes'> {
  const single = entries.find((e) => BFL_FILE_RE.test(e));
  let tFile = '';
  let variant: VariantInfo = VARIANTS[override ?? 'klein-4b'];
  let source = override ? 'given explicitly' : 'default';
  if (!single) {
    f.missing.push(`${VARIANTS[override ?? 'klein-4b'].bflFile} (the BFL transformer checkpoint)`);
  } else {
    tFile = path.join(root, single);
    f.safetensors(tFile);
    if (!override) {
      const m = BFL_FILE_RE.exec(single)!;
      variant = variantOf(!m[1], m[2].toLowerCase() as '4b' | '9b');
      source = `file name ${single}`;
      if (/fp8/i.test(m[3] ?? '')) f.broken.push(`${single}: float8 checkpoints are not supported yet; use the bf16 file ${variant.bflFile}`);
    }
  }
  const ae = AE_FILES.find((a) => entries.includes(a));
  const aeFile = path.join(root, ae ?? AE_FILES[0]);
  if (ae) f.safetensors(aeFile);
  else f.missing.push(`${AE_FILES[0]} (the FLUX.2 autoencoder, from black-forest-labs/FLUX.2-dev, or flux2-vae.safetensors)`);
  const te = TE_FOLDERS.find((d) => entries.includes(d)) ?? TE_FOLDERS[0];
  const teDir = path.join(root, te);
  const teFiles = f.weights(teDir, ['model.safetensors']);
  f.file(path.join(teDir, 'config.json'));
  const tok = tokenizerFolder(f, [path.join(root, 'tokenizer'), teDir]);
  f.file(path.join(tok, 'tokenizer_config.json'));
  return {
    root,
    layout: 'bfl',
    variant,
    variantSource: source,
    transformer: { format: 'bfl', checkpoint: tFile, files: tFile ? [tFile] : [] },
    vae: { format: 'bfl', checkpoint: aeFile, files: ae ? [aeFile] : [] },
    textEncoder: { format: 'hf', checkpoint: teFiles.length > 1 ? teDir : (teFiles[0] ?? teDir), files: teFiles, config: path.join(teDir, 'config.json') },
    tokenizer: tok,
  };
}

function howToGet(root: string, variant?: VariantInfo): string {
  const repo = repoOfCacheDir(root) ?? variant?.repo ?? DEFAULT_REPO;
  return `Get it with \`klein pull ${repo}\` (set HF_TOKEN if the repository is gated), or make a random tiny model for trying things out with \`klein dev make-tiny-model DIR\`.`;
}

/**
 * Detects and validates a model folder. Throws one `ModelFolderError` listing every missing or broken file.
 * `variant` overrides what the folder's configs and names say.
 */
export function openModelFolder(dir: string, opts: { variant?: VariantId } = {}): ModelFolder {
  const root = path.resolve(dir);
  if (!fs.existsSync(root)) {
    throw new ModelFolderError('model_not_found', `no model at ${root}. ${howToGet(root)}`, [root]);
  }
  if (!fs.statSync(root).isDirectory()) {
    throw new ModelFolderError('model_invalid', `${root} is a file; --model takes the model folder (HF layout with model_index.json, or a BFL checkpoint + ae.safetensors + text_encoder/)`);
  }
  const entries = fs.readdirSync(root);
  const f = new Findings(root);
  let found: Omit<ModelFolder, 'bytes'>;
  if (entries.includes('model_index.json')) found = detectDiffusers(root, f, opts.variant);
  else if (entries.some((e) => BFL_FILE_RE.test(e)) || entries.some((e) => AE_FILES.includes(e))) found = detectBfl(root, entries, f, opts.variant);
  else if (entries.length === 0 || entries.every((e) => e.endsWith('.part') || e.startsWith('.'))) {
    throw new ModelFolderError('model_not_found', `${root} holds no model yet. ${howToGet(root)}`, ['model_index.json']);
  } else {
    throw new ModelFolderError(
      'model_invalid',
      `${root} is not a FLUX.2 [klein] model folder: expected model_index.json (Hugging Face layout) or flux-2-klein-*.safetensors + ae.safetensors + text_encoder/ (BFL layout). ${howToGet(root)}`,
      ['model_index.json'],
    );
  }
  if (f.missing.length || f.broken.length) {
    const lines = [
      `model folder ${root} (${found.layout} layout, ${found.variant.id}) is incomplete:`,
      ...f.missing.map((m) => `  missing: ${m}`),
      ...f.broken.map((m) => `  broken:  ${m}`),
      howToGet(root, found.variant),
    ];
    throw new ModelFolderError('model_incomplete', lines.join('\n'), [...f.missing, ...f.broken]);
  }
  const all = [...found.transformer.files, ...found.vae.files, ...found.textEncoder.files];
  return { ...found, bytes: bytesOf(all) };
}

export interface InstalledModel {
  name: string;
  path: string;
  /** `matting`: BiRefNet weights for transparent backgrounds (`klein pull --matting`). */
  kind: 'klein' | 'matting';
  model?: ModelFolder;
  matting?: MattingFolder;
  error?: string;
}

/** Every folder under the models cache, valid or not (for `klein models`); matting weights are listed as such. */
export function listInstalledModels(): InstalledModel[] {
  const dir = modelsDir();
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir, { withFileTypes: true })
    .filter((e) => e.isDirectory() && !e.name.startsWith('.'))
    .map((e) => {
      const p = path.join(dir, e.name);
      const name = repoOfCacheDir(p) ?? e.name;
      try {
        return { name, path: p, kind: 'klein' as const, model: openModelFolder(p) };
      } catch (err) {
        // not a klein folder: it may be the matting weights
        if (err instanceof ModelFolderError && err.code === 'model_invalid') {
          try {
            return { name, path: p, kind: 'matting' as const, matting: openMattingFolder(p, 'cache') };
          } catch {
            // neither: report why it is no klein model
          }
        }
        return { name, path: p, kind: 'klein' as const, error: (err as Error).message };
      }
    });
}

/**
 * Which files of a Hub repository the pipeline needs: the HF layout's five folders and model_index.json, never
 * the duplicate BFL single-file checkpoint, README images or other formats. A repository without model_index.json
 * (BFL layout only) gets its klein checkpoint, ae.safetensors and text-encoder/tokenizer folders.
 */
export function filesToPull(paths: string[]): string[] {
  const wanted = /\.(json|safetensors|txt|jinja|model)$/;
  if (paths.includes('model_index.json')) {
    const dirs = ['transformer/', 'vae/', 'text_encoder/', 'tokenizer/', 'scheduler/'];
    return paths.filter((p) => p === 'model_index.json' || (dirs.some((d) => p.startsWith(d)) && wanted.test(p) && p.split('/').length === 2));
  }
  return paths.filter((p) => {
    const top = p.split('/');
    if (top.length === 1) return BFL_FILE_RE.test(p) || AE_FILES.includes(p);
    return (TE_FOLDERS.includes(top[0]) || top[0] === 'tokenizer') && top.length === 2 && wanted.test(p);
  });
}
