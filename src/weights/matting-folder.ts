// Where the matting model (BiRefNet, for transparent backgrounds) lives and whether a folder holds readable weights.
//
// A matting folder is what `klein pull ZhengPeng7/BiRefNet-matting` leaves: `model.safetensors` (the official key
// layout, any BiRefNet geometry) and the repo's config.json. It is looked up, first match wins:
//   1. `PipelineOptions.mattingModel` / `--matting-model` (a folder or a .safetensors file),
//   2. `$KLEIN_MATTING_MODEL`,
//   3. `matting/` inside the klein model folder (what `klein dev make-tiny-model` writes, so a tiny model folder is
//      self-contained and its random matting weights can never be picked up for a real model),
//   4. the pulled default in the model cache (`$KLEIN_HOME/models/ZhengPeng7--BiRefNet-matting`).
// Only files are checked here: the safetensors headers parse, they carry the Swin backbone's patch embedding (what
// tells a BiRefNet checkpoint from other weights), config.json's `klein_input_size` is valid. The geometry and the
// model input are the model's business (models/birefnet/config.ts); pipeline/matting-model.ts joins the two.
import fs from 'node:fs';
import path from 'node:path';
import { Checkpoint } from './safetensors.ts';
import { modelCacheDir } from './cache-dirs.ts';

/** The default matting weights: BiRefNet trained for soft alpha (hair, fur), 1024² input, MIT licence. */
export const DEFAULT_MATTING_REPO = 'ZhengPeng7/BiRefNet-matting';
/** Folder name of a matting model bundled inside a klein model folder. */
export const BUNDLED_MATTING_DIR = 'matting';
/** The command that installs the default matting weights (quoted in every "missing" error). */
export const MATTING_PULL_COMMAND = 'klein pull --matting';

export type MattingSource = 'option' | 'env' | 'model folder' | 'cache';

/** A model input as config.json's `klein_input_size` may set it: a side, `[height, width]` or `'dynamic'`. */
export type ConfiguredInputSize = number | [number, number] | 'dynamic';

export interface MattingFolder {
  /** The folder (or file) handed to the model's loader. */
  path: string;
  source: MattingSource;
  /** The .safetensors files of the checkpoint (shards included). */
  files: string[];
  bytes: number;
  /** config.json's `klein_input_size`, when the folder sets one (checked: multiples of 32). */
  configuredInputSize?: ConfiguredInputSize;
}

/**
 * Why no usable matting model was found. `matting_model_missing`: nothing installed (the message names the pull
 * command; a server answers 503); `matting_model_invalid`: a configured path that holds no BiRefNet checkpoint.
 */
export class MattingModelError extends Error {
  override name = 'MattingModelError';
  constructor(
    readonly code: 'matting_model_missing' | 'matting_model_invalid',
    message: string,
  ) {
    super(message);
  }
}

/** `klein_input_size` in the folder's config.json: a side, `[height, width]` or `"dynamic"` (checked). */
function configuredInputSize(dir: string): ConfiguredInputSize | undefined {
  const file = path.join(dir, 'config.json');
  if (!fs.existsSync(file)) return undefined;
  let v: unknown;
  try {
    v = (JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>).klein_input_size;
  } catch (e) {
    throw new MattingModelError('matting_model_invalid', `${file} is not valid JSON: ${(e as Error).message}`);
  }
  if (v === undefined) return undefined;
  const ok32 = (n: unknown) => Number.isInteger(n) && (n as number) > 0 && (n as number) % 32 === 0;
  if (v === 'dynamic' || ok32(v)) return v as ConfiguredInputSize;
  if (Array.isArray(v) && v.length === 2 && v.every(ok32)) return [v[0], v[1]];
  throw new MattingModelError('matting_model_invalid', `${file}: klein_input_size must be a positive multiple of 32, [height, width] or "dynamic", got ${JSON.stringify(v)}`);
}

/** A tensor every BiRefNet checkpoint has (maybe behind DataParallel / torch.compile prefixes). */
const SIGNATURE_TENSOR = 'bb.patch_embed.proj.weight';

