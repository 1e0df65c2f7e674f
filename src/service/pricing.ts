// Prices per megapixel, BFL's way: a price for the first megapixel of each image, one per further megapixel (rounded
// up), plus one per input megapixel for edits, plus a LoRA surcharge per output megapixel when a run applies LoRAs.
// Money is kept in integer micro-dollars so sums never drift.
import type { VariantId } from '../weights/model-folder.ts';
import { ALL_MODELS } from './models.ts';

export interface ModelPrice {
  firstMpUsd: number;
  extraMpUsd: number;
  inputMpUsd: number;
  /** Added per output megapixel (rounded up) of a run with LoRAs; absent: 0. */
  loraMpUsd?: number;
}

/**
 * The default price of each variant: BFL's list prices for klein 4B (1.4¢ + 0.1¢, input 0.1¢) and 9B (1.5¢ + 0.2¢,
 * input 0.2¢). BFL sells no base variant; they default to the price of their size, and an operator sets their own in
 * config.json `pricing` (keyed by model id), since base runs 50 steps where the distilled ones run 4.
 * LoRA runs pay more per output megapixel, as fal charges them: its klein 9B base LoRA edit endpoint costs $0.02 per
 * MP of input and output against $0.011 for the 9B edit (+0.9¢), its FLUX.1 [dev] LoRA endpoint $0.035 against
 * $0.025 (+1¢). klein 9B takes fal's +0.9¢, 4B half of it (BFL's 4B/9B extra-MP ratio).
 */
export const VARIANT_PRICES: Record<VariantId, ModelPrice> = {
  'klein-4b': { firstMpUsd: 0.014, extraMpUsd: 0.001, inputMpUsd: 0.001, loraMpUsd: 0.0045 },
  'klein-9b': { firstMpUsd: 0.015, extraMpUsd: 0.002, inputMpUsd: 0.002, loraMpUsd: 0.009 },
  'klein-base-4b': { firstMpUsd: 0.014, extraMpUsd: 0.001, inputMpUsd: 0.001, loraMpUsd: 0.0045 },
  'klein-base-9b': { firstMpUsd: 0.015, extraMpUsd: 0.002, inputMpUsd: 0.002, loraMpUsd: 0.009 },
};

/** The default price table: every model id of every variant (text to image and edit alike). */
export function defaultPrices(): Record<string, ModelPrice> {
  return Object.fromEntries(ALL_MODELS.map((m) => [m.id, { ...VARIANT_PRICES[m.variant] }]));
}

/** One megapixel = 2^20 pixels, so 1024×1024 (`square_hd`) is exactly 1 MP, as BFL bills it. */
export const MP_PIXELS = 1024 * 1024;

export interface CostLine {
  image_index: number;
  width: number;
  height: number;
  output_mp: number;
  first_mp_usd: string;
  extra_mp: number;
  extra_mp_usd: string;
  input_mp: number;
  input_mp_usd: string;
  /** Runs with LoRAs: the output megapixels the surcharge is charged on, and the surcharge. */
  lora_mp?: number;
  lora_usd?: string;
  total_usd: string;
}

export interface CostBreakdown {
  currency: 'USD';
  /** estimated: not billed yet · billed: charged (succeeded) · waived: failed or cancelled, not charged */
  state: 'estimated' | 'billed' | 'waived';
  unit: 'megapixel';
  price: { first_mp_usd: string; extra_mp_usd: string; input_mp_usd: string; lora_mp_usd?: string };
  /** How many LoRAs the run applies (absent: none). */
  loras?: number;
  images: CostLine[];
  total_usd: string;
}

const micros = (usd: number) => Math.round(usd * 1e6);

/** Micro-dollars as a decimal string with at least three places: 14000 → "0.014". */
export function formatUsd(m: number): string {
  const s = (m / 1e6).toFixed(6).replace(/0+$/, '');
  const [i, f = ''] = s.split('.');
  return `${i}.${f.padEnd(3, '0')}`;
}

export const megapixels = (w: number, h: number) => Math.ceil((w * h) / MP_PIXELS);

/**
 * The price of a run: every output image pays for its own megapixels and, for edits, for the reference images it
 * was conditioned on (as N separate BFL requests would); with LoRAs, the surcharge on its output megapixels.
 */
export function priceRun(
  price: ModelPrice,
  output: { width: number; height: number; count: number },
  inputs: { width: number; height: number }[] = [],
  o: { loras?: number } = {},
): { micros: number; breakdown: CostBreakdown } {
  const inputMp = inputs.reduce((s, i) => s + megapixels(i.width, i.height), 0);
  const outMp = megapixels(output.width, output.height);
  const withLoras = (o.loras ?? 0) > 0;
  const lines: CostLine[] = [];
  let total = 0;
  for (let i = 0; i < output.count; i++) {
    const first = micros(price.firstMpUsd);
    const extra = (outMp - 1) * micros(price.extraMpUsd);
    const inp = inputMp * micros(price.inputMpUsd);
    const lora = withLoras ? outMp * micros(price.loraMpUsd ?? 0) : 0;
    const sum = first + extra + inp + lora;
    total += sum;
    lines.push({
      image_index: i, width: output.width, height: output.height, output_mp: outMp,
      first_mp_usd: formatUsd(first), extra_mp: outMp - 1, extra_mp_usd: formatUsd(extra),
      input_mp: inputMp, input_mp_usd: formatUsd(inp), ...(withLoras ? { lora_mp: outMp, lora_usd: formatUsd(lora) } : {}), total_usd: formatUsd(sum),
    });
  }
  const unit = { first_mp_usd: formatUsd(micros(price.firstMpUsd)), extra_mp_usd: formatUsd(micros(price.extraMpUsd)), input_mp_usd: formatUsd(micros(price.inputMpUsd)) };
  return {
    micros: total,
    breakdown: {
      currency: 'USD', state: 'estimated', unit: 'megapixel',
      price: withLoras ? { ...unit, lora_mp_usd: formatUsd(micros(price.loraMpUsd ?? 0)) } : unit,
      ...(withLoras ? { loras: o.loras } : {}),
      images: lines, total_usd: formatUsd(total),
    },
  };
}

export function priceLabel(p: ModelPrice): string {
  return `$${formatUsd(micros(p.firstMpUsd))} first megapixel + $${formatUsd(micros(p.extraMpUsd))} per further megapixel (rounded up)` +
    (p.inputMpUsd > 0 ? `; edits + $${formatUsd(micros(p.inputMpUsd))} per input megapixel` : '') +
    (p.loraMpUsd ? `; with LoRAs + $${formatUsd(micros(p.loraMpUsd))} per output megapixel` : '');
}
