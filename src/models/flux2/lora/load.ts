// Loading a LoRA safetensors file for a FLUX.2 transformer: every module is mapped onto the BFL weight it adapts (and
// the rows of it, where a diffusers to_q/to_k/to_v adapts part of klein's fused qkv), its A/B checked against the
// model's shapes, and its alpha found (per-module `.alpha`, diffusers' `lora_adapter_metadata`, or rank). The result
// is what the engine feeds as low-rank side inputs: `stackLoras` concatenates several LoRAs per Linear along the rank
// with scale·alpha/rank folded into B, so switching LoRAs never touches the base weights.
import fs from 'node:fs';
import path from 'node:path';
import { UserError } from '../../../errors.ts';
import type { Flux2Config } from '../config.ts';
import { flux2BflShapes } from '../checkpoint.ts';
import { classifyModule, keyPrefix, parseKey, type LoraPart, type ModuleClass, type ModuleTarget } from './names.ts';
import { SafetensorsError, SafetensorsFile, readFloat32, type TensorInfo } from '../../../weights/safetensors.ts';

export type LoraErrorCode =
  | 'lora_bad_spec'
  | 'lora_not_found'
  | 'lora_invalid'
  | 'lora_incompatible'
  | 'lora_unsupported'
  | 'lora_too_large'
  | 'lora_blocked'
  | 'lora_fetch_failed';

const STATUS: Record<LoraErrorCode, number> = {
  lora_bad_spec: 400,
  lora_not_found: 404,
  lora_invalid: 422,
  lora_incompatible: 422,
  lora_unsupported: 422,
  lora_too_large: 413,
  lora_blocked: 400,
  lora_fetch_failed: 400,
};

/** A LoRA the user asked for cannot be used: the CLI exits 2, the API answers `status` with `code` (uppercased). */
export class LoraError extends UserError {
  override name = 'LoraError';
  readonly status: number;
  constructor(
    override readonly code: LoraErrorCode,
    message: string,
  ) {
    super(message, code);
    this.status = STATUS[code];
  }
}

export function isLoraErrorCode(code: unknown): code is LoraErrorCode {
  return typeof code === 'string' && code in STATUS;
}

/** One adapted Linear (or a row range of it): delta W[rows] = (alpha / rank) · up · down. */
export interface LoraTarget {
  /** BFL weight name, e.g. `double_blocks.0.img_attn.qkv.weight` — the same for BFL and diffusers checkpoints. */
  weight: string;
  /** Rows `[start, end)` of the weight this delta covers; absent: all rows. */
  rows?: [number, number];
  rank: number;
  inFeatures: number;
  /** Rows covered: `rows[1] - rows[0]`, or the weight's row count. */
  outFeatures: number;
  /** A, `[rank, inFeatures]` row-major. */
  down: Float32Array;
  /** B, `[outFeatures, rank]` row-major, rows in BFL order. */
  up: Float32Array;
  alpha: number;
  /** The module name in the file (for messages). */
  module: string;
}

export interface LoadedLora {
  file: string;
  /** How the file names its modules, e.g. `kohya (lora_unet_…, lora_down/lora_up)`. */
  format: string;
  targets: LoraTarget[];
  metadata: Record<string, string>;
}

export interface LoadLoraOptions {
  /** Name used in messages instead of the file path (e.g. the URL or Hub reference the user gave). */
  label?: string;
}

interface ModuleParts {
  down?: TensorInfo;
  up?: TensorInfo;
  alpha?: TensorInfo;
}

const ARCH_HINTS: Array<[RegExp, string]> = [
  [/flux[-_. ]?1(?!\d)|flux1/i, 'FLUX.1'],
  [/sdxl|stable[-_ ]?diffusion|sd[-_]?[123](?!\d)/i, 'Stable Diffusion'],
];

/** Reads and checks a LoRA file for a model config. Throws `LoraError` with a reason the user can act on. */
export function loadLora(file: string, cfg: Flux2Config, opts: LoadLoraOptions = {}): LoadedLora {
  return readLora(file, cfg, opts, true);
}

/** What `checkLora` found in a file's header. */
export interface LoraSummary {
  format: string;
  modules: number;
  /** Largest module rank. */
  rank: number;
}

