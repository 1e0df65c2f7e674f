// Texts for people and agents: the site llms.txt, one llms.txt per model (generated from its zod schema, so fields,
// defaults and limits cannot drift from what the API validates), the agent skill (SKILL.md) and its index.
import { z } from '@hono/zod-openapi';
import type { ServiceConfig } from './config.ts';
import { LIMITS, SIZE_PRESETS, SIZE_RULE } from '../pipeline/limits.ts';
import { type ModelEntry, servedModel, servedModels } from './models.ts';
import { priceLabel, priceRun, formatUsd } from './pricing.ts';
import { sha256Hex } from './time.ts';

interface JsonProp {
  type?: string;
  description?: string;
  default?: unknown;
  enum?: unknown[];
  minimum?: number;
  maximum?: number;
  minItems?: number;
  maxItems?: number;
  anyOf?: JsonProp[];
}

function fields(m: ModelEntry): { name: string; required: boolean; p: JsonProp }[] {
  const js = z.toJSONSchema(m.schema, { io: 'input', unrepresentable: 'any' }) as { properties: Record<string, JsonProp>; required?: string[] };
  return Object.entries(js.properties).map(([name, p]) => ({ name, required: (js.required ?? []).includes(name), p }));
}

function typeOf(p: JsonProp): string {
  if (p.anyOf) return p.anyOf.map(typeOf).join(' | ');
  if (p.enum) return 'string';
  return p.type ?? 'object';
}

export function modelCatalogue(cfg: ServiceConfig) {
  return servedModels(cfg).map((m) => {
    const price = cfg.pricing[m.id];
    return {
      id: m.id, aliases: m.aliases, kind: m.kind, title: m.title, description: m.description,
      price_label: price ? priceLabel(price) : null,
      price_unit: '$/megapixel',
      example_cost_1mp: price ? formatUsd(priceRun(price, { width: 1024, height: 1024, count: 1 }, m.kind === 'edit' ? [{ width: 1024, height: 1024 }] : []).micros) : null,
      llms_txt: `/v1/models/${m.id}/llms.txt`,
      runs_endpoint: `/v1/models/${m.id}/runs`,
      precision: cfg.precision ?? 'exact',
    };
  });
}

export function modelLlmsTxt(m: ModelEntry, cfg: ServiceConfig, base: string): string {
  const price = cfg.pricing[m.id];
  const out: string[] = [
    `# ${m.title}`, '', `> ${m.description} Served by klein serve (self-hosted, Runflow-compatible runs API).`, '',
    '## Overview', `- **Endpoint**: \`${base}/v1/models/${m.id}/runs\``, `- **Model ID**: \`${m.id}\` (also \`${m.aliases.join('`, `')}\`)`,
    '- **Provider**: Black Forest Labs (weights), served locally', '- **Auth**: `Authorization: Bearer $KLEIN_API_KEY`', '',
    '## Pricing',
    ...(price ? [`- **Price**: ${priceLabel(price)}`, '- One megapixel = 1024×1024 pixels; each output image pays for its own megapixels.', '- Failed and cancelled runs are not billed.'] : ['- Not priced']),
    '', '## Limits',
    `- Sides: multiples of ${LIMITS.multiple}, at least ${LIMITS.minSide}; at most 4 MP (${LIMITS.maxPixels} pixels) per image`,
    `- \`num_images\`: 1–${LIMITS.maxImages}; \`num_inference_steps\`: 1–${LIMITS.maxSteps}; \`seed\`: 0–${LIMITS.maxSeed}; \`prompt\`: at most ${LIMITS.maxPromptChars} characters`,
    ...(m.kind === 'edit' ? [`- \`image_urls\`: 1–${LIMITS.maxRefs} https URLs or data: URIs (PNG, JPEG, WebP); private and loopback addresses are refused`] : []),
    `- \`loras\`: up to ${LIMITS.maxLoras} \`{path, scale}\` (scale −${LIMITS.maxLoraScale}…${LIMITS.maxLoraScale}); \`path\` is a file under the server's LoRA folder, an https URL or a Hub reference \`owner/name[/file.safetensors]\`; refused with 4xx \`LORA_*\` codes before the run is created`,
    `- Presets: ${Object.entries(SIZE_PRESETS).map(([k, v]) => `\`${k}\` ${v.width}×${v.height}`).join(', ')}`,
    '', '## Input Schema',
  ];
  for (const f of fields(m)) {
    out.push(`### \`${f.name}\` (${typeOf(f.p)}, ${f.required ? 'required' : 'optional'})`);
    if (f.p.description) out.push(f.p.description);
    if (f.p.default !== undefined) out.push(`- **Default**: \`${JSON.stringify(f.p.default)}\``);
    if (f.p.minimum !== undefined) out.push(`- **Min**: ${f.p.minimum}`);
    if (f.p.maximum !== undefined) out.push(`- **Max**: ${f.p.maximum}`);
    if (f.p.minItems !== undefined) out.push(`- **Min items**: ${f.p.minItems}`);
    if (f.p.maxItems !== undefined) out.push(`- **Max items**: ${f.p.maxItems}`);
    if (f.p.enum) out.push(`- **Options**: ${f.p.enum.map((e) => `\`${e}\``).join(', ')}`);
    out.push('');
  }
  const example = m.kind === 'edit'
    ? { input: { prompt: 'make the sky orange', image_urls: ['https://example.com/photo.png'], image_size: { width: 1024, height: 1024 } } }
    : { input: { prompt: 'a lighthouse at dusk, oil painting', image_size: 'square_hd', seed: 42 } };
  out.push(
    '## Output Schema',
    '- `images[]`: `{url, width, height, content_type, file_size}`; `url` is signed and expires (GET the run again for a fresh one)',
    '- `seed`, `prompt`, `timings` (seconds per stage), `prompt_truncated` when the prompt exceeded the text window',
    '- No safety classifier runs, so there is no `has_nsfw_concepts` field.',
    '', '## Usage Examples', '### cURL', '```bash',
    `curl -s -X POST ${base}/v1/models/${m.id}/runs \\`, '  -H "Authorization: Bearer $KLEIN_API_KEY" -H "Content-Type: application/json" \\',
    `  -d '${JSON.stringify(example)}'`,
    `curl -s ${base}/v1/runs/RUN_ID -H "Authorization: Bearer $KLEIN_API_KEY"   # poll until status_code is succeeded`,
    '```', '',
    '## API Information', `- Run lifecycle: queued → running → succeeded | failed | cancelled`, `- Events: \`GET ${base}/v1/runs/RUN_ID/events\` (server-sent)`,
    `- Cancel: \`POST ${base}/v1/runs/RUN_ID/cancellation\``, `- OpenAPI: ${base}/openapi.json`, '',
  );
  return out.join('\n');
}

