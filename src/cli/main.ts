// The `klein` command line. Each command lives in its own module and registers itself here.
import { Command, CommanderError } from 'commander';
import { EXIT_INTERNAL, EXIT_USAGE } from './errors.ts';
import { UserError } from '../errors.ts';
import { registerConform } from './conform.ts';
import { registerBench } from './bench.ts';
import { registerDevices } from './devices.ts';
import { registerPull } from './pull.ts';
import { registerModels } from './models.ts';
import { registerGenerate } from './generate.ts';
import { registerEdit } from './edit.ts';
import { registerDev } from './dev.ts';
import { registerServe } from './serve.ts';
import { registerWorker } from './worker.ts';
import { registerKeys } from './keys.ts';
import { registerMcp } from './mcp.ts';

export function buildProgram(): Command {
  const program = new Command('klein')
    .description('FLUX.2 [klein] image generation: engine, CLI and service')
    .version('0.1.0')
    .showHelpAfterError()
    .exitOverride();
  registerConform(program);
  registerDevices(program);
  registerPull(program);
  registerModels(program);
  registerGenerate(program);
  registerEdit(program);
  registerDev(program);
  registerServe(program);
  registerWorker(program);
  registerKeys(program);
  registerMcp(program);
  const bench = registerBench(program);
  void bench;
  return program;
}

export async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      // help and version exit 0; parse errors were already printed by commander
      process.exitCode = e.exitCode === 0 ? 0 : EXIT_USAGE;
      return;
    }
    if (e instanceof UserError) {
      console.error(`klein: ${e.message}`);
      process.exitCode = EXIT_USAGE;
      return;
    }
    console.error(`klein: internal error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    process.exitCode = EXIT_INTERNAL;
  }
}