/**
 * The checks of `loadLora` that need the header only (names, shapes, alphas, metadata): fast enough for an API
 * process to refuse a LoRA before a run is stored. The values (NaN/Inf, float8) are checked when the engine loads it.
 */
export function checkLora(file: string, cfg: Flux2Config, opts: LoadLoraOptions = {}): LoraSummary {
  const l = readLora(file, cfg, opts, false);
  return { format: l.format, modules: l.targets.length, rank: Math.max(0, ...l.targets.map((t) => t.rank)) };
}

function readLora(file: string, cfg: Flux2Config, opts: LoadLoraOptions, values: boolean): LoadedLora {
  const label = opts.label ?? file;
  let st: SafetensorsFile;
  try {
    if (!fs.existsSync(file)) throw new LoraError('lora_not_found', `LoRA ${label}: no such file`);
    st = new SafetensorsFile(file);
  } catch (e) {
    if (e instanceof LoraError) throw e;
    throw new LoraError('lora_invalid', `LoRA ${label} is not a valid safetensors file: ${(e as Error).message.replace(`${path.resolve(file)}: `, '')}`);
  }
  refuseOtherArchitectureByMetadata(st.metadata, label);
  const modules = groupModules(st, label);
  const shapes = new Map(flux2BflShapes(cfg).map((s) => [s.name, s.shape]));
  const alphas = metadataAlphas(st.metadata, label);
  const classes = [...modules.keys()].map((module) => ({ module, c: classifyModule(module, cfg) }));
  refuseOtherModels(classes, cfg, label);
  const targets: LoraTarget[] = [];
  for (const { module, c } of classes) {
    if (c.kind === 'target') targets.push(readTarget(module, modules.get(module)!, c.target, shapes, alphas(module), label, cfg, values));
  }
  return { file: path.resolve(file), format: describeFormat([...modules.keys()], st), targets, metadata: st.metadata };
}

function refuseOtherArchitectureByMetadata(meta: Record<string, string>, label: string): void {
  for (const key of ['modelspec.architecture', 'ss_base_model_version']) {
    const v = meta[key];
    if (!v) continue;
    for (const [re, arch] of ARCH_HINTS) if (re.test(v)) throw new LoraError('lora_incompatible', `LoRA ${label} was made for ${arch} (metadata ${key} = "${v}"); this model is FLUX.2 [klein]`);
  }
}

/** Refuses, most telling reason first, a LoRA whose module names show it was made for another model. */
function refuseOtherModels(classes: Array<{ module: string; c: ModuleClass }>, cfg: Flux2Config, label: string): void {
  const first = <K extends ModuleClass['kind']>(kind: K) => classes.find((x) => x.c.kind === kind) as { module: string; c: Extract<ModuleClass, { kind: K }> } | undefined;
  const f1 = first('flux1');
  if (f1) throw new LoraError('lora_incompatible', `LoRA ${label} is a FLUX.1 LoRA (module ${f1.module}: ${f1.c.why} exists in FLUX.1, not FLUX.2); this model is FLUX.2 [klein]`);
  const te = first('text_encoder');
  if (te) throw new LoraError('lora_unsupported', `LoRA ${label} adapts the text encoder (module ${te.module}); klein applies transformer LoRAs only — use a LoRA without text-encoder weights`);
  const g = first('guidance');
  if (g) throw new LoraError('lora_incompatible', `LoRA ${label} adapts a guidance embedder (module ${g.module}) that FLUX.2 [dev] and FLUX.1 have and klein does not; it was made for another model`);
  const deep = classes.flatMap((x) => (x.c.kind === 'out_of_range' ? [{ module: x.module, c: x.c }] : []));
  if (deep.length) {
    const max = (b: 'double' | 'single') => Math.max(-1, ...deep.filter((d) => d.c.block === b).map((d) => d.c.index));
    const has = [max('double') >= 0 ? `double block ${max('double')}` : '', max('single') >= 0 ? `single block ${max('single')}` : ''].filter(Boolean).join(' and ');
    throw new LoraError(
      'lora_incompatible',
      `LoRA ${label} adapts ${has} (e.g. ${deep[0].module}), but this model has ${cfg.depth} double and ${cfg.depthSingleBlocks} single blocks: it was made for a deeper model (klein 9B has 8/24, FLUX.2 [dev] 8/48, FLUX.1 19/38)`,
    );
  }
  const unknown = classes.filter((x) => x.c.kind === 'unknown').map((x) => x.module);
  if (unknown.length) throw new LoraError('lora_incompatible', `LoRA ${label}: ${unknown.length} module(s) are not FLUX.2 transformer layers, e.g. ${unknown.slice(0, 3).join(', ')} (a LoRA for another architecture?)`);
}