export function siteLlmsTxt(cfg: ServiceConfig, base: string): string {
  return [
    '# klein serve', '',
    '> A self-hosted FLUX.2 [klein] image generation API, compatible with Runflow\'s runs API: create a run, poll it or get a callback, download signed image URLs.', '',
    '## Models',
    ...modelCatalogue(cfg).map((m) => `- [${m.title}](${base}${m.llms_txt}): \`${m.id}\`, ${m.price_label}`),
    '', '## API',
    `- [OpenAPI document](${base}/openapi.json): every route with its schemas`,
    `- [Interactive reference](${base}/docs)`,
    `- [Agent skill](${base}/.well-known/agent-skills/klein/SKILL.md): how an agent should use this API`,
    '', '## Essentials',
    '- Auth: `Authorization: Bearer <key>` on every /v1 route except health, models and signed file URLs; `GET /v1/auth/me` checks a key.',
    '- `POST /v1/models/{model_id}/runs` with `{input, callback_url?, metadata?, client_ref?}` → 201 Run (`status_code` queued).',
    '- `GET /v1/runs/{id}` to poll; `GET /v1/runs/{id}/events` for server-sent progress; `sync_mode: true` or `Prefer: wait=N` to wait inline.',
    '- `POST /v1/runs/{id}/cancellation` cancels queued or running runs (not billed).',
    '- Callbacks are signed: `Runflow-Signature` = hex HMAC-SHA256(secret, raw body); secrets from `POST /v1/callback-secrets`.',
    '- `Idempotency-Key` on creates: same body replays, different body → 409.',
    '- Errors: `{code, message, errors}`; 429 `RATE_LIMITED` carries `Retry-After`.',
    '- Usage and cost: `cost`/`cost_breakdown` on each run, `GET /v1/usage` per day.',
    `- LoRAs: \`loras: [{path, scale}]\` in the input (up to ${LIMITS.maxLoras}; fal's shape) applies FLUX.2 [klein] LoRAs: a file under the server's LoRA folder, an https URL (cached by sha256) or a Hub reference \`owner/name[/file.safetensors]\`. A LoRA that cannot be used is refused before the run exists (400/404/413/422 with a \`LORA_*\` code). LoRA runs cost a surcharge per output megapixel (see the price labels).`,
    '- Transparent backgrounds: `background: "transparent"` in the input cuts the subject out with a matting model and returns RGBA png or webp (`images[].has_alpha`); with jpeg it is 422 `UNSUPPORTED_COMBINATION`, and 503 `MATTING_UNAVAILABLE` when the server has no matting weights. Same price.', '',
    '## OpenAI-compatible images API and MCP',
    `- \`POST ${base}/v1/images/generations\` (JSON) and \`POST ${base}/v1/images/edits\` (multipart, \`image\` or \`image[]\`, 1–4): OpenAI's images API (\`prompt\`, \`model\`, \`n\`, \`size\` WxH or auto, \`response_format\` b64_json|url, \`output_format\`, \`output_compression\`, \`background\` auto|opaque|transparent, plus \`seed\` and \`loras\` (a JSON string in multipart)); point an OpenAI client's base URL at \`${base}/v1\`. Each request is a run (GET /v1/runs, billed alike); errors are \`{error: {message, type, param, code}}\`.`,
    `- MCP (streamable HTTP): \`${base}/mcp\` with the same Bearer key; tools \`generate_image\`, \`edit_image\`, \`get_run\`. Over stdio: \`klein mcp --model DIR --data DIR\`.`, '',
  ].join('\n');
}

