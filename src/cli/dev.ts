// `klein dev …`: developer tools. `make-tiny-model DIR` writes a random tiny model in the official HF layout, with
// tiny random matting weights in DIR/matting/ (transparent backgrounds); `make-tiny-lora MODEL DIR` writes tiny random
// LoRAs for that model in every LoRA file format klein reads.
import fs from 'node:fs';
import { Option, type Command } from 'commander';
import { Flux2CheckpointError, openFlux2Checkpoint } from '../models/flux2/checkpoint.ts';
import { TINY_LORA_FORMATS, writeTinyLoras, type TinyLoraFormat } from '../fixtures/lora.ts';
import { SafetensorsError } from '../weights/safetensors.ts';
import { VARIANTS, type VariantId } from '../weights/model-folder.ts';
import { writeTinyModel } from '../fixtures/tiny-model.ts';
import { UsageError } from './errors.ts';
import { parseIntOption } from './option-parsers.ts';
import { fmtBytes } from './progress-bars.ts';

interface TinyCli {
  base?: boolean;
  variant?: VariantId;
  seed: string;
  hidden: string;
  depth: string;
  singleDepth: string;
  textHidden: string;
  vaeChannels: string;
  layout: 'diffusers' | 'bfl';
  force?: boolean;
  matting: boolean;
}

interface TinyLoraCli {
  format: string[];
  seed: string;
  rank?: string;
  alpha?: string;
  force?: boolean;
}

export function registerDev(program: Command): void {
  const dev = program.command('dev').description('developer tools');
  registerMakeTinyLora(dev);
  dev
    .command('make-tiny-model')
    .description('write a random tiny FLUX.2 [klein] model (HF layout, real Qwen3 tokenizer) for tests and trying the CLI/service')
    .argument('<dir>', 'output folder (created; must be empty unless --force)')
    .option('--base', 'a klein base variant (50 steps, CFG) instead of the distilled 4-step klein')
    .addOption(new Option('--variant <id>', 'the variant the folder names (tiny weights whatever it says; 9B needs --layout bfl)').choices(Object.keys(VARIANTS)))
    .option('--seed <n>', 'weights seed', '0')
    .option('--hidden <n>', 'transformer width (multiple of 32)', '64')
    .option('--depth <n>', 'double-stream blocks', '1')
    .option('--single-depth <n>', 'single-stream blocks', '1')
    .option('--text-hidden <n>', 'text-encoder hidden size (multiple of 16)', '32')
    .option('--vae-channels <n>', 'VAE base channels (multiple of 32)', '32')
    .addOption(new Option('--layout <layout>', 'diffusers (HF repo) or bfl (single files)').choices(['diffusers', 'bfl']).default('diffusers'))
    .option('--force', 'write into a non-empty folder')
    .option('--no-matting', 'leave out the tiny matting model (DIR/matting/) that --background transparent uses')
    .action(async (dir: string, o: TinyCli) => {
      if (fs.existsSync(dir) && !fs.statSync(dir).isDirectory()) throw new UsageError(`${dir} is a file`);
      if (fs.existsSync(dir) && fs.readdirSync(dir).length > 0 && !o.force) throw new UsageError(`${dir} is not empty (use --force to write into it)`);
      const n = (v: string, name: string) => parseIntOption(v, name)!;
      try {
        const info = writeTinyModel(dir, {
          base: o.base,
          variant: o.variant,
          seed: n(o.seed, '--seed'),
          hidden: n(o.hidden, '--hidden'),
          depth: n(o.depth, '--depth'),
          singleDepth: n(o.singleDepth, '--single-depth'),
          textHidden: n(o.textHidden, '--text-hidden'),
          vaeChannels: n(o.vaeChannels, '--vae-channels'),
          layout: o.layout,
          matting: o.matting,
        });
        console.log(`wrote a random tiny ${info.variant} model (${o.layout} layout, ${fmtBytes(info.bytes)}) to ${info.dir}${o.matting ? ', with a tiny matting model in matting/' : ''}`);
      } catch (e) {
        if (e instanceof RangeError) throw new UsageError(e.message);
        throw e;
      }
    });
}

function registerMakeTinyLora(dev: Command): void {
  dev
    .command('make-tiny-lora')
    .description('write tiny random LoRAs for a (tiny) model, one file per LoRA format klein reads, for tests and trying --lora')
    .argument('<model>', 'model folder or transformer checkpoint the LoRAs are shaped for (e.g. one made by make-tiny-model)')
    .argument('<dir>', 'output folder (created; must not hold these files unless --force)')
    .addOption(new Option('--format <name...>', 'formats to write').choices([...TINY_LORA_FORMATS]).default([...TINY_LORA_FORMATS]))
    .option('--seed <n>', 'weights seed', '0')
    .option('--rank <n>', 'rank of every module (default: each format its own, with some modules at another rank)')
    .option('--alpha <x>', 'alpha stored by the formats that store one (default: each format its own)')
    .option('--force', 'overwrite existing files')
    .action(async (model: string, dir: string, o: TinyLoraCli) => {
      let config;
      try {
        config = openFlux2Checkpoint(model).config;
      } catch (e) {
        if (e instanceof Flux2CheckpointError || e instanceof SafetensorsError) throw new UsageError(e.message);
        throw e;
      }
      const rank = o.rank === undefined ? undefined : parseIntOption(o.rank, '--rank')!;
      if (rank !== undefined && rank < 1) throw new UsageError('--rank must be at least 1');
      const alpha = o.alpha === undefined ? undefined : Number(o.alpha);
      if (alpha !== undefined && !(Number.isFinite(alpha) && alpha > 0)) throw new UsageError(`--alpha must be a positive number, got ${o.alpha}`);
      const formats = o.format as TinyLoraFormat[];
      if (fs.existsSync(dir) && !fs.statSync(dir).isDirectory()) throw new UsageError(`${dir} is a file`);
      const clash = formats.filter((f) => fs.existsSync(`${dir}/${f}.safetensors`));
      if (clash.length && !o.force) throw new UsageError(`${dir} already holds ${clash.map((f) => `${f}.safetensors`).join(', ')} (use --force to overwrite)`);
      fs.mkdirSync(dir, { recursive: true });
      const written = writeTinyLoras(dir, config, { formats, seed: parseIntOption(o.seed, '--seed')!, rank, alpha });
      for (const l of written) console.log(`${l.format.padEnd(11)} ${l.file}  (${l.modules} modules, rank ${l.rank}, alpha ${l.alpha})`);
      console.log(`wrote ${written.length} tiny random LoRA(s) for a ${config.hiddenSize}-wide model with ${config.depth} double and ${config.depthSingleBlocks} single blocks`);
    });
}