function groupModules(st: SafetensorsFile, label: string): Map<string, ModuleParts> {
  const modules = new Map<string, ModuleParts>();
  const unknownKeys: string[] = [];
  const adapters: Array<{ key: string; what: string; alone: boolean }> = [];
  for (const [key, info] of st.tensors) {
    const k = parseKey(key);
    if (k.kind === 'other_adapter') adapters.push({ key, ...k });
    if (k.kind !== 'part') {
      if (k.kind === 'unknown') unknownKeys.push(key);
      continue;
    }
    const parts = modules.get(k.module) ?? {};
    if (parts[k.part]) throw new LoraError('lora_invalid', `LoRA ${label}: module ${k.module} has two ${k.part} tensors (${parts[k.part]!.name}, ${key})`);
    parts[k.part as LoraPart] = info;
    modules.set(k.module, parts);
  }
  const adapter = adapters.find((a) => a.alone) ?? (modules.size ? adapters[0] : undefined);
  if (adapter) throw new LoraError('lora_unsupported', `LoRA ${label} holds a ${adapter.what} (tensor ${adapter.key}); klein loads plain LoRA (A/B low-rank pairs) only`);
  const stray = [...unknownKeys, ...adapters.map((a) => a.key)];
  if (modules.size === 0) {
    throw new LoraError('lora_invalid', `LoRA ${label} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up tensors)${stray.length ? `; tensors like ${stray.slice(0, 2).join(', ')} look like a full checkpoint, not a LoRA` : ''}`);
  }
  if (unknownKeys.length) throw new LoraError('lora_invalid', `LoRA ${label}: ${unknownKeys.length} tensor(s) are not LoRA weights, e.g. ${unknownKeys.slice(0, 3).join(', ')}`);
  return modules;
}

function describeFormat(modules: string[], st: SafetensorsFile): string {
  const prefixes = [...new Set(modules.map(keyPrefix))].map((p) => p || '(no prefix)');
  const kohya = st.names.some((n) => n.endsWith('.lora_down.weight'));
  const origin: Record<string, string> = {
    'lora_unet_': 'kohya/musubi-tuner',
    'diffusion_model.': 'ai-toolkit/BFL',
    'transformer.': 'diffusers',
    'base_model.model.': 'PEFT',
    'lora_transformer_': 'OneTrainer-style',
    'lycoris_': 'SimpleTuner LyCORIS-style',
    'model.diffusion_model.': 'ComfyUI',
  };
  const who = prefixes.map((p) => origin[p] ?? 'bare names').join(' + ');
  return `${who} (${prefixes.join(', ')}; ${kohya ? 'lora_down/lora_up' : 'lora_A/lora_B'})`;
}

/** Alpha per module from diffusers' `lora_adapter_metadata` (PEFT LoraConfig, optionally `transformer.`-prefixed). */
function metadataAlphas(meta: Record<string, string>, label: string): (module: string) => { alpha?: number; rsLora: boolean } {
  const raw = meta.lora_adapter_metadata;
  if (!raw) return () => ({ rsLora: false });
  let cfg: Record<string, unknown>;
  try {
    cfg = JSON.parse(raw);
  } catch (e) {
    throw new LoraError('lora_invalid', `LoRA ${label}: metadata lora_adapter_metadata is not valid JSON: ${(e as Error).message}`);
  }
  const get = (k: string): unknown => cfg[`transformer.${k}`] ?? cfg[k];
  if (get('use_dora') === true) throw new LoraError('lora_unsupported', `LoRA ${label} is a DoRA adapter (use_dora in its metadata); klein loads plain LoRA only`);
  const base = get('lora_alpha');
  const pattern = (get('alpha_pattern') ?? {}) as Record<string, unknown>;
  const rsLora = get('use_rslora') === true;
  return (module) => {
    const name = module.replace(/^(transformer|base_model\.model|diffusion_model)\./, '');
    // PEFT matches pattern keys against the end of the module path
    const hit = Object.entries(pattern).find(([k]) => name === k || name.endsWith(`.${k}`));
    const v = hit ? hit[1] : base;
    return { alpha: typeof v === 'number' && Number.isFinite(v) ? v : undefined, rsLora };
  };
}

