// `klein generate "prompt" -o out.png` and the option handling it shares with `klein edit`.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Option, type Command } from 'commander';
import { ImageInputError } from '../pipeline/images.ts';
import { KleinPipeline } from '../pipeline/pipeline.ts';
import { DEFAULT_PRESET, LIMITS, PRESET_NAMES, SIZE_PRESETS, parseSizeSpec } from '../pipeline/limits.ts';
import { ALPHA_FORMATS, PipelineInputError, checkSize } from '../pipeline/request.ts';
import type { Background, GenerateRequest, OutputFormat, ProgressEvent } from '../pipeline/types.ts';
import { MattingModelError } from '../weights/matting-folder.ts';
import { ModelFolderError, isVariantId, type VariantId } from '../weights/model-folder.ts';
import { UserError } from '../errors.ts';
import { UsageError } from './errors.ts';
import { parseIntOption, parseNumberOption } from './option-parsers.ts';
import { DEVICE_HELP, GPU_DTYPE_HELP, MEMORY_LIMIT_HELP, CPU_DEFAULT_PRECISION, IMAGE_PRECISION_HELP, defaultPrecisionNote, describeTarget, memoryLimitFromFlag, targetFromFlags } from './target-options.ts';
import { stageBar, type StageBar } from './progress-bars.ts';
import { LORA_DIR_HELP, LORA_HELP, parseLoraOptions, resolveLoraOptions } from './lora-options.ts';

export interface ImageCliOptions {
  output?: string;
  model?: string;
  variant?: string;
  size?: string;
  width?: string;
  height?: string;
  seed?: string;
  steps?: string;
  guidance?: string;
  format?: string;
  quality?: string;
  numImages: string;
  keepLoaded?: boolean;
  device?: string;
  threads?: string;
  background?: Background;
  mattingModel?: string;
  precision?: string;
  gpuDtype?: string;
  memoryLimit?: string;
  lora?: string[];
  loraDir?: string;
  json?: boolean;
  quiet?: boolean;
}

/** The options `generate` and `edit` share. */
export function addImageOptions(cmd: Command, defaultOutput: string): Command {
  return cmd
    .option('-o, --output <file>', `output file; with --num-images > 1, NAME-1.EXT, NAME-2.EXT, … (default ${defaultOutput}.<format>)`)
    .option('-m, --model <folder|repo>', 'model folder or Hub repo id in the cache (default: $KLEIN_MODEL or black-forest-labs/FLUX.2-klein-4B)')
    .addOption(new Option('--variant <id>', 'override the detected variant').choices(['klein-4b', 'klein-9b', 'klein-base-4b', 'klein-base-9b']))
    .option('-s, --size <preset|WxH>', `image size: ${PRESET_NAMES.join(', ')}, or WIDTHxHEIGHT`)
    .option('-W, --width <px>', 'width in pixels (multiple of 16, ≥ 64)')
    .option('-H, --height <px>', 'height in pixels (multiple of 16, ≥ 64)')
    .option('--seed <n>', 'random seed (default: random, printed); image i of a batch uses seed + i')
    .option('--steps <n>', `sampling steps, 1–${LIMITS.maxSteps} (default: 4 for klein, 50 for klein base)`)
    .option('--guidance <g>', 'CFG scale for klein base (default 4.0); ignored by the distilled klein')
    .addOption(new Option('-f, --format <fmt>', 'png, jpeg or webp (default: from the output name, else png)').choices(['png', 'jpeg', 'jpg', 'webp']))
    .option('--quality <q>', 'JPEG/WebP quality 1–100 (default 90)')
    .option('-n, --num-images <n>', `images in one batch, 1–${LIMITS.maxImages}`, '1')
    .option('--keep-loaded', 'keep every model component in memory instead of loading one at a time (refused when they do not fit together)')
    .option('--device <device>', `${DEVICE_HELP}; on a GPU every component stays loaded`)
    .option('--threads <n>', 'CPU threads (default: all cores)')
    .addOption(new Option('--background <mode>', 'transparent: cut the subject out into an RGBA PNG/WebP with the matting model (see `klein pull --matting`); auto (default) = opaque').choices(['auto', 'opaque', 'transparent']))
    .option('--matting-model <folder>', 'BiRefNet weights for --background transparent (default: $KLEIN_MATTING_MODEL, the model folder\'s matting/, or the pulled ZhengPeng7/BiRefNet-matting)')
    .option('--precision <mode>', IMAGE_PRECISION_HELP)
    .option('--gpu-dtype <dtype>', GPU_DTYPE_HELP)
    .option('--memory-limit <size>', MEMORY_LIMIT_HELP)
    .option('--lora <FILE_OR_HUB_REF[:SCALE]>', LORA_HELP, (v: string, prev: string[] = []) => [...prev, v])
    .option('--lora-dir <folder>', LORA_DIR_HELP)
    .option('--json', 'print the result as JSON on stdout')
    .option('-q, --quiet', 'no progress output');
}