/** Checks that `p` (folder or .safetensors file) holds readable BiRefNet-like weights and a valid config.json. */
export function openMattingFolder(p: string, source: MattingSource = 'option'): MattingFolder {
  const abs = path.resolve(p);
  if (!fs.existsSync(abs)) throw new MattingModelError('matting_model_invalid', `no matting model at ${abs}. Install the default one with \`${MATTING_PULL_COMMAND}\`.`);
  let ckpt: Checkpoint;
  try {
    ckpt = Checkpoint.open(abs);
  } catch (e) {
    throw invalidMattingWeights(abs, (e as Error).message);
  }
  if (!ckpt.names.some((n) => n === SIGNATURE_TENSOR || n.endsWith(`.${SIGNATURE_TENSOR}`))) throw invalidMattingWeights(abs, `no tensor ${SIGNATURE_TENSOR}`);
  const dir = fs.statSync(abs).isDirectory() ? abs : path.dirname(abs);
  const files = ckpt.files.map((f) => f.file);
  const bytes = files.reduce((n, f) => n + fs.statSync(f).size, 0);
  return { path: abs, source, files, bytes, configuredInputSize: configuredInputSize(dir) };
}

/** The error for a configured path whose weights are not BiRefNet matting weights (unreadable, or another model). */
export function invalidMattingWeights(p: string, why: string): MattingModelError {
  return new MattingModelError('matting_model_invalid', `${p} does not hold BiRefNet matting weights (${why}). Install the default ones with \`${MATTING_PULL_COMMAND}\`.`);
}

/** A folder counts as installed once its weights are complete (an interrupted pull leaves only `.part` files). */
function hasWeights(dir: string): boolean {
  return fs.existsSync(dir) && fs.statSync(dir).isDirectory() && fs.readdirSync(dir).some((e) => e.endsWith('.safetensors'));
}

/** The default cache folder of the matting weights (`klein pull --matting` writes there). */
export function defaultMattingDir(): string {
  return modelCacheDir(DEFAULT_MATTING_REPO);
}

/**
 * The matting model to use, in the order of the module comment. `explicit` is `PipelineOptions.mattingModel`,
 * `modelRoot` the klein model folder. Throws `MattingModelError` naming the pull command when none is installed.
 */
export function findMattingModel(opts: { explicit?: string; modelRoot?: string } = {}): MattingFolder {
  if (opts.explicit) return openMattingFolder(opts.explicit, 'option');
  const env = process.env.KLEIN_MATTING_MODEL;
  if (env) return openMattingFolder(env, 'env');
  if (opts.modelRoot) {
    const bundled = path.join(opts.modelRoot, BUNDLED_MATTING_DIR);
    if (hasWeights(bundled)) return openMattingFolder(bundled, 'model folder');
  }
  const cached = defaultMattingDir();
  if (hasWeights(cached)) return openMattingFolder(cached, 'cache');
  throw new MattingModelError(
    'matting_model_missing',
    `a transparent background needs the matting model (${DEFAULT_MATTING_REPO}, about 0.9 GB), which is not installed. ` +
      `Run \`${MATTING_PULL_COMMAND}\` to download it into ${cached}, or point $KLEIN_MATTING_MODEL (or --matting-model) at a BiRefNet folder.`,
  );
}

/**
 * Whether a Hub listing is a BiRefNet repository (the reference ships `birefnet.py` and `BiRefNet_config.py`
 * beside its weights; RMBG-2.0 does too), so `klein pull owner/BiRefNet-…` works without `--matting`.
 */
export function isMattingListing(paths: string[]): boolean {
  return paths.some((p) => !p.includes('/') && /birefnet.*\.py$/i.test(p)) && paths.some((p) => !p.includes('/') && p.endsWith('.safetensors'));
}

/** The files of a matting repository the pipeline needs: the top-level safetensors weights and config.json. */
export function mattingFilesToPull(paths: string[]): string[] {
  return paths.filter((p) => !p.includes('/') && (p.endsWith('.safetensors') || p.endsWith('.safetensors.index.json') || p === 'config.json'));
}
