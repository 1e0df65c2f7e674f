// BiRefNet at run time: the forward built for each input size it meets (static shapes, see forward.ts), always
// exact — fp32 products on the CPU and on GPUs, whatever the target's GPU dtype — over one weight store (an fp32
// checkpoint is hard-linked in place, nothing converted). Pre- and post-processing of images is the pipeline's
// (pipeline/matting-model.ts); this class takes and returns model-resolution tensors.
import { Graph } from '../../graph/onnx-graph.ts';
import { Layers } from '../../graph/nn/layers.ts';
import { openGraphs, policyFor, type GraphSession } from '../../runtime/component.ts';
import { f32 } from '../../runtime/session.ts';
import type { ExecutionTarget } from '../../runtime/target.ts';
import { openBiRefNetCheckpoint, type BiRefNetWeights } from './checkpoint.ts';
import { BiRefNetError, defaultInputSize, fixedInputSize, type BiRefNetConfig, type InputSize } from './config.ts';
import { buildBiRefNetForward } from './forward.ts';

export interface BiRefNetLoadOptions {
  target: ExecutionTarget;
  /** Default: 2048 when the path names an `HR` checkpoint, `'dynamic'` when it names a `dynamic` one, else 1024. */
  inputSize?: InputSize;
  /** Also output the `dbg.*` intermediates (bug hunting, conformance). */
  debug?: boolean;
  /** First load of a checkpoint that needs converting (an fp16/bf16 one): after each weight. */
  onWeights?: (done: number, total: number, key: string) => void;
  /** Build the weight store again even if it is valid (benchmarks of the first load). */
  rebuild?: boolean;
}

export interface BiRefNetOutput {
  /** `[1, 1, H, W]` logits at model resolution. */
  logits: Float32Array;
  /** `sigmoid(logits)`, same shape. */
  alpha: Float32Array;
  /** `dbg.*` intermediates when loaded with `debug`. */
  debug: Record<string, Float32Array>;
}

const round32 = (n: number) => Math.max(32, Math.round(n / 32) * 32);

export class BiRefNet {
  private readonly sessions = new Map<string, Promise<GraphSession>>();

  private constructor(
    readonly weights: BiRefNetWeights,
    readonly config: BiRefNetConfig,
    readonly inputSize: InputSize,
    private readonly opts: BiRefNetLoadOptions,
  ) {}

  /** Opens a checkpoint (file, folder or sharded index) and, for a fixed input size, compiles its graph. */
  static async load(folderOrFile: string, opts: BiRefNetLoadOptions): Promise<BiRefNet> {
    const { weights, config } = openBiRefNetCheckpoint(folderOrFile); // fails fast on a foreign checkpoint
    const inputSize = opts.inputSize ?? defaultInputSize(folderOrFile);
    const model = new BiRefNet(weights, config, inputSize, opts);
    if (inputSize !== 'dynamic') await model.session(...fixedInputSize(inputSize));
    return model;
  }

  /** Model input `[height, width]` for a source image of `w`×`h`. */
  modelSize(w: number, h: number): [number, number] {
    return this.inputSize === 'dynamic' ? [round32(h), round32(w)] : fixedInputSize(this.inputSize);
  }

  private session(h: number, w: number): Promise<GraphSession> {
    const key = `${h}x${w}`;
    let s = this.sessions.get(key);
    if (!s) {
      s = this.open(h, w);
      s.catch(() => this.sessions.delete(key));
      this.sessions.set(key, s);
    }
    return s;
  }

  private async open(h: number, w: number): Promise<GraphSession> {
    const { target, debug, onWeights, rebuild } = this.opts;
    const policy = policyFor(target, { gpuDtype: 'fp32' });
    const g = new Graph(`birefnet-${h}x${w}${debug ? '-debug' : ''}`);
    buildBiRefNetForward(new Layers({ g, weights: this.weights, policy }), this.config, [h, w], { debug });
    const { sessions } = await openGraphs([g], { name: 'birefnet', target, policy, onWeights, rebuild });
    return sessions[0];
  }

  /** Runs the network on a normalised `[1, 3, h, w]` input (h, w multiples of 32). */
  async run(input: Float32Array, h: number, w: number): Promise<BiRefNetOutput> {
    if (input.length !== 3 * h * w) throw new BiRefNetError(`input holds ${input.length} values, expected 1×3×${h}×${w}`);
    const session = await this.session(h, w);
    const r = await session.run(new Map([['input', f32(input, [1, 3, h, w])]]), { uploads: 0, downloads: 0 });
    const debug: Record<string, Float32Array> = {};
    for (const [name, t] of Object.entries(r)) if (name.startsWith('dbg.')) debug[name] = t.data as Float32Array;
    return { logits: r.logits.data as Float32Array, alpha: r.alpha.data as Float32Array, debug };
  }

  async close(): Promise<void> {
    const open = [...this.sessions.values()];
    this.sessions.clear();
    for (const s of open) await (await s.catch(() => null))?.release();
  }
}
