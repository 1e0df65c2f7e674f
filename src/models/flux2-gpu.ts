// The GPU side of the FLUX.2 transformer: how its Linears are built on a GPU device (the dtype rules and the weight
// conversion are in graph/compute-dtype.ts), and the bookkeeping of host↔device transfers between its stage sessions.
//
// On a GPU device every Linear is a plain `MatMul(x, Wᵀ)` with Wᵀ transposed once in JS: ORT's WebGPU provider has
// no FusedMatMul kernel, and with the CPU graph's FusedMatMul(transB) every Linear silently ran on the CPU provider
// (measured: 102 of the tiny model's nodes, all its Linears, placed on CPUExecutionProvider). In fp16 the weights
// are handed to ORT as fp16 (no fp32 copy anywhere) and the MatMul runs on fp16 operands; everything between the
// Linears stays fp32 (LayerNorm/RMSNorm statistics, modulation, RoPE, attention's softmax, the gated residual
// adds), so a stage casts an activation to fp16 right before its Linear and the product back to fp32 after it.
import type { Device } from '../graph/device.ts';

/** Host↔device copies of one forward between its stage sessions (GPU devices; zero on the CPU). */
export interface HostTransfers {
  /** Host tensors fed to a stage session on the device: the forward's own inputs. */
  uploads: number;
  /** Stage outputs returned to the host: with device-resident I/O only the final `output`. */
  downloads: number;
}

/**
 * Whether stage outputs can stay in device memory and be fed to the next stage as they are. onnxruntime-node 1.30
 * binds `preferredOutputLocation: 'gpu-buffer'` to WebGPU buffers only (its binding knows no CUDA memory type), so
 * CUDA keeps the host round trip. `KLEIN_DEVICE_IO=host` turns it off (to compare, or to rule it out in a bug).
 */
export function deviceResidentIO(device: Device): boolean {
  return device === 'webgpu' && process.env.KLEIN_DEVICE_IO !== 'host';
}
