// The FLUX.2 VAE's fp16 path on GPU devices (webgpu, cuda): how its convolutions and the attention's 1×1
// projections are written when they compute in fp16, and the weight bytes ORT gets for them.
//
// Every weight reaches ORT as bytes converted in JS once at load and handed over as in-memory external data
// (`Graph.inMemoryWeight` + SessionConfig.externalData): ORT cannot mix in-memory and on-disk external data in one
// session, so the fp32 ones (GroupNorm affine, BatchNorm statistics) travel the same way. The Conv/MatMul weights
// and biases are fp16 (round-to-nearest-even, clamped to ±65504 and counted, graph/compute-dtype.ts), so the
// device holds no fp32 copy of them.
//
// What computes in fp16: the convolutions and the attention's q/k/v/proj_out products (with their biases). What
// stays fp32, as the reference needs: activations between ops, the GroupNorm statistics and affine, swish, the
// nearest upsample, the residual adds, attention itself (softmax included), and the latent BatchNorm
// (de)normalisation and patchify. Each product casts its input to fp16 right before it (once per input, however
// many products read it: q, k and v share one cast, a resnet's conv1 and nin_shortcut share the block input's) and
// its output back to fp32 right after.
import { Graph, type Value } from '../graph/onnx-graph.ts';
import { deviceWeightBytes } from '../graph/compute-dtype.ts';
import { readFloat32, type TensorInfo } from '../weights/safetensors.ts';

const FLOAT = 1;
const FLOAT16 = 10;

interface MemoryWeight {
  location: string;
  info: TensorInfo;
  /** fp16 bytes (clamped) instead of fp32. */
  half: boolean;
  /** A 1×1 projection's [out, in] (or [out, in, 1, 1]) weight, stored transposed [in, out] for `MatMul(x, Wᵀ)`. */
  transpose?: boolean;
}

/** Builds the fp16 products of one VAE graph and keeps the list of weights whose bytes its session needs. */
export class VaeHalfGraph {
  private readonly weights = new Map<string, MemoryWeight & { value: Value }>();
  private readonly halves = new Map<string, Value>();

  constructor(readonly g: Graph) {}

  /** A weight as an fp32 initializer (norm affine, BN statistics). */
  f32(info: TensorInfo): Value {
    return this.memory(info, false);
  }

  /** `x` (fp32) as fp16, cast once however many products read it. */
  half(x: Value): Value {
    let h = this.halves.get(x.name);
    if (!h) {
      h = this.g.op('Cast', [x], { to: FLOAT16 }, { hint: 'to_fp16' });
      this.halves.set(x.name, h);
    }
    return h;
  }

  /** Conv on fp16 operands (weight and bias fp16), its output back to fp32. */
  conv(x: Value, weight: TensorInfo, bias: TensorInfo, attrs: { kernel_shape: number[]; strides: number[]; pads: number[] }, hint: string): Value {
    const y = this.g.op('Conv', [this.half(x), this.memory(weight, true), this.memory(bias, true)], attrs, { hint });
    return this.g.op('Cast', [y], { to: FLOAT }, { hint: 'to_fp32' });
  }

  /** A 1×1 projection over tokens [B, N, C]: `x Wᵀ + b` with Wᵀ transposed at load, in fp16, back to fp32. */
  linear(x: Value, weight: TensorInfo, bias: TensorInfo, hint: string): Value {
    const y = this.g.op('Add', [this.g.op('MatMul', [this.half(x), this.memory(weight, true, true)]), this.memory(bias, true)], {}, { hint });
    return this.g.op('Cast', [y], { to: FLOAT }, { hint: 'to_fp32' });
  }

  private memory(info: TensorInfo, half: boolean, transpose = false): Value {
    const location = `flux2-vae-mem/${info.name}${transpose ? '.T' : ''}${half ? '.f16' : ''}`;
    const known = this.weights.get(location);
    if (known) return known.value;
    const dims = transpose ? [info.shape[1], info.shape[0]] : info.shape;
    const value = this.g.inMemoryWeight(location.slice('flux2-vae-mem/'.length), half ? 'float16' : 'float32', dims, location);
    this.weights.set(location, { location, info, half, transpose, value });
    return value;
  }

  /**
   * The bytes of every weight the graph declared, for the session's `externalData`; `stats.fp16Overflows` counts
   * the values clamped to ±65504. Converted per call: the session copies them, so they need not outlive it.
   */
  externalData(stats: { fp16Overflows: number }): Array<{ path: string; data: Uint8Array }> {
    return [...this.weights.values()].map((w) => ({ path: w.location, data: weightBytes(w, stats) }));
  }
}

function weightBytes(w: MemoryWeight, stats: { fp16Overflows: number }): Uint8Array {
  return deviceWeightBytes(readFloat32(w.info), { fp16: w.half, transpose: w.transpose ? [w.info.shape[0], w.info.shape[1]] : undefined }, stats);
}
