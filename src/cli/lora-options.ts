// `--lora FILE_OR_HUB_REF[:SCALE]` (repeatable) on `klein generate` and `klein edit`: a local file (anywhere, or
// relative to `--lora-dir` / $KLEIN_LORA_DIR), an https URL (SSRF-guarded, size-capped) or a Hub reference
// `owner/name[/file.safetensors]`; downloads are cached by sha256 (service/lora-fetch.ts). Every file is checked
// against the model before the generation starts; a LoraError exits 2.
import type { Flux2Config } from '../models/flux2/config.ts';
import { checkLora } from '../models/flux2/lora/load.ts';
import { LIMITS } from '../pipeline/limits.ts';
import type { LoraRequest } from '../pipeline/types.ts';
import { parseLoraSpec, resolveLora, type ResolvedLora } from '../service/lora-fetch.ts';
import { UsageError } from './errors.ts';

export const LORA_HELP = `apply a LoRA: a .safetensors file, an https URL or a Hub reference owner/name[/file.safetensors], with an optional :SCALE (default 1, -${LIMITS.maxLoraScale}…${LIMITS.maxLoraScale}); repeat for up to ${LIMITS.maxLoras}`;
export const LORA_DIR_HELP = 'folder relative --lora paths are looked up in (default: $KLEIN_LORA_DIR)';

/** The `--lora` values checked for syntax only (before anything loads). */
export function parseLoraOptions(values: readonly string[] | undefined): Array<{ ref: string; scale: number }> {
  const specs = (values ?? []).map(parseLoraSpec);
  if (specs.length > LIMITS.maxLoras) throw new UsageError(`at most ${LIMITS.maxLoras} --lora, got ${specs.length}`);
  return specs;
}

/** Finds (downloads) each LoRA and checks it against the model: the pipeline's `loras`, and what they were. */
export async function resolveLoraOptions(specs: ReadonlyArray<{ ref: string; scale: number }>, cfg: Flux2Config, loraDir = process.env.KLEIN_LORA_DIR): Promise<{ loras: LoraRequest[]; resolved: ResolvedLora[] }> {
  const resolved: ResolvedLora[] = [];
  for (const s of specs) {
    resolved.push(
      await resolveLora(s.ref, {
        anyLocalPath: true,
        loraDir: loraDir || undefined,
        urls: { policy: { allowHttp: false, allowPrivate: [] } },
        hub: {},
        validate: (file, label) => void checkLora(file, cfg, { label }),
      }),
    );
  }
  return { loras: resolved.map((r, i) => ({ path: r.file, scale: specs[i].scale })), resolved };
}
