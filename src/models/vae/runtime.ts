// The FLUX.2 VAE at run time: the encoder and the decoder forward (forward.ts) each as one ORT session, opened on
// first use (the text-to-image path never encodes), with the weight policy of the target: fp32 on the CPU (an fp32
// checkpoint is read in place), fp32 or fp16 products on a GPU. Large images decode in tiles (tiling.ts).
import { UserError } from '../../errors.ts';
import { Graph } from '../../graph/onnx-graph.ts';
import { Layers } from '../../graph/nn/layers.ts';
import type { WeightPolicy } from '../../graph/nn/weight-policy.ts';
import { openGraphs, policyFor, type GraphSession } from '../../runtime/component.ts';
import type { Device } from '../../runtime/device.ts';
import { f32, type ort } from '../../runtime/session.ts';
import type { ExecutionTarget, GpuDtype } from '../../runtime/target.ts';
import { throwIfOverflowed } from '../../weights/compute-dtype.ts';
import { openVaeCheckpoint, type VaeLayout, type VaeWeights } from './checkpoint.ts';
import { latentChannels, vaeScale, type Flux2VaeConfig } from './config.ts';
import { buildVaeDecoder, buildVaeEncoder } from './forward.ts';
import { AUTO_TILE_ABOVE_PIXELS, decodeTiled, DEFAULT_MAX_TILE, DEFAULT_TILE_OVERLAP } from './tiling.ts';

export type VaeDirection = 'encoder' | 'decoder';

export interface VaeLoadOptions {
  target: ExecutionTarget;
  /** Open only one direction now (the other still opens on first use). Default: both. */
  only?: VaeDirection;
  /**
   * GPU devices: what the convolutions and attention products compute in, overriding the target's (the pipeline
   * passes fp32: ORT's WebGPU Conv accumulates in fp16). fp16 on the CPU is refused.
   */
  gpuDtype?: GpuDtype;
  /** First load of a checkpoint with a weight policy: after each weight is converted into the store. */
  onWeights?: (done: number, total: number, key: string) => void;
  /** Convert the weights again even if their store is valid (benchmarks of the first load). */
  rebuild?: boolean;
}

export interface DecodeOptions {
  /**
   * `'auto'` (default) decodes untiled up to AUTO_TILE_ABOVE_PIXELS output pixels and in tiles above; `'always'`
   * and `'never'` force it. Tiles have at most `maxTile` latent cells per side and overlap by at least `overlap`.
   */
  tiling?: 'auto' | 'always' | 'never';
  maxTile?: number;
  overlap?: number;
  /** Called after each tile with (done, total). */
  onTile?: (done: number, total: number) => void;
}

export interface EncodeResult {
  latent: Float32Array;
  /** [B, 4z, H/16, W/16] */
  dims: number[];
  moments?: Float32Array;
  momentsDims?: number[];
}

export class Flux2VAE {
  private readonly opened = new Map<VaeDirection, Promise<GraphSession>>();
  /** fp16: weights beyond ±65504 clamped when each direction's store was built. */
  private readonly overflows = new Map<VaeDirection, number>();

  private constructor(
    private readonly weights: VaeWeights,
    readonly target: ExecutionTarget,
    private readonly policy: WeightPolicy,
    private readonly opts: VaeLoadOptions,
  ) {}

  /** Opens the checkpoint (file or folder, BFL or diffusers layout) and the sessions `opts.only` asks for. */
  static async load(pathOrFolder: string, opts: VaeLoadOptions): Promise<Flux2VAE> {
    if (opts.gpuDtype === 'fp16' && opts.target.device === 'cpu') throw new UserError('fp16 compute needs a GPU device (--device webgpu or cuda); the CPU computes in fp32', 'unsupported_target');
    const vae = new Flux2VAE(openVaeCheckpoint(pathOrFolder), opts.target, policyFor(opts.target, { gpuDtype: opts.gpuDtype }), opts);
    try {
      if (opts.only !== 'decoder') await vae.open('encoder');
      if (opts.only !== 'encoder') await vae.open('decoder');
    } catch (e) {
      await vae.close();
      throw e;
    }
    return vae;
  }

  get config(): Flux2VaeConfig {
    return this.weights.config;
  }

  get layout(): VaeLayout {
    return this.weights.layout;
  }

  get device(): Device {
    return this.target.device;
  }

  /** What the convolutions and attention products compute in (fp32 on the CPU). */
  get computeDtype(): 'fp32' | 'fp16' {
    return this.policy.dtype === 'fp16' ? 'fp16' : 'fp32';
  }

  /** Pixels per latent cell side (16 for FLUX.2). */
  get scale(): number {
    return vaeScale(this.config);
  }

  /** Weight values beyond fp16's range, clamped to ±65504 in the open sessions' weights (fp16 only). */
  get fp16Overflows(): number {
    return [...this.overflows.values()].reduce((a, b) => a + b, 0);
  }

