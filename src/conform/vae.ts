// Conformance of the FLUX.2 VAE against `vae/decode_case*.safetensors` and `vae/encode_case*.safetensors`, once
// with the BFL checkpoint as shipped in the golden folder and once with a diffusers-layout copy built from
// `diffusers_key_mapping_from_bfl.json` (the golden folder stores only the mapping, not a second weight copy).
// Outputs must match within 1e-4 · max(1, max|ref|); on a GPU device in fp16 (the default there) within
// VAE_FP16_FACTOR, and each line says fp16.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Checkpoint, readFloat32, readInt64, readUint8, writeSafetensors, type TensorToWrite } from '../weights/safetensors.ts';
import { kleinCacheRoot } from '../weights/weight-store.ts';
import type { VaeLayout } from '../models/vae/checkpoint.ts';
import { Flux2VAE } from '../models/vae/runtime.ts';
import { errorResult, findCases, GoldenCase, relResult } from './golden.ts';
import type { CaseResult, ConformComponent, ConformOptions } from './types.ts';

/**
 * Relative tolerance of the fp16 GPU path: ~3× the largest error measured on the golden cases (WebGPU on
 * lavapipe: decode image 1.19e-2, encode moments 1.27e-2, latent 9.5e-3; fp32 on the same device ~2e-6). It is
 * wider than the transformer's (FP16_FACTOR, 1e-2) because ORT's WebGPU Conv accumulates in fp16: one 3×3 conv
 * of fp16 operands is off by 3.5e-3 rms at 64 input channels and 9.8e-3 at 512 (output rounding alone: 2e-4).
 */
export const VAE_FP16_FACTOR = 4e-2;

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
  const fp16 = vae.computeDtype === 'fp16';
  const factor = fp16 ? VAE_FP16_FACTOR : 1e-4;
  const tag = `${layout}${fp16 ? ', fp16' : ''}`;
  for (const file of findCases(dir, /^decode_case.*\.safetensors$/)) {
    const c = new GoldenCase(file);
    const label = `vae/${c.name} (${tag})`;
    try {
      const r = await vae.decode(c.f32('z'), c.shape('z'), { tiling: 'never' });
      yield relResult(component, `${label} image`, r.image, c.f32('image'), factor);
    } catch (e) {
      yield errorResult(component, label, e);
    }
  }
  for (const file of findCases(dir, /^encode_case.*\.safetensors$/)) {
    const c = new GoldenCase(file);
    const label = `vae/${c.name} (${tag})`;
    try {
      const r = await vae.encode(c.f32('x'), c.shape('x'), { withMoments: true });
      const moments = r.moments!;
      const [b, ch, h, w] = r.momentsDims!;
      if (c.has('moments')) yield relResult(component, `${label} moments`, moments, c.f32('moments'), factor);
      if (c.has('mean')) {
        // the posterior mean is the first half of the moment channels
        const z = ch / 2;
        const mean = new Float32Array(b * z * h * w);
        for (let i = 0; i < b; i++) mean.set(moments.subarray(i * ch * h * w, (i * ch + z) * h * w), i * z * h * w);
        yield relResult(component, `${label} mean`, mean, c.f32('mean'), factor);
      }
      if (c.has('latent')) yield relResult(component, `${label} latent`, r.latent, c.f32('latent'), factor);
    } catch (e) {
      yield errorResult(component, label, e);
    }
  }
}

/**
 * The diffusers twin of the golden VAE, written once into the cache (keyed by the golden files' contents): its weight
 * store then stays valid from one run to the next instead of a new one per temporary copy.
 */
function diffusersCopy(model: string, mapping: string): string {
  const hash = crypto.createHash('sha256').update(fs.readFileSync(model)).update(fs.readFileSync(mapping)).digest('hex').slice(0, 16);
  const file = path.join(kleinCacheRoot(), 'conform', `vae-diffusers-${hash}`, 'diffusion_pytorch_model.safetensors');
  if (!fs.existsSync(file)) writeDiffusersVaeCopy(model, mapping, file); // writeSafetensors renames into place
  return file;
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
    const layouts: Array<[VaeLayout, string]> = [['bfl', model]];
    const mapping = path.join(dir, 'diffusers_key_mapping_from_bfl.json');
    if (fs.existsSync(mapping)) {
      try {
        layouts.push(['diffusers', diffusersCopy(model, mapping)]);
      } catch (e) {
        yield errorResult('vae', 'vae/diffusers layout copy', e);
      }
    }
    for (const [layout, file] of layouts) {
      let vae: Flux2VAE;
      try {
        vae = await Flux2VAE.load(file, { target: opts.target });
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
  },
};
