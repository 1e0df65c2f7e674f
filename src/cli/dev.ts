// `klein dev …`: developer tools. `make-tiny-model DIR` writes a random tiny model in the official HF layout, with
// tiny random matting weights in DIR/matting/ (transparent backgrounds).
import fs from 'node:fs';
import { Option, type Command } from 'commander';
import { writeTinyModel } from '../weights/tiny-model.ts';
import { UsageError } from './errors.ts';
import { parseIntOption } from './generate.ts';
import { fmtBytes } from './progress-bars.ts';

interface TinyCli {
  base?: boolean;
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

export function registerDev(program: Command): void {
  const dev = program.command('dev').description('developer tools');
  dev
    .command('make-tiny-model')
    .description('write a random tiny FLUX.2 [klein] model (HF layout, real Qwen3 tokenizer) for tests and trying the CLI/service')
    .argument('<dir>', 'output folder (created; must be empty unless --force)')
    .option('--base', 'a klein base variant (50 steps, CFG) instead of the distilled 4-step klein')
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