function readTarget(
  module: string,
  parts: ModuleParts,
  t: ModuleTarget,
  shapes: Map<string, number[]>,
  meta: { alpha?: number; rsLora: boolean },
  label: string,
  cfg: Flux2Config,
  values: boolean,
): LoraTarget {
  if (!parts.down || !parts.up) {
    throw new LoraError('lora_invalid', `LoRA ${label}: module ${module} has ${parts.down ? 'no up (lora_B/lora_up)' : parts.up ? 'no down (lora_A/lora_down)' : 'only an alpha'} tensor`);
  }
  const down = matrixShape(parts.down, label);
  const up = matrixShape(parts.up, label);
  const [rank, inFeatures] = down;
  if (up[1] !== rank || rank < 1) {
    throw new LoraError('lora_invalid', `LoRA ${label}: module ${module} has mismatched ranks: down ${JSON.stringify(parts.down.shape)} has rank ${rank}, up ${JSON.stringify(parts.up.shape)} has ${up[1]}`);
  }
  const wshape = shapes.get(t.weight);
  if (!wshape) throw new LoraError('lora_incompatible', `LoRA ${label}: module ${module} adapts ${t.weight}, which this model does not have`);
  const outFeatures = t.rows ? t.rows[1] - t.rows[0] : wshape[0];
  if (inFeatures !== wshape[1] || up[0] !== outFeatures) {
    throw new LoraError(
      'lora_incompatible',
      `LoRA ${label}: module ${module} maps ${inFeatures} → ${up[0]} features, but this model's ${t.weight}${t.rows ? ` rows ${t.rows[0]}–${t.rows[1]}` : ''} maps ${wshape[1]} → ${outFeatures}${sizeHint(t.weight, inFeatures, up[0], cfg)}`,
    );
  }
  const alpha = parts.alpha ? readAlpha(parts.alpha, module, label) : (meta.alpha ?? rank);
  const downData = values ? finite(readFloat32Checked(parts.down, label), module, label) : new Float32Array(0);
  let upData = values ? finite(readFloat32Checked(parts.up, label), module, label) : new Float32Array(0);
  if (t.swapHalves && values) upData = swapRowHalves(upData);
  // rsLoRA scales by alpha/sqrt(rank): kept as an effective alpha so every target is alpha/rank
  const effAlpha = meta.rsLora && !parts.alpha ? alpha * Math.sqrt(rank) : alpha;
  return { weight: t.weight, rows: t.rows, rank, inFeatures, outFeatures, down: downData, up: upData, alpha: effAlpha, module };
}

/** Which model a mismatched size points at, from the hidden sizes of the FLUX family. */
function sizeHint(weight: string, inF: number, outF: number, cfg: Flux2Config): string {
  const models: Record<number, string> = { 3072: 'klein 4B or FLUX.1', 4096: 'klein 9B', 6144: 'FLUX.2 [dev]' };
  if (/single_blocks\.\d+\.linear1/.test(weight) && outF === 7 * inF) return ` (a FLUX.1 single block: ${inF} → 3·${inF} + 4·${inF})`;
  if (/_mlp\.0\./.test(weight) && outF === 4 * inF) return ` (a FLUX.1 GELU MLP: ${inF} → 4·${inF})`;
  const hidden = /linear2|mlp\.2|txt_in|img_in/.test(weight) ? outF : inF;
  if (hidden !== cfg.hiddenSize && models[hidden]) return ` (hidden size ${hidden}: a LoRA for ${models[hidden]}; this model's is ${cfg.hiddenSize})`;
  return '';
}

