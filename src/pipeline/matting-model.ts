// The matting model as the pipeline uses it: a located matting folder (weights/matting-folder.ts) joined with the
// model's own reading of its weights (geometry, default input size), and BiRefNet wrapped with the reference's
// image route — Pillow resize and ImageNet normalisation in, sigmoid matte resized back to the source size out.
import { openBiRefNetCheckpoint } from '../models/birefnet/checkpoint.ts';
import { defaultInputSize, geometryOf, type BiRefNetConfig, type BiRefNetGeometry, type InputSize } from '../models/birefnet/config.ts';
import { BiRefNet, type BiRefNetLoadOptions, type BiRefNetOutput } from '../models/birefnet/runtime.ts';
import { findMattingModel, invalidMattingWeights, type MattingFolder } from '../weights/matting-folder.ts';
import { floatNchwToUint8, normalizeImage, pilResize, resizeBilinearAlignCorners } from './image-resize.ts';
import { MattingError, type MattingModel } from './matting.ts';

/** A matting folder with what the model reads off its weights. */
export interface MattingModelInfo extends MattingFolder {
  config: BiRefNetConfig;
  geometry: BiRefNetGeometry;
  /** config.json's `klein_input_size`, else 2048² for HR checkpoints, the image's size for `_dynamic`, else 1024². */
  inputSize: InputSize;
}

/** Reads the geometry of a located folder; weights that are no complete BiRefNet are `matting_model_invalid`. */
export function inspectMattingFolder(f: MattingFolder): MattingModelInfo {
  let config: BiRefNetConfig;
  try {
    config = openBiRefNetCheckpoint(f.path).config;
  } catch (e) {
    throw invalidMattingWeights(f.path, (e as Error).message);
  }
  return { ...f, config, geometry: geometryOf(config), inputSize: f.configuredInputSize ?? defaultInputSize(f.path) };
}

/**
 * The matting model to use and its geometry (safetensors headers only): `findMattingModel`'s order, and a
 * `MattingModelError` naming the pull command when none is installed or the weights are no BiRefNet.
 */
export function resolveMattingModel(where: { explicit?: string; modelRoot?: string }): MattingModelInfo {
  return inspectMattingFolder(findMattingModel(where));
}

/** BiRefNet on 8-bit (or float) images of any size: the transparent-background step's `MattingModel`. */
export class MattingPredictor implements MattingModel {
  private constructor(readonly net: BiRefNet) {}

  static async load(folderOrFile: string, opts: BiRefNetLoadOptions): Promise<MattingPredictor> {
    return new MattingPredictor(await BiRefNet.load(folderOrFile, opts));
  }

  /** Resize to the model input (Pillow bilinear) and normalise: the exact model input, NCHW. */
  preprocess(image: Uint8Array, w: number, h: number, channels = 3): { input: Float32Array; h: number; w: number } {
    const [mh, mw] = this.net.modelSize(w, h);
    const resized = pilResize(image, w, h, channels, mw, mh);
    return { input: normalizeImage(resized, mw, mh, channels), h: mh, w: mw };
  }

  /** The network on a normalised model-size input (see `BiRefNet.run`). */
  run(input: Float32Array, h: number, w: number): Promise<BiRefNetOutput> {
    return this.net.run(input, h, w);
  }

  /**
   * The alpha matte of an image, `h`×`w` values in [0, 1]. `image` is 8-bit RGB(A) HWC, or float RGB NCHW in
   * [0, 1] (quantised to 8 bits first, as the reference only ever sees PIL images). The matte comes back at the
   * source size by bilinear (align_corners) resizing of `sigmoid(logits)`, the reference repo's eval route.
   */
  async predict(image: Uint8Array | Float32Array, w: number, h: number): Promise<Float32Array> {
    if (!Number.isInteger(w) || !Number.isInteger(h) || w <= 0 || h <= 0) throw new MattingError(`bad image size ${w}×${h}`);
    let rgb: Uint8Array;
    let channels = 3;
    if (image instanceof Float32Array) {
      if (image.length !== 3 * w * h) throw new MattingError(`float image holds ${image.length} values, expected 3×${h}×${w} (NCHW)`);
      rgb = floatNchwToUint8(image, w, h);
    } else {
      channels = image.length / (w * h);
      if (channels !== 3 && channels !== 4) throw new MattingError(`image buffer holds ${image.length} bytes, expected ${w}×${h}×3 (RGB) or ×4 (RGBA)`);
      rgb = image;
    }
    const pre = this.preprocess(rgb, w, h, channels);
    const { alpha } = await this.net.run(pre.input, pre.h, pre.w);
    return resizeBilinearAlignCorners(alpha, pre.w, pre.h, w, h);
  }

  close(): Promise<void> {
    return this.net.close();
  }
}
