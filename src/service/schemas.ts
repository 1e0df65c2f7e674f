// OpenAPI schemas of the public shapes. Handlers build responses with present.ts; these document them.
import { z } from '@hono/zod-openapi';
import { EditInput, TextToImageInput } from './models.ts';
import { RUN_STATUSES } from './store.ts';

export const ErrorSchema = z
  .object({
    code: z.string().openapi({ example: 'VALIDATION_ERROR' }),
    message: z.string(),
    errors: z.array(z.object({ loc: z.array(z.union([z.string(), z.number()])), message: z.string(), type: z.string() })).nullable(),
  })
  .openapi('Error');

export const errorResponses = (...codes: number[]) =>
  Object.fromEntries(
    codes.map((c) => [c, { description: ERROR_TEXT[c] ?? 'Error', content: { 'application/json': { schema: ErrorSchema } } }]),
  );
const ERROR_TEXT: Record<number, string> = {
  400: 'Malformed request (LORA_BAD_SPEC, LORA_BLOCKED: a LoRA URL to a private address, LORA_FETCH_FAILED)', 401: 'Missing or invalid API key',
  404: 'Not found (LORA_NOT_FOUND: no such LoRA file, URL or Hub repository)', 409: 'Conflict',
  410: 'Gone (expired)', 413: 'Too large (LORA_TOO_LARGE: a LoRA download over the size cap)',
  422: 'Validation failed; see errors[] (UNSUPPORTED_COMBINATION: a transparent background in jpeg; LORA_INCOMPATIBLE, LORA_UNSUPPORTED, LORA_INVALID: a LoRA this model cannot use)', 429: 'Rate limited (RATE_LIMITED, Retry-After)',
  503: 'A transparent background was asked of a server without matting weights (MATTING_UNAVAILABLE)',
};

export const ImageSchema = z.object({
  url: z.string().nullable().openapi({ description: 'Signed, expiring URL (a data: URI in sync_mode); null once retention removed the file.' }),
  width: z.number().int(),
  height: z.number().int(),
  content_type: z.string(),
  file_size: z.number().int(),
  has_alpha: z.boolean().openapi({ description: 'The file has an alpha channel (background `transparent`; png or webp).' }),
}).openapi('Image');

export const OutputSchema = z.object({
  images: z.array(ImageSchema),
  seed: z.number().int(),
  prompt: z.string(),
  background: z.enum(['opaque', 'transparent']).openapi({ description: 'What the images are: `transparent` (RGBA, subject cut out) or `opaque`. `auto` resolves to `opaque`.' }),
  timings: z.record(z.string(), z.number()),
  prompt_truncated: z.boolean().optional(),
  expired: z.boolean().optional(),
}).openapi('Output');

export const ProgressSchema = z.object({
  stage: z.string().openapi({ example: 'denoise' }),
  step: z.number().int().optional(),
  total: z.number().int().optional(),
  percent: z.number(),
  message: z.string().optional(),
}).openapi('Progress');

export const RunSchema = z.object({
  id: z.string().openapi({ example: '01JD2X8K3M4N5P6Q7R8S9T0V1W' }),
  object: z.literal('run'),
  model_id: z.string().openapi({ description: 'The id of the model the run used (GET /v1/models).' }),
  status_code: z.enum(RUN_STATUSES as [string, ...string[]]),
  input: z.union([TextToImageInput.openapi('TextToImageInput'), EditInput.openapi('EditInput')]).openapi({ description: 'The input as the run uses it, defaults filled in.' }),
  output: OutputSchema.nullable(),
  cost: z.string().nullable().openapi({ description: 'USD, decimal string. An estimate until the run succeeds; "0.000" when failed or cancelled.', example: '0.014' }),
  cost_breakdown: z.record(z.string(), z.unknown()).nullable(),
  progress: ProgressSchema.nullable(),
  attempts: z.number().int(),
  created_at: z.string(),
  started_at: z.string().nullable(),
  completed_at: z.string().nullable(),
  duration_ms: z.number().int().nullable(),
  failure_code: z.string().nullable(),
  failure_stage: z.string().nullable(),
  failure_message: z.string().nullable(),
  metadata: z.unknown().nullable(),
  client_ref: z.string().nullable(),
  callback_url: z.string().nullable(),
  links: z.object({ self: z.string(), events: z.string(), cancel: z.string(), callback: z.string() }),
}).openapi('Run');

// inline in the request body, not a component: client generators make the input's defaulted fields optional there
export const CreateRunBody = z
  .object({
    input: z.union([TextToImageInput, EditInput]).openapi({ description: "The model's input: TextToImageInput, or EditInput for …/edit." }),
    callback_url: z.string().url().max(2048).optional().openapi({ description: 'POSTed with a signed payload when the run ends.' }),
    metadata: z.record(z.string(), z.unknown()).optional().openapi({ description: 'Echoed verbatim in the run and its callbacks (at most 16 KiB).' }),
    client_ref: z.string().max(256).optional(),
  })
  .openapi({ description: "A run request: the model's input, and where and how to report back." });

export const RunListSchema = z.object({ data: z.array(RunSchema), next_cursor: z.string().nullable(), has_more: z.boolean() }).openapi('RunList');