const EXT_FORMAT: Record<string, OutputFormat> = { '.png': 'png', '.jpg': 'jpeg', '.jpeg': 'jpeg', '.webp': 'webp' };

export function resolveFormat(output: string | undefined, format: string | undefined): OutputFormat {
  const fromFlag = format === 'jpg' ? 'jpeg' : (format as OutputFormat | undefined);
  const ext = output ? path.extname(output).toLowerCase() : '';
  const fromExt = EXT_FORMAT[ext];
  if (output && ext && !fromExt) throw new UsageError(`cannot tell the format of "${output}": use a .png, .jpg or .webp name, or --format`);
  if (fromFlag && fromExt && fromFlag !== fromExt) throw new UsageError(`--format ${format} contradicts the output name ${output} (${fromExt})`);
  return fromFlag ?? fromExt ?? 'png';
}

/** `--size` / `--width` / `--height` → a checked size; `fallback` when none is given. */
export function resolveSize(opts: ImageCliOptions, fallback: { width: number; height: number }): { width: number; height: number } {
  let size = { ...fallback };
  if (opts.size) {
    const named = parseSizeSpec(opts.size);
    if (!named) throw new UsageError(`unknown --size "${opts.size}": use ${PRESET_NAMES.join(', ')} or WIDTHxHEIGHT`);
    size = named;
  }
  const w = parseIntOption(opts.width, '--width');
  const h = parseIntOption(opts.height, '--height');
  if (w !== undefined) size.width = w;
  if (h !== undefined) size.height = h;
  try {
    checkSize(size.width, size.height);
  } catch (e) {
    throw new UsageError((e as Error).message.replace(/^width/, '--width').replace(/^height/, '--height'));
  }
  return size;
}

export function outputPaths(output: string, count: number): string[] {
  if (count === 1) return [output];
  const ext = path.extname(output);
  const stem = output.slice(0, output.length - ext.length);
  return Array.from({ length: count }, (_, i) => `${stem}-${i + 1}${ext}`);
}

function progressPrinter(bar: StageBar): (e: ProgressEvent) => void {
  return (e) => {
    switch (e.stage) {
      case 'load':
        bar.stage(`load ${e.message ?? ''}`.trim(), 1);
        break;
      case 'text':
        bar.stage('encode text', 1);
        break;
      case 'reference':
        bar.stage('encode refs', 1);
        break;
      case 'denoise':
        if (e.step === 0) bar.stage('denoise', e.total ?? 1, 'steps');
        else bar.update(e.step ?? 0);
        break;
      case 'decode':
        if (e.step === 1) bar.stage('decode', e.total ?? 1, 'images');
        bar.update(e.step ?? 0);
        break;
      case 'matting':
        if (e.step === 1) bar.stage('matting', e.total ?? 1, 'images');
        bar.update(e.step ?? 0);
        break;
      case 'output':
        bar.stage('write', 1);
        break;
    }
  };
}

/** Maps the engine's typed input errors to exit code 2. */
function asUsage(e: unknown): never {
  if (e instanceof UserError) throw e;
  if (e instanceof PipelineInputError || e instanceof ImageInputError || e instanceof ModelFolderError || e instanceof MattingModelError) throw new UsageError(e.message);
  throw e;
}