  private open(direction: VaeDirection): Promise<GraphSession> {
    let o = this.opened.get(direction);
    if (!o) {
      o = this.build(direction);
      this.opened.set(direction, o);
      o.catch(() => this.opened.delete(direction));
    }
    return o;
  }

  private async build(direction: VaeDirection): Promise<GraphSession> {
    const g = new Graph(`flux2-vae-${direction}`);
    (direction === 'encoder' ? buildVaeEncoder : buildVaeDecoder)(new Layers({ g, weights: this.weights, policy: this.policy }), this.config);
    const { store, sessions } = await openGraphs([g], { name: `flux2-vae-${direction}`, target: this.target, policy: this.policy, onWeights: this.opts.onWeights, rebuild: this.opts.rebuild });
    this.overflows.set(direction, store.stats.fp16Overflows);
    return sessions[0];
  }

  private async run(direction: VaeDirection, input: string, data: Float32Array, dims: number[]): Promise<Record<string, ort.Tensor>> {
    const session = await this.open(direction);
    return session.run(new Map([[input, f32(data, dims)]]), { uploads: 0, downloads: 0 });
  }

  /** `image` NCHW in [-1, 1], H and W multiples of 16 → normalised patchified latent [B, 128, H/16, W/16]. */
  async encode(image: Float32Array, dims: readonly number[], opts: { withMoments?: boolean } = {}): Promise<EncodeResult> {
    const [b, c, hh, ww] = dims;
    if (dims.length !== 4 || c !== this.config.inChannels) throw new RangeError(`VAE encode expects [B, ${this.config.inChannels}, H, W], got [${dims.join(', ')}]`);
    if (hh % this.scale || ww % this.scale || hh === 0 || ww === 0) throw new RangeError(`VAE encode needs H and W to be positive multiples of ${this.scale}, got ${hh}×${ww}`);
    if (image.length !== b * c * hh * ww) throw new RangeError(`image has ${image.length} values, dims [${dims.join(', ')}] need ${b * c * hh * ww}`);
    const r = await this.run('encoder', 'image', image, [...dims]);
    const out: EncodeResult = { latent: this.checkFinite(r.latent.data as Float32Array, 'encoder'), dims: [...r.latent.dims] };
    if (opts.withMoments) {
      out.moments = this.checkFinite(r.moments.data as Float32Array, 'encoder');
      out.momentsDims = [...r.moments.dims];
    }
    return out;
  }

  /** Normalised latent [B, 128, h, w] → image [B, 3, 16h, 16w] (unclamped), tiled for large sizes. */
  async decode(latent: Float32Array, dims: readonly number[], opts: DecodeOptions = {}): Promise<{ image: Float32Array; dims: number[] }> {
    const [b, c, h, w] = dims;
    const C = latentChannels(this.config);
    if (dims.length !== 4 || c !== C) throw new RangeError(`VAE decode expects [B, ${C}, h, w], got [${dims.join(', ')}]`);
    if (latent.length !== b * c * h * w) throw new RangeError(`latent has ${latent.length} values, dims [${dims.join(', ')}] need ${b * c * h * w}`);
    const maxTile = opts.maxTile ?? DEFAULT_MAX_TILE;
    const tiling = opts.tiling ?? 'auto';
    const big = h * w * this.scale * this.scale > AUTO_TILE_ABOVE_PIXELS;
    if (tiling === 'never' || (tiling === 'auto' && !big) || (h <= maxTile && w <= maxTile)) {
      const r = await this.run('decoder', 'latent', latent, [...dims]);
      opts.onTile?.(1, 1);
      return { image: this.checkFinite(r.image.data as Float32Array, 'decoder'), dims: [...r.image.dims] };
    }
    const untiled = async (lat: Float32Array, d: number[]) => this.checkFinite((await this.run('decoder', 'latent', lat, d)).image.data as Float32Array, 'decoder');
    return decodeTiled(untiled, latent, dims, { maxTile, overlap: opts.overlap ?? DEFAULT_TILE_OVERLAP, scale: this.scale, outChannels: this.config.outChannels, onTile: opts.onTile });
  }

  /**
   * fp16: the inputs of conv_in, the shortcut and upsample convs are the un-normalised residual stream, so an
   * overflow is possible; an Inf/NaN image is refused with a message naming fp32 rather than handed on.
   */
  private checkFinite(out: Float32Array, direction: VaeDirection): Float32Array {
    return this.computeDtype === 'fp16' ? throwIfOverflowed(out, `flux2 VAE: the fp16 ${direction}`) : out;
  }

  async close(): Promise<void> {
    const opened = [...this.opened.values()];
    this.opened.clear();
    const settled = await Promise.allSettled(opened);
    await Promise.all(settled.map((s) => (s.status === 'fulfilled' ? s.value.release() : undefined)));
  }
}
