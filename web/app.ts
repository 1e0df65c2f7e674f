// The playground page: reads the form, sends the run, follows its events, and fills the gallery.
import { ApiError, cancelRun, createRun, followRun, getHealth, listModels, type Run, type RunEvent } from './api.ts';
import { readConfig } from './config.ts';
import { addRun, seconds } from './gallery.ts';
import { readReferences, renderThumbs } from './refs.ts';
import { alphaFormat, buildRequest, loraLines, megapixels, outputSize, parseLoraLines, type Reference, type Settings, settingsFromRun, sizeProblems } from './request.ts';
import { curlSnippet, tsSnippet } from './snippets.ts';

const KEY_STORE = 'klein.apiKey';
const cfg = readConfig(document);

const $ = <T extends HTMLElement = HTMLElement>(id: string) => {
  const e = document.getElementById(id);
  if (!e) throw new Error(`#${id} is missing from the page`);
  return e as T;
};
const form = $<HTMLFormElement>('form');
const keyInput = $<HTMLInputElement>('api-key');
const prompt = $<HTMLTextAreaElement>('prompt');
const sizeSel = $<HTMLSelectElement>('size');
const widthIn = $<HTMLInputElement>('width');
const heightIn = $<HTMLInputElement>('height');
const seedIn = $<HTMLInputElement>('seed');
const stepsIn = $<HTMLInputElement>('steps');
const countSel = $<HTMLSelectElement>('count');
const formatSel = $<HTMLSelectElement>('format');
const backgroundSel = $<HTMLSelectElement>('background');
const lorasIn = $<HTMLTextAreaElement>('loras');
const fileIn = $<HTMLInputElement>('ref-files');
const drop = $('drop');
const errorBox = $('error');
const progressBox = $('progress');
const progressBar = $<HTMLProgressElement>('progress-bar');
const progressText = $('progress-text');
const generateBtn = $<HTMLButtonElement>('generate');
const cancelBtn = $<HTMLButtonElement>('cancel');
const gallery = $('gallery');

let refs: Reference[] = [];
let current: { id: string } | null = null;

// ---- settings <-> form

const mode = (): Settings['mode'] => ((form.elements.namedItem('model') as RadioNodeList).value === 'edit' ? 'edit' : 't2i');
const intOrNull = (v: string) => (v.trim() === '' ? null : Number(v));

function settings(): Settings {
  return {
    mode: mode(), prompt: prompt.value, size: sizeSel.value, width: Number(widthIn.value), height: Number(heightIn.value),
    seed: intOrNull(seedIn.value), steps: intOrNull(stepsIn.value), count: Number(countSel.value),
    format: formatSel.value as Settings['format'], background: backgroundSel.value as Settings['background'], refs,
    loras: parseLoraLines(lorasIn.value),
  };
}

/** `modeChanged`: a preset picked for the other mode gives way to this mode's default; a custom size stays. */
function fillSizeOptions(modeChanged = false): void {
  const keep = modeChanged && sizeSel.value !== 'custom' ? '' : sizeSel.value;
  const opts: [string, string][] = [];
  if (mode() === 'edit') opts.push(['auto', 'As 1st reference']);
  for (const [name, s] of Object.entries(cfg.presets)) opts.push([name, `${name.replace(/_/g, ' ')} · ${s.width}×${s.height}`]);
  opts.push(['custom', 'Custom…']);
  sizeSel.replaceChildren(...opts.map(([v, t]) => new Option(t, v)));
  sizeSel.value = opts.some(([v]) => v === keep) ? keep : mode() === 'edit' ? 'auto' : 'landscape_4_3';
}

function apply(s: Partial<Settings>): void {
  if (s.mode) (form.querySelector<HTMLInputElement>(`input[name=model][value=${s.mode}]`)!).checked = true;
  if (s.prompt !== undefined) prompt.value = s.prompt;
  if (s.refs) refs = s.refs;
  fillSizeOptions();
  if (s.size) sizeSel.value = s.size;
  if (s.width) widthIn.value = String(s.width);
  if (s.height) heightIn.value = String(s.height);
  if (s.seed !== undefined) seedIn.value = s.seed === null ? '' : String(s.seed);
  if (s.steps !== undefined) stepsIn.value = s.steps === null ? '' : String(s.steps);
  if (s.count) countSel.value = String(s.count);
  if (s.format) formatSel.value = s.format;
  if (s.background) backgroundSel.value = s.background;
  if (s.loras) lorasIn.value = loraLines(s.loras);
  refresh();
}

