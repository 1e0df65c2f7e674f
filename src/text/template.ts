// The FLUX.2 [klein] prompt template. The reference (BFL Qwen3Embedder, diffusers Flux2KleinPipeline) renders the
// Qwen3 chat template with one user turn, add_generation_prompt=True and enable_thinking=False; for a single user
// message that template reduces to the fixed string below. We render the checkpoint's own Jinja template when it
// ships one (so a tokenizer folder with a different template behaves like the reference would with it) and check
// once, at load, that it agrees with the fixed string klein was trained with.
import { Template } from '@huggingface/jinja';

/** `<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n` */
export function kleinTemplate(prompt: string): string {
  return `<|im_start|>user\n${prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n`;
}

/** Renders prompts through a HF `chat_template` exactly as `apply_chat_template(..., tokenize=False)` would. */
export class ChatTemplate {
  private readonly template: Template;

  constructor(source: string, private readonly specialTokens: Record<string, string | null> = {}) {
    this.template = new Template(source);
  }

  render(prompt: string): string {
    return this.template.render({
      messages: [{ role: 'user', content: prompt }],
      add_generation_prompt: true,
      enable_thinking: false,
      ...this.specialTokens,
    });
  }
}

/** Prompts used to check that a chat template renders the klein string (edge cases of the Qwen3 template). */
const PROBES = ['', 'a tiny red fox in the snow', '<think>x</think> y', '<tool_response>z</tool_response>', '  lead\n\ntrail  '];

/**
 * A prompt → templated-text function: the checkpoint's chat template when present (verified against the klein
 * string), else the fixed klein string. Throws when the shipped template renders something else, since klein's
 * transformer was trained on exactly this layout.
 */
export function promptRenderer(chatTemplate: string | undefined, specialTokens: Record<string, string | null> = {}): (prompt: string) => string {
  if (!chatTemplate) return kleinTemplate;
  const t = new ChatTemplate(chatTemplate, specialTokens);
  for (const p of PROBES) {
    const got = t.render(p);
    const want = kleinTemplate(p);
    if (got !== want) {
      throw new Error(`the tokenizer's chat_template renders ${JSON.stringify(got)} for the prompt ${JSON.stringify(p)}, not the FLUX.2 [klein] layout ${JSON.stringify(want)}`);
    }
  }
  return (p) => t.render(p);
}
