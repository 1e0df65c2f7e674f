// `klein bench hf-folder [DIR]`: random weights of the real klein 4B shapes in the official Hugging Face layout
// (transformer/, text_encoder/ with all 36 Qwen3-4B layers in two shards, vae/, tokenizer/, scheduler/): the one
// folder that klein (`bench pipeline --model DIR`) and antirez flux2.c (`./flux -d DIR`, which opens the two text
// encoder shards by name) both read, for side-by-side figures. ~16 GB; written once.
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { KLEIN_4B, type Flux2Config } from '../src/models/flux2/config.ts';
import { FLUX2_VAE_CONFIG, type Flux2VaeConfig } from '../src/models/vae/config.ts';
import { parseQwen3Config } from '../src/models/qwen3/config.ts';
import { writeRandomFlux2Checkpoint } from '../src/fixtures/flux2.ts';
import { writeRandomVaeCheckpoint } from '../src/fixtures/vae.ts';
import { QWEN3_4B_CONFIG, lazyRandomBf16, qwen3LayerRecipe, xorshift } from '../src/fixtures/qwen3.ts';
import { copyQwen3Tokenizer, writeDiffusersConfigs } from '../src/fixtures/tiny-model.ts';
import { writeSafetensors, type TensorToWrite } from '../src/weights/safetensors.ts';
import { benchCacheDir } from './util.ts';

export interface HfFolderShapes {
  transformer: Flux2Config;
  vae: Flux2VaeConfig;
  /** HF config.json of the Qwen3 text encoder. */
  textEncoder: Record<string, unknown>;
}

const KLEIN_4B_SHAPES: HfFolderShapes = { transformer: KLEIN_4B, vae: FLUX2_VAE_CONFIG, textEncoder: QWEN3_4B_CONFIG };

/** Writes the folder (bf16 weights; seeds: transformer 1, VAE 3, text encoder 4); `log` hears each part. */
export function writeHfFolder(dir: string, shapes: HfFolderShapes = KLEIN_4B_SHAPES, log: (s: string) => void = () => {}): void {
  writeDiffusersConfigs(dir, { seed: 1, variant: 'klein-4b', tcfg: shapes.transformer, vcfg: shapes.vae, note: 'random weights of real shapes for benchmarks; images are noise' });
  copyQwen3Tokenizer(path.join(dir, 'tokenizer'));
  writeRandomVaeCheckpoint(path.join(dir, 'vae', 'diffusion_pytorch_model.safetensors'), shapes.vae, { layout: 'diffusers', dtype: 'BF16', seed: 3 });
  log('vae/');
  writeTextEncoderTwoShards(path.join(dir, 'text_encoder'), shapes.textEncoder, log);
  writeRandomFlux2Checkpoint(path.join(dir, 'transformer', 'diffusion_pytorch_model.safetensors'), shapes.transformer, { layout: 'diffusers', dtype: 'BF16', seed: 1 });
  log('transformer/');
}

/** Every layer, the embeddings with the first ⌈layers·5/9⌉ layers and the final norm with the rest, as Qwen3-4B ships. */
function writeTextEncoderTwoShards(dir: string, config: Record<string, unknown>, log: (s: string) => void): void {
  const cfg = parseQwen3Config(config);
  const next = xorshift(4);
  const split = Math.ceil((cfg.numHiddenLayers * 5) / 9);
  const shards: Array<Record<string, TensorToWrite>> = [{ 'model.embed_tokens.weight': lazyRandomBf16([cfg.vocabSize, cfg.hiddenSize], next, -2) }, {}];
  for (let l = 0; l < cfg.numHiddenLayers; l++) {
    for (const [name, shape, exp, signed] of qwen3LayerRecipe(cfg, l)) shards[l < split ? 0 : 1][name] = lazyRandomBf16(shape, next, exp, signed);
  }
  shards[1]['model.norm.weight'] = lazyRandomBf16([cfg.hiddenSize], next, -1, false);
  fs.mkdirSync(dir, { recursive: true });
  const weightMap: Record<string, string> = {};
  shards.forEach((tensors, i) => {
    const name = `model-0000${i + 1}-of-00002.safetensors`;
    writeSafetensors(path.join(dir, name), tensors, { format: 'pt' });
    for (const k of Object.keys(tensors)) weightMap[k] = name;
    log(`text_encoder/${name}`);
  });
  fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { random_seed: 4 }, weight_map: weightMap }, null, 1));
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...config, bos_token_id: 151643, eos_token_id: 151645 }, null, 2));
}

export function registerHfFolderBench(bench: Command): void {
  bench
    .command('hf-folder [dir]')
    .description('write random real-size klein 4B weights in the Hugging Face layout (~16 GB, once) for side-by-side benchmarks with other programs')
    .action((dir: string | undefined) => {
      const folder = path.resolve(dir ?? benchCacheDir('hf-klein4b-random'));
      const done = path.join(folder, '.complete');
      if (fs.existsSync(done)) return console.log(`${folder} is already written`);
      const t0 = performance.now();
      writeHfFolder(folder, KLEIN_4B_SHAPES, (part) => console.log(`  ${part} written after ${((performance.now() - t0) / 1000).toFixed(1)} s`));
      fs.writeFileSync(done, '');
      console.log(folder);
    });
}