const mp = (v: number) => (v >= 0.1 ? v.toFixed(2) : v.toPrecision(2));

/**
 * A transparent background needs an alpha channel: JPEG is not offered then. When it was the format already, it
 * becomes PNG and the hint says so (a visible change, never a silent one).
 */
let formatSwitched = false;
/** Set when the server says it has no matting weights: Transparent is not offered, and the hint says why. */
let mattingMissing: string | null = null;
function syncBackground(): void {
  const option = backgroundSel.querySelector<HTMLOptionElement>('option[value=transparent]')!;
  option.disabled = mattingMissing !== null;
  option.textContent = mattingMissing !== null ? 'Transparent (not installed on this server)' : 'Transparent (cut out)';
  if (mattingMissing !== null && backgroundSel.value === 'transparent') backgroundSel.value = 'auto';
  const transparent = backgroundSel.value === 'transparent';
  const jpeg = formatSel.querySelector<HTMLOptionElement>('option[value=jpeg]')!;
  jpeg.disabled = transparent;
  jpeg.textContent = transparent ? 'JPEG (no alpha channel)' : 'JPEG';
  if (transparent && !alphaFormat(formatSel.value as Settings['format'])) {
    formatSel.value = 'png';
    formatSwitched = true;
  }
  // the notice stays until the person picks a format, or a background other than transparent
  if (!transparent) formatSwitched = false;
  const switched = formatSwitched;
  const hint = $('background-hint');
  hint.classList.toggle('warn', switched);
  if (mattingMissing !== null) hint.textContent = `Transparent backgrounds are not available here: ${mattingMissing}`;
  else if (!transparent) hint.textContent = '';
  else if (switched) hint.textContent = 'JPEG has no alpha channel, so the format is now PNG. The subject is cut out by a matting model.';
  else hint.textContent = 'The subject is cut out by a matting model: PNG or WebP with alpha. Shadows are removed; glass and smoke are approximated.';
}

/** Everything that follows from the settings: visible parts, the size hint, thumbnails, snippets. */
function refresh(): void {
  syncBackground();
  const s = settings();
  $('refs').hidden = s.mode !== 'edit';
  $('custom-size').hidden = s.size !== 'custom';
  renderThumbs($('thumbs'), refs, (i) => {
    refs = refs.filter((_, j) => j !== i);
    refresh();
    fileIn.focus();
  });
  const hint = $('size-hint');
  const problems = s.size === 'custom' ? sizeProblems(s.width, s.height, cfg) : [];
  const size = outputSize(s, cfg);
  const cap = `max ${cfg.limits.maxPixels / 2 ** 20} MP, sides multiples of ${cfg.limits.multiple}`;
  hint.classList.toggle('warn', problems.length > 0);
  hint.textContent = problems.length
    ? `${problems.join('; ')} (${cap})`
    : size
      ? `${size.width}×${size.height} = ${mp(megapixels(size.width, size.height))} MP (${cap})`
      : `the size of the first reference, fitted to the rules (${cap})`;
  const req = buildRequest(s, cfg);
  $('code-curl').textContent = curlSnippet(req, s, location.origin);
  $('code-ts').textContent = tsSnippet(req, s, location.origin);
}

// ---- errors and progress

function showError(title: string, e?: unknown, advice?: string): void {
  errorBox.replaceChildren();
  const strong = document.createElement('strong');
  strong.textContent = title;
  errorBox.append(strong);
  if (e instanceof ApiError) {
    const p = document.createElement('p');
    p.className = 'error-message';
    p.textContent = e.message;
    errorBox.append(p);
    if (e.errors.length) {
      const ul = document.createElement('ul');
      for (const fe of e.errors) {
        const li = document.createElement('li');
        // loc is [body, input, field, …]: the field path is what a person recognises
        li.textContent = `${fe.loc.filter((x) => x !== 'body' && x !== 'input').join('.') || 'request'}: ${fe.message}`;
        ul.append(li);
      }
      errorBox.append(ul);
    }
    const code = document.createElement('p');
    code.className = 'hint';
    code.textContent = e.status ? `${e.code} · HTTP ${e.status}` : e.code;
    errorBox.append(code);
  } else if (e) {
    const p = document.createElement('p');
    p.className = 'error-message';
    p.textContent = e instanceof Error ? e.message : String(e);
    errorBox.append(p);
  }
  if (advice) {
    const p = document.createElement('p');
    p.className = 'advice';
    p.textContent = advice;
    errorBox.append(p);
  }
  errorBox.hidden = false;
}

