import type { Command } from 'commander';
import { registerTextEncoderBench } from '../../bench/text-encoder.ts';
import { registerMattingBench } from '../../bench/matting.ts';
import { registerVaeBench } from '../../bench/vae.ts';
import { registerTransformerBench } from '../../bench/transformer.ts';
import { registerApiBench } from '../../bench/api.ts';
import { registerPipelineBench } from '../../bench/pipeline.ts';
import { registerLoadBench } from '../../bench/load.ts';
import { registerInt8SchemesBench } from '../../bench/int8-schemes.ts';
import { registerHfFolderBench } from '../../bench/hf-folder.ts';

/**
 * `klein bench STAGE`: each stage registers its own subcommand with its options; see bench/*.ts.
 * Every bench prints one figure per line and ends with a machine-readable last line.
 */
export function registerBench(program: Command): Command {
  const bench = program.command('bench').description('measure speed and memory of one stage (prints figures, never asserts)');
  registerTextEncoderBench(bench);
  registerMattingBench(bench);
  registerVaeBench(bench);
  registerTransformerBench(bench);
  registerApiBench(bench);
  registerPipelineBench(bench);
  registerLoadBench(bench);
  registerInt8SchemesBench(bench);
  registerHfFolderBench(bench);
  return bench;
}