/** Everything of generate/edit after the command-specific parts: validate, run, write files, report. */
export async function runImageCommand(prompt: string, opts: ImageCliOptions, refs: { paths: string[]; bytes: Uint8Array[] }, defaultSize: { width: number; height: number }, defaultOutput: string): Promise<void> {
  const numImages = parseIntOption(opts.numImages, '--num-images')!;
  if (numImages < 1 || numImages > LIMITS.maxImages) throw new UsageError(`--num-images must be 1 to ${LIMITS.maxImages}, got ${numImages}`);
  const seed = parseIntOption(opts.seed, '--seed') ?? crypto.randomInt(0, 2 ** 32);
  if (seed > LIMITS.maxSeed) throw new UsageError(`--seed must be at most ${LIMITS.maxSeed}`);
  const steps = parseIntOption(opts.steps, '--steps');
  const guidance = parseNumberOption(opts.guidance, '--guidance');
  const quality = parseIntOption(opts.quality, '--quality');
  const memoryLimit = memoryLimitFromFlag(opts.memoryLimit);
  const format = resolveFormat(opts.output, opts.format);
  // checked before anything loads, and never answered by switching the format
  if (opts.background === 'transparent' && !ALPHA_FORMATS.includes(format)) {
    throw new UsageError(`--background transparent needs a PNG or WebP output (${format.toUpperCase()} has no alpha channel): name the file .png or .webp, or pass --format png`);
  }
  if (opts.mattingModel && !fs.existsSync(opts.mattingModel)) throw new UsageError(`--matting-model ${opts.mattingModel} does not exist`);
  const size = resolveSize(opts, defaultSize);
  const output = opts.output ?? `${defaultOutput}.${format === 'jpeg' ? 'jpg' : format}`;
  const dir = path.dirname(path.resolve(output));
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new UsageError(`output folder ${dir} does not exist`);
  if (opts.variant && !isVariantId(opts.variant)) throw new UsageError(`unknown --variant ${opts.variant}`);
  const loraSpecs = parseLoraOptions(opts.lora);
  const target = await targetFromFlags(opts, { cpuPrecision: CPU_DEFAULT_PRECISION });
  const { device, precision } = target;
  const gpuDtype = device === 'cpu' ? undefined : target.gpuDtype;
  const note = defaultPrecisionNote(opts, target);
  if (note && !opts.quiet) process.stderr.write(`klein: ${precision} precision on ${describeTarget(target)}${note}\n`);

  const bar = stageBar({ quiet: opts.quiet || undefined });
  let pipeline: KleinPipeline | undefined;
  try {
    pipeline = await KleinPipeline.open({ model: opts.model, variant: opts.variant as VariantId | undefined, target, keepLoaded: opts.keepLoaded ?? false, memoryLimit, mattingModel: opts.mattingModel }).catch(asUsage);
    const { loras, resolved } = await resolveLoraOptions(loraSpecs, pipeline.transformerConfig, opts.loraDir);
    const req: GenerateRequest = { prompt, width: size.width, height: size.height, seed, numImages, steps, guidance, outputFormat: format, quality, referenceImages: refs.bytes.length ? refs.bytes : undefined, background: opts.background, ...(loras.length ? { loras } : {}) };
    const ac = new AbortController();
    const onSigint = () => ac.abort(new Error('interrupted'));
    process.once('SIGINT', onSigint);
    const result = await pipeline.generate(req, { onProgress: progressPrinter(bar), signal: ac.signal }).catch(asUsage).finally(() => process.off('SIGINT', onSigint));
    bar.stop();
    const files = outputPaths(output, result.images.length);
    result.images.forEach((im, i) => fs.writeFileSync(files[i], im.data));
    if (result.promptTruncated && !opts.json) process.stderr.write('klein: warning: the prompt is longer than 512 tokens; its end was cut off\n');
    if (opts.json) {
      console.log(
        JSON.stringify({
          images: result.images.map((im, i) => ({ path: path.resolve(files[i]), width: im.width, height: im.height, content_type: im.contentType, bytes: im.data.length, seed: seed + i, has_alpha: im.hasAlpha ?? false })),
          seed,
          model: pipeline.model.root,
          variant: pipeline.variant.id,
          precision,
          device,
          ...(gpuDtype ? { gpu_dtype: gpuDtype } : {}),
          component_dtypes: pipeline.componentDtypes(),
          steps: steps ?? pipeline.variant.defaultSteps,
          background: opts.background ?? 'auto',
          timings: result.timings,
          prompt_truncated: result.promptTruncated ?? false,
          references: refs.paths,
          loras: resolved.map((l, i) => ({ ref: l.ref, scale: loras[i].scale, file: l.file, sha256: l.sha256 })),
        }),
      );
    } else {
      for (const [i, f] of files.entries()) console.log(`${f} (${result.images[i].width}×${result.images[i].height}, seed ${seed + i})`);
      if (!opts.quiet) process.stderr.write(`klein: ${result.timings.total.toFixed(1)} s (${Object.entries(result.timings).filter(([k]) => k !== 'total').map(([k, v]) => `${k} ${v.toFixed(1)}`).join(', ')})\n`);
    }
  } finally {
    bar.stop();
    await pipeline?.close();
  }
}

export function registerGenerate(program: Command): void {
  const cmd = program
    .command('generate')
    .description('text to image: writes the image(s) for PROMPT')
    .argument('<prompt>', 'what to draw');
  addImageOptions(cmd, 'klein').action(async (prompt: string, opts: ImageCliOptions) => {
    // fal's default image_size, landscape_4_3
    await runImageCommand(prompt, opts, { paths: [], bytes: [] }, SIZE_PRESETS[DEFAULT_PRESET], 'klein');
  });
}