function clearError(): void {
  errorBox.hidden = true;
  errorBox.replaceChildren();
}

function showProgress(percent: number, text: string): void {
  progressBox.hidden = false;
  progressBar.value = percent;
  progressText.textContent = text;
}

function onEvent(e: RunEvent): void {
  if (e.event === 'progress') {
    const p = e.data;
    const what = p.stage === 'denoise' && p.step ? `Step ${p.step} of ${p.total}` : p.message ?? stageName(p.stage);
    showProgress(p.percent, `${what} · ${Math.round(p.percent)}%`);
  } else if (e.event === 'queued') showProgress(0, 'Queued…');
  else if (e.event === 'running') showProgress(e.data.progress?.percent ?? 0, `Running · ${stageName(e.data.progress?.stage ?? 'preprocess')}`);
}

const STAGES: Record<string, string> = { queued: 'Queued', preprocess: 'Preparing', load: 'Loading the model', text: 'Reading the prompt', reference: 'Encoding references', denoise: 'Denoising', decode: 'Decoding', matting: 'Cutting out the subject', output: 'Encoding images', done: 'Done' };
const stageName = (s: string) => STAGES[s] ?? s;

// ---- running

function busy(on: boolean): void {
  generateBtn.disabled = on;
  generateBtn.textContent = on ? 'Generating…' : 'Generate';
  cancelBtn.hidden = !on;
}

async function generate(): Promise<void> {
  if (current) return;
  clearError();
  const s = settings();
  if (s.mode === 'edit' && !s.refs.length) {
    showError('Add a reference image', new Error('Edit needs at least one reference image: choose files or drop them on the box.'));
    fileIn.focus();
    return;
  }
  const req = buildRequest(s, cfg);
  const key = keyInput.value.trim();
  busy(true);
  showProgress(0, 'Sending…');
  try {
    const created = await createRun(key, req.modelId, req.body);
    current = { id: created.id };
    const run = await followRun(key, created.id, onEvent);
    finish(run);
  } catch (e) {
    progressBox.hidden = true;
    if (e instanceof ApiError && e.status === 401) showError('The API key was refused', e, 'Paste a key at the top: the admin key klein serve printed on its first start, or one from `klein keys create`.');
    else if (e instanceof ApiError) showError('The request was refused', e);
    else showError('Something went wrong', e);
  } finally {
    current = null;
    busy(false);
  }
}

function finish(run: Run): void {
  if (run.status_code === 'succeeded' && run.output) {
    $('empty').hidden = true;
    addRun(gallery, run, reuse);
    const n = run.output.images.length;
    showProgress(100, `Done · ${n} image${n > 1 ? 's' : ''} in ${seconds(run.duration_ms)}${run.cost ? ` · $${run.cost}` : ''}`);
  } else if (run.status_code === 'cancelled') {
    showProgress(0, 'Cancelled; not billed.');
  } else {
    progressBox.hidden = true;
    showError('The run failed', new ApiError(0, run.failure_code ?? 'FAILED', run.failure_message ?? 'the run failed without a message'));
  }
}

async function reuse(run: Run, seed: number): Promise<void> {
  const urls = Array.isArray(run.input.image_urls) ? (run.input.image_urls as string[]) : [];
  const again: Reference[] = [];
  for (const [i, u] of urls.entries()) {
    const type = /^data:([^;,]+)/.exec(u)?.[1] ?? 'image/png';
    const size = await new Promise<{ width: number; height: number }>((res) => {
      const img = new Image();
      img.onload = () => res({ width: img.naturalWidth, height: img.naturalHeight });
      img.onerror = () => res({ width: 0, height: 0 });
      img.src = u;
    });
    again.push({ name: `reference-${i + 1}.${type.split('/')[1] ?? 'png'}`, type, dataUri: u, ...size });
  }
  apply(settingsFromRun(run.input, seed, run.model_id.endsWith('/edit'), cfg, again));
  prompt.focus();
  prompt.scrollIntoView({ block: 'center' });
}

