// `klein edit -i a.png [-i b.png …] "make it night" -o out.png`: image editing with 1–4 reference images.
import fs from 'node:fs';
import type { Command } from 'commander';
import { ImageInputError, probeImage } from '../pipeline/images.ts';
import { LIMITS, sizeFromReference } from '../pipeline/limits.ts';
import { UsageError } from './errors.ts';
import { addImageOptions, runImageCommand, type ImageCliOptions } from './generate.ts';

interface EditCliOptions extends ImageCliOptions {
  image: string[];
}

/** Default output size: the first reference's, as the API sizes an edit without image_size. */
async function sizeOfFirstReference(bytes: Uint8Array): Promise<{ width: number; height: number }> {
  const p = await probeImage(bytes);
  return sizeFromReference(p.width, p.height);
}

export function registerEdit(program: Command): void {
  const cmd = program
    .command('edit')
    .description('edit or combine 1–4 reference images as PROMPT says (output size: the first image\'s, unless given)')
    .argument('<prompt>', 'the edit to make')
    .option('-i, --image <file>', 'reference image (PNG, JPEG or WebP); repeat for up to 4', (v: string, prev: string[] = []) => [...prev, v]);
  addImageOptions(cmd, 'klein-edit').action(async (prompt: string, opts: EditCliOptions) => {
    const paths = opts.image ?? [];
    if (paths.length === 0) throw new UsageError('edit needs at least one reference image: -i FILE');
    if (paths.length > LIMITS.maxRefs) throw new UsageError(`at most ${LIMITS.maxRefs} reference images, got ${paths.length}`);
    const bytes = paths.map((p) => {
      if (!fs.existsSync(p) || !fs.statSync(p).isFile()) throw new UsageError(`reference image not found: ${p}`);
      return new Uint8Array(fs.readFileSync(p));
    });
    let size: { width: number; height: number };
    try {
      size = await sizeOfFirstReference(bytes[0]);
    } catch (e) {
      if (e instanceof ImageInputError) throw new UsageError(`${paths[0]}: ${e.message}`);
      throw e;
    }
    await runImageCommand(prompt, opts, { paths, bytes }, size, 'klein-edit');
  });
}