/** The skill text is constant (URLs via $KLEIN_URL), so its digest is stable across hosts and restarts. */
export function skillMd(cfg: ServiceConfig): string {
  const m = servedModel(cfg, 'text-to-image');
  const edit = servedModel(cfg, 'edit');
  const price = cfg.pricing[m.id];
  return `---
name: klein
description: Generate and edit images with a self-hosted FLUX.2 [klein] server through its Runflow-compatible runs API (create, poll or stream, download, cancel, signed callbacks).
metadata:
  version: "1.0.0"
  api: runflow-compatible runs
---
# Using a klein serve API

## When to use
When the user asks for an image (text to image) or to change or combine images (edit, 1–4 references) and a klein
server is available at \`$KLEIN_URL\` with an API key in \`$KLEIN_API_KEY\`.

## Quick reference
- Auth header on every call: \`Authorization: Bearer $KLEIN_API_KEY\` (check it: \`GET $KLEIN_URL/v1/auth/me\`).
- Models: \`GET $KLEIN_URL/v1/models\`. This server runs ${m.title}: text to image \`${m.id}\`; edit: \`${edit.id}\`.
- Price: ${price ? priceLabel(price) : 'see /v1/models'}. Failed or cancelled runs cost nothing.
- Field details, defaults and limits: \`GET $KLEIN_URL/v1/models/{model_id}/llms.txt\`. Full schema: \`$KLEIN_URL/openapi.json\`.

## Basic flow
1. Create: \`POST $KLEIN_URL/v1/models/${m.id}/runs\` with
   \`{"input": {"prompt": "...", "image_size": "square_hd"}}\`. Add an \`Idempotency-Key\` header so a retry never
   creates a second run.
2. Wait: poll \`GET $KLEIN_URL/v1/runs/{id}\` every 1–2 s until \`status_code\` is \`succeeded\`, \`failed\` or
   \`cancelled\`; or send \`Prefer: wait=60\` on the create to get the finished run in the response.
3. Use \`output.images[].url\` (signed, expiring: download promptly or GET the run again for a fresh URL).
4. On \`failed\`, read \`failure_code\` and \`failure_message\`; fix the input if the code is INPUT_*, otherwise retry.

## Rules
- Sizes: ${SIZE_RULE}. Presets: ${Object.keys(SIZE_PRESETS).join(', ')}.
- \`num_images\` 1–${LIMITS.maxImages} (image i uses seed+i). \`num_inference_steps\` 1–${LIMITS.maxSteps}. Edits: \`image_urls\` 1–${LIMITS.maxRefs}, https or data: URIs.
- A cut-out on a transparent background (logo, sticker, product shot): \`"background": "transparent"\` with
  \`output_format\` png (default) or webp, never jpeg (422). Describe the subject only; do not ask for a
  "transparent background" or a checkerboard in the prompt. 503 \`MATTING_UNAVAILABLE\`: this server cannot do it.
- LoRAs (a style or subject the user trained): \`"loras": [{"path": "owner/name", "scale": 1}]\`, up to ${LIMITS.maxLoras};
  \`path\` is a Hub reference, an https URL or a file in the server's LoRA folder. A \`LORA_*\` 4xx means that LoRA
  cannot be used here (wrong model size, not found, too large): drop it or pick another; never retry unchanged.
- 429 \`RATE_LIMITED\`: wait \`Retry-After\` seconds. 422: read \`errors[]\` (\`loc\` names the field).
- Never invent safety fields: this server runs no safety classifier.
- Cancel what you no longer need: \`POST $KLEIN_URL/v1/runs/{id}/cancellation\`.

## Other ways in
- OpenAI-compatible: \`POST $KLEIN_URL/v1/images/generations\` (JSON: prompt, size "WxH", n, response_format,
  output_format, background, seed) and \`POST $KLEIN_URL/v1/images/edits\` (multipart: \`image[]\` 1–4 files, prompt). They wait
  for the run and answer \`{created, data: [{b64_json | url}], usage, run_id}\`; errors are \`{error: {message, param, …}}\`.
- MCP: \`$KLEIN_URL/mcp\` (streamable HTTP, same Bearer key), tools \`generate_image\`, \`edit_image\`, \`get_run\`.
`;
}

export function skillIndex(cfg: ServiceConfig) {
  return {
    $schema: 'https://schemas.agentskills.io/discovery/0.2.0/schema.json',
    skills: [
      {
        name: 'klein',
        type: 'skill-md',
        description: 'Generate and edit images with this FLUX.2 [klein] server (Runflow-compatible runs API).',
        url: '/.well-known/agent-skills/klein/SKILL.md',
        digest: `sha256:${sha256Hex(skillMd(cfg))}`,
      },
    ],
  };
}
