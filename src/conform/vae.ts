// Conformance of the FLUX.2 VAE against `vae/decode_case*.safetensors` and `vae/encode_case*.safetensors`, once
// with the BFL checkpoint as shipped in the golden folder and once with a diffusers-layout copy built from
// `diffusers_key_mapping_from_bfl.json` (the golden folder stores only the mapping, not a second weight copy).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Checkpoint, readFloat32, readInt64, readUint8, writeSafetensors, type TensorToWrite } from '../weights/safetensors.ts';
import { Flux2VAE, type VaeLayout } from '../models/flux2-vae.ts';
import { errorResult, findCases, GoldenCase, relResult } from './golden.ts';
import type { CaseResult, ConformComponent, ConformOptions } from './types.ts';

interface MappingEntry {
  from: string;
  op: string;
}

/**
 * Writes the diffusers-layout twin of a BFL VAE checkpoint by following the converter's mapping file: renamed
 * tensors copied as they are, 1×1-conv attention weights reshaped [C, C, 1, 1] → [C, C].
 */
export function writeDiffusersVaeCopy(bflFile: string, mappingFile: string, outFile: string): void {
  const mapping = JSON.parse(fs.readFileSync(mappingFile, 'utf8')) as Record<string, MappingEntry>;
  const src = Checkpoint.open(bflFile);
  const tensors: Record<string, TensorToWrite> = {};
  for (const [name, { from, op }] of Object.entries(mapping)) {
    const info = src.info(from);
    let shape = info.shape;
    if (op.startsWith('reshape')) {
      const m = op.match(/->\s*\[([\d,\s]+)\]/);
      if (!m) throw new Error(`cannot parse mapping op "${op}" for ${name}`);
      shape = m[1].split(',').map((d) => Number(d.trim()));
    } else if (op !== 'identity') {
      throw new Error(`unknown mapping op "${op}" for ${name}`);
    }
    const data = info.dtype === 'I64' ? readInt64(info) : info.dtype === 'U8' ? readUint8(info) : readFloat32(info);
    tensors[name] = { dtype: info.dtype === 'I64' || info.dtype === 'U8' ? info.dtype : 'F32', shape, data };
  }
  writeSafetensors(outFile, tensors);
}

async function* runCases(component: string, vae: Flux2VAE, layout: VaeLayout, dir: string): AsyncIterable<CaseResult> {
  for (const file of findCases(dir, /^decode_case.*\.safetensors$/)) {
    const c = new GoldenCase(file);
    const label = `vae/${c.name} (${layout})`;
    try {
      const r = await vae.decode(c.f32('z'), c.shape('z'), { tiling: 'never' });
      yield relResult(component, `${label} image`, r.image, c.f32('image'));
    } catch (e) {
      yield errorResult(component, label, e);
    }
  }
  for (const file of findCases(dir, /^encode_case.*\.safetensors$/)) {
    const c = new GoldenCase(file);
    const label = `vae/${c.name} (${layout})`;
    try {
      const r = await vae.encode(c.f32('x'), c.shape('x'), { withMoments: true });
      const moments = r.moments!;
      const [b, ch, h, w] = r.momentsDims!;
      if (c.has('moments')) yield relResult(component, `${label} moments`, moments, c.f32('moments'));
      if (c.has('mean')) {
        // the posterior mean is the first half of the moment channels
        const z = ch / 2;
        const mean = new Float32Array(b * z * h * w);
        for (let i = 0; i < b; i++) mean.set(moments.subarray(i * ch * h * w, (i * ch + z) * h * w), i * z * h * w);
        yield relResult(component, `${label} mean`, mean, c.f32('mean'));
      }
      if (c.has('latent')) yield relResult(component, `${label} latent`, r.latent, c.f32('latent'));
    } catch (e) {
      yield errorResult(component, label, e);
    }
  }
}

export const vaeComponent: ConformComponent = {
  name: 'vae',
  async *run(goldenDir: string, opts: ConformOptions): AsyncIterable<CaseResult> {
    const dir = path.join(goldenDir, 'vae');
    const model = path.join(dir, 'model.safetensors');
    const hasCases = findCases(dir, /^(de|en)code_case.*\.safetensors$/).length > 0;
    if (!hasCases) return;
    if (!fs.existsSync(model)) {
      yield errorResult('vae', 'vae/model.safetensors', new Error('missing'));
      return;
    }
    // The compiled graph must sit beside its weights and the golden folder is read-only: work on copies.
    const work = fs.mkdtempSync(path.join(os.tmpdir(), 'klein-conform-vae-'));
    try {
      const layouts: Array<[VaeLayout, string]> = [];
      const bfl = path.join(work, 'bfl', 'ae.safetensors');
      fs.mkdirSync(path.dirname(bfl));
      fs.copyFileSync(model, bfl);
      layouts.push(['bfl', bfl]);
      const mapping = path.join(dir, 'diffusers_key_mapping_from_bfl.json');
      if (fs.existsSync(mapping)) {
        const df = path.join(work, 'diffusers', 'diffusion_pytorch_model.safetensors');
        try {
          writeDiffusersVaeCopy(model, mapping, df);
          layouts.push(['diffusers', df]);
        } catch (e) {
          yield errorResult('vae', 'vae/diffusers layout copy', e);
        }
      }
      for (const [layout, file] of layouts) {
        let vae: Flux2VAE;
        try {
          vae = await Flux2VAE.load(file, { device: opts.device });
          if (vae.layout !== layout) throw new Error(`detected ${vae.layout} layout, expected ${layout}`);
        } catch (e) {
          yield errorResult('vae', `vae/model (${layout})`, e);
          continue;
        }
        try {
          yield* runCases('vae', vae, layout, dir);
        } finally {
          await vae.close();
        }
      }
    } finally {
      fs.rmSync(work, { recursive: true, force: true });
    }
  },
};
