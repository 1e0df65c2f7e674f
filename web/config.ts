// What the server injects into the page (the size presets and limits come from the pipeline's limits module, the
// model ids from the variant the server runs, so the page never disagrees with the API about what it accepts).
export interface PlaygroundConfig {
  presets: Record<string, { width: number; height: number }>;
  limits: { minSide: number; multiple: number; maxPixels: number; maxImages: number; maxSteps: number; maxRefs: number; maxSeed: number; maxPromptChars: number };
  models: { t2i: string; edit: string };
}

export function readConfig(doc: Document): PlaygroundConfig {
  const el = doc.getElementById('klein-config');
  if (!el?.textContent) throw new Error('the page has no #klein-config; is it served by klein serve?');
  return JSON.parse(el.textContent) as PlaygroundConfig;
}
