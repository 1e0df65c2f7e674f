// Transparent backgrounds (`background: "transparent"`): klein paints RGB only, so the alpha comes after the VAE
// decode from a matting model (BiRefNet) and the foreground colours at soft edges are recovered (matting.ts).
// This module holds the two pieces around that: the prompt conditioning that makes the subject easy to cut out,
// and the matting model as a pipeline component (opened lazily, released after its stage on the CPU).
import type { ExecutionTarget } from '../runtime/target.ts';
import { cutout } from './matting.ts';
import { MattingPredictor, resolveMattingModel, type MattingModelInfo } from './matting-model.ts';
import type { RgbImage, RgbaImage } from './images.ts';

export { MattingModelError } from '../weights/matting-folder.ts';

/**
 * Appended to the prompt of a transparent request. A matting model separates a subject from a plain, evenly lit
 * backdrop far better than from a busy scene, and light grey keeps both dark and white subjects distinct from it.
 */
export const TRANSPARENT_PROMPT_HINT = 'a single subject, centred and isolated on a plain uniform light-grey studio background, soft even lighting';

// Diffusion models answer "transparent background" with a painted checkerboard, so backdrop wording is taken out;
// "transparent" on its own stays (a transparent glass vase is a subject, not a background).
const BACKDROP_WORDS = [
  /\b(?:on|with|against|over|in front of)?\s*(?:a|an|the)?\s*(?:transparent|see-through|no|alpha|checker(?:ed|board)?)\s+(?:background|backdrop|bg)\b/gi,
  /\b(?:as\s+)?(?:an?\s+)?transparent\s+png(?:\s+of)?\b/gi,
  /\bbackground\s+removed\b/gi,
];

/**
 * The prompt klein sees for a transparent request: the user's prompt without backdrop wording that would paint a
 * checkerboard, then `TRANSPARENT_PROMPT_HINT`. Deterministic, so the prompt cache keys on the result.
 */
export function transparentPrompt(prompt: string): string {
  let p = prompt;
  for (const re of BACKDROP_WORDS) p = p.replace(re, ' ');
  p = p
    .replace(/\s+([,.;:!?])/g, '$1')
    .replace(/([,;:])(?:\s*[,;:])+/g, '$1')
    .replace(/\s{2,}/g, ' ')
    .trim()
    .replace(/^[,;:.\s]+|[,;:.\s]+$/g, '');
  return p ? `${p}, ${TRANSPARENT_PROMPT_HINT}` : TRANSPARENT_PROMPT_HINT;
}

/** The prompt the text encoder gets for a resolved background. */
export function promptForBackground(prompt: string, background: 'opaque' | 'transparent'): string {
  return background === 'transparent' ? transparentPrompt(prompt) : prompt;
}

/**
 * The matting model as a pipeline component: where its weights are is settled up front (`resolve`, cheap: the
 * safetensors header), the graph is built and loaded only when the matting stage runs. It computes in fp32 on
 * every device.
 */
export class MattingComponent {
  private folder?: MattingModelInfo;
  private model?: MattingPredictor;

  constructor(private readonly where: { explicit?: string; modelRoot?: string }) {}

  /** Finds the weights (throws `MattingModelError` naming the pull command); remembered once found. */
  resolve(): MattingModelInfo {
    this.folder ??= resolveMattingModel(this.where);
    return this.folder;
  }

  get loaded(): boolean {
    return this.model !== undefined;
  }

  async load(target: ExecutionTarget): Promise<MattingPredictor> {
    const f = this.resolve();
    this.model ??= await MattingPredictor.load(f.path, { target, inputSize: f.inputSize });
    return this.model;
  }

  /** Straight RGBA of one decoded image: matte, foreground colours at the edges, RGB 0 where alpha is 0. */
  async cutout(img: RgbImage, target: ExecutionTarget): Promise<RgbaImage> {
    const model = await this.load(target);
    const { rgba } = await cutout(model, img.data, img.width, img.height);
    return { data: rgba, width: img.width, height: img.height, channels: 4 };
  }

  async close(): Promise<void> {
    await this.model?.close();
    this.model = undefined;
  }
}