function matrixShape(t: TensorInfo, label: string): [number, number] {
  // kohya writes Linear LoRAs 2-D; a trailing 1×1 (conv-shaped) is the same matrix
  const s = t.shape.length === 4 && t.shape[2] === 1 && t.shape[3] === 1 ? t.shape.slice(0, 2) : t.shape;
  if (s.length !== 2) throw new LoraError('lora_invalid', `LoRA ${label}: tensor ${t.name} has shape ${JSON.stringify(t.shape)}, expected a matrix`);
  return [s[0], s[1]];
}

function readFloat32Checked(t: TensorInfo, label: string): Float32Array {
  try {
    return readFloat32(t);
  } catch (e) {
    if (e instanceof SafetensorsError) throw new LoraError('lora_unsupported', `LoRA ${label}: tensor ${t.name}: ${e.message.replace(/^.*\]: /, '')}`);
    throw e;
  }
}

function readAlpha(t: TensorInfo, module: string, label: string): number {
  if (t.shape.reduce((a, b) => a * b, 1) !== 1) throw new LoraError('lora_invalid', `LoRA ${label}: ${t.name} has shape ${JSON.stringify(t.shape)}, an alpha is one number`);
  const v = readFloat32Checked(t, label)[0];
  if (!Number.isFinite(v)) throw new LoraError('lora_invalid', `LoRA ${label}: module ${module} has alpha ${v}`);
  return v;
}

function finite(a: Float32Array, module: string, label: string): Float32Array {
  for (let i = 0; i < a.length; i++) if (!Number.isFinite(a[i])) throw new LoraError('lora_invalid', `LoRA ${label}: module ${module} holds NaN or infinite values`);
  return a;
}

function swapRowHalves(up: Float32Array): Float32Array {
  const half = up.length / 2;
  const out = new Float32Array(up.length);
  out.set(up.subarray(half), 0);
  out.set(up.subarray(0, half), half);
  return out;
}

/** A LoRA with the strength a request asks for. */
export interface AppliedLora {
  lora: LoadedLora;
  scale: number;
}

/**
 * The side inputs of one adapted Linear for a set of LoRAs: y = x·Wᵀ + (x·downᵀ)·upᵀ. `down` stacks every member's A
 * along the rank; `up` holds each member's B, scaled by scale·alpha/rank, in the rows it covers (zeros elsewhere).
 */
export interface StackedLora {
  /** BFL weight name. */
  weight: string;
  inFeatures: number;
  /** The weight's full row count. */
  outFeatures: number;
  /** Sum of the members' ranks. */
  rank: number;
  /** `[rank, inFeatures]` row-major. */
  down: Float32Array;
  /** `[outFeatures, rank]` row-major. */
  up: Float32Array;
}

/** Groups targets by Linear and stacks them; LoRAs at scale 0 are left out (they add nothing). */
export function stackLoras(applied: AppliedLora[], cfg: Flux2Config): Map<string, StackedLora> {
  const shapes = new Map(flux2BflShapes(cfg).map((s) => [s.name, s.shape]));
  const members = new Map<string, Array<{ t: LoraTarget; factor: number }>>();
  for (const { lora, scale } of applied) {
    if (scale === 0) continue;
    for (const t of lora.targets) {
      const list = members.get(t.weight) ?? [];
      list.push({ t, factor: (scale * t.alpha) / t.rank });
      members.set(t.weight, list);
    }
  }
  const out = new Map<string, StackedLora>();
  for (const [weight, list] of members) {
    const [rows, inFeatures] = shapes.get(weight)!;
    const rank = list.reduce((n, m) => n + m.t.rank, 0);
    const down = new Float32Array(rank * inFeatures);
    const up = new Float32Array(rows * rank);
    let r0 = 0;
    for (const { t, factor } of list) {
      down.set(t.down, r0 * inFeatures);
      const first = t.rows?.[0] ?? 0;
      for (let i = 0; i < t.outFeatures; i++) {
        for (let k = 0; k < t.rank; k++) up[(first + i) * rank + r0 + k] = factor * t.up[i * t.rank + k];
      }
      r0 += t.rank;
    }
    out.set(weight, { weight, inFeatures, outFeatures: rows, rank, down, up });
  }
  return out;
}
