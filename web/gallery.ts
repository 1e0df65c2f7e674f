// The results: one card per image (newest first) with its size, seed, time and cost, a download link and
// "reuse settings".
import type { Run } from './api.ts';

const EXT: Record<string, string> = { 'image/png': 'png', 'image/jpeg': 'jpg', 'image/webp': 'webp' };

export function seconds(ms: number | null): string {
  return ms === null ? '–' : ms < 10_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms / 1000)} s`;
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, cls?: string, text?: string): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

/** Add a finished run's images at the top of the gallery. */
export function addRun(gallery: HTMLElement, run: Run, onReuse: (run: Run, seed: number) => void): void {
  const out = run.output;
  if (!out) return;
  const cards = out.images.map((img, i) => {
    const seed = out.seed + i; // image i of a run uses seed + i
    const li = el('li', 'card');
    li.dataset.runId = run.id;
    const fig = el('figure');
    const pic = el('img');
    pic.src = img.url ?? '';
    pic.alt = `${out.prompt.slice(0, 120)} (seed ${seed})`;
    pic.width = img.width;
    pic.height = img.height;
    pic.decoding = 'async';
    // the alpha shows against a checkerboard, as image editors show it
    if (img.has_alpha) pic.classList.add('alpha');
    const cap = el('figcaption');
    const meta = el('dl', 'meta');
    const rows = [['Size', `${img.width}×${img.height}`], ['Seed', String(seed)], ['Time', seconds(run.duration_ms)], ['Cost', run.cost === null ? '–' : `$${run.cost}`]];
    if (img.has_alpha) rows.push(['Background', 'transparent']);
    for (const [k, v] of rows) {
      const d = el('div');
      d.append(el('dt', undefined, k), el('dd', `meta-${k.toLowerCase()}`, v));
      meta.append(d);
    }
    const prompt = el('p', 'prompt', out.prompt);
    const actions = el('div', 'card-actions');
    const dl = el('a', 'button secondary small', 'Download');
    dl.href = img.url ?? '#';
    dl.download = `klein-${run.id.toLowerCase()}-${i + 1}.${EXT[img.content_type] ?? 'img'}`;
    dl.setAttribute('aria-label', `Download image ${i + 1} (seed ${seed})`);
    const reuse = el('button', 'button secondary small', 'Reuse settings');
    reuse.type = 'button';
    reuse.setAttribute('aria-label', `Reuse the settings of image ${i + 1} (seed ${seed})`);
    reuse.addEventListener('click', () => onReuse(run, seed));
    actions.append(dl, reuse);
    cap.append(prompt, meta);
    if (out.images.length > 1) cap.append(el('p', 'note', `Image ${i + 1} of ${out.images.length} from one run: time and cost are the run's.`));
    cap.append(actions);
    if (out.prompt_truncated) cap.append(el('p', 'hint', 'The prompt was longer than the text window and was truncated.'));
    fig.append(pic, cap);
    li.append(fig);
    return li;
  });
  gallery.prepend(...cards);
}