// ---- wiring

keyInput.value = localStorage.getItem(KEY_STORE) ?? '';
keyInput.addEventListener('input', () => localStorage.setItem(KEY_STORE, keyInput.value.trim()));

form.addEventListener('submit', (e) => {
  e.preventDefault();
  void generate();
});
form.addEventListener('input', refresh);
formatSel.addEventListener('change', () => (formatSwitched = false));
form.addEventListener('change', (e) => {
  if ((e.target as HTMLInputElement).name === 'model') fillSizeOptions(true);
  refresh();
});
prompt.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    void generate();
  }
});
$('dice').addEventListener('click', () => {
  seedIn.value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
  refresh();
});
cancelBtn.addEventListener('click', () => {
  if (!current) return;
  showProgress(progressBar.value, 'Cancelling…');
  cancelRun(keyInput.value.trim(), current.id).catch((e) => showError('Could not cancel', e));
});

async function addFiles(files: File[]): Promise<void> {
  const max = cfg.limits.maxRefs;
  const { refs: more, problems } = await readReferences(files, max - refs.length, max);
  refs = [...refs, ...more];
  if (problems.length) showError('Some files were not added', new Error(problems.join('\n')));
  else clearError();
  refresh();
}
fileIn.addEventListener('change', () => {
  void addFiles([...(fileIn.files ?? [])]);
  fileIn.value = ''; // choosing the same file again still fires change
});
for (const ev of ['dragenter', 'dragover'] as const) {
  drop.addEventListener(ev, (e) => {
    e.preventDefault();
    drop.classList.add('over');
  });
}
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => {
  e.preventDefault();
  drop.classList.remove('over');
  void addFiles([...(e.dataTransfer?.files ?? [])]);
});

// code tabs: arrow keys move between them (the ARIA tabs pattern)
const tabs = [$<HTMLButtonElement>('tab-curl'), $<HTMLButtonElement>('tab-ts')];
function selectTab(t: HTMLButtonElement): void {
  for (const x of tabs) {
    const on = x === t;
    x.setAttribute('aria-selected', String(on));
    x.tabIndex = on ? 0 : -1;
    $(x.getAttribute('aria-controls')!).hidden = !on;
  }
}
tabs.forEach((t, i) => {
  t.addEventListener('click', () => selectTab(t));
  t.addEventListener('keydown', (e) => {
    if (e.key !== 'ArrowRight' && e.key !== 'ArrowLeft') return;
    const next = tabs[(i + (e.key === 'ArrowRight' ? 1 : tabs.length - 1)) % tabs.length];
    selectTab(next);
    next.focus();
  });
});
$('copy').addEventListener('click', async () => {
  const shown = tabs.find((t) => t.getAttribute('aria-selected') === 'true')!;
  const text = $(shown.getAttribute('aria-controls')!).textContent ?? '';
  const btn = $('copy');
  try {
    await navigator.clipboard.writeText(text);
    btn.textContent = 'Copied';
  } catch {
    btn.textContent = 'Select and copy';
  }
  setTimeout(() => (btn.textContent = 'Copy'), 1500);
});

$('refs-max').textContent = String(cfg.limits.maxRefs);
$('steps-max').textContent = String(cfg.limits.maxSteps);
stepsIn.max = String(cfg.limits.maxSteps);
seedIn.max = String(cfg.limits.maxSeed);
prompt.maxLength = cfg.limits.maxPromptChars;
fillSizeOptions();
refresh();
listModels()
  .then((m) => {
    const label = (id: string) => m.data.find((x) => x.id === id)?.price_label;
    const update = () => {
      const p = label(mode() === 'edit' ? cfg.models.edit : cfg.models.t2i);
      $('price').textContent = p ? `Price: ${p}` : '';
    };
    form.addEventListener('change', update);
    update();
  })
  .catch(() => { /* prices are a nicety; the form works without them */ });
getHealth()
  .then((hl) => {
    const t = hl.transparent_backgrounds;
    if (t?.status !== 'unavailable') return;
    mattingMissing = t.message ?? 'the matting weights are not installed';
    refresh();
  })
  .catch(() => { /* the API still answers a transparent request with its reason */ });
document.documentElement.dataset.ready = 'true';
