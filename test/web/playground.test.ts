// The playground at `/`, driven in Debian's chromium (headless, through playwright-core) against the real service on
// a tiny random model: generate, edit with an uploaded reference, progress, API errors, keyboard and a narrow screen.
// Each state is saved as a screenshot under test-artifacts/playground/.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import fs from 'node:fs';
import path from 'node:path';
import { chromium, type Browser, type Page } from 'playwright-core';
import sharp from 'sharp';
import type { ImagePipeline } from '../../src/pipeline/types.ts';
import { mattingProbe } from '../../src/service/background.ts';
import { type Harness, realPipeline, startService, tempDir } from '../service/helpers.ts';

const CHROMIUM = process.env.KLEIN_CHROMIUM ?? '/usr/bin/chromium';
const ROOT = path.resolve(import.meta.dirname, '../..');
const SHOTS = path.join(ROOT, 'test-artifacts/playground');

describe('web playground', () => {
  let h: Harness;
  let engine: ImagePipeline;
  let browser: Browser;

  before(async () => {
    if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found: apt-get install -y chromium (or set KLEIN_CHROMIUM)`);
    fs.mkdirSync(SHOTS, { recursive: true });
    engine = await realPipeline();
    h = await startService({ pipeline: engine });
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update'],
    });
  });
  after(async () => {
    await browser?.close();
    await h?.svc.close();
    await engine?.close();
  });

  /** A fresh page (own storage) at `/`, with the key typed in unless told otherwise; page errors fail the test. */
  async function open(o: { key?: boolean; width?: number; height?: number } = {}): Promise<Page> {
    const ctx = await browser.newContext({ viewport: { width: o.width ?? 1280, height: o.height ?? 900 } });
    const page = await ctx.newPage();
    const errors: string[] = [];
    page.on('pageerror', (e) => errors.push(e.message));
    page.on('console', (m) => { if (m.type() === 'error' && !/status of 4\d\d/.test(m.text())) errors.push(m.text()); });
    (page as Page & { jsErrors: string[] }).jsErrors = errors;
    const res = await page.goto(h.url + '/');
    assert.equal(res?.status(), 200);
    await page.waitForSelector('html[data-ready=true]');
    if (o.key !== false) await page.fill('#api-key', h.key);
    return page;
  }
  const jsErrors = (page: Page) => (page as Page & { jsErrors: string[] }).jsErrors;
  const shot = (page: Page, name: string) => page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });

  /** Record every text the progress line shows (a run on the tiny model can be faster than polling). */
  const recordProgress = (page: Page) =>
    page.evaluate(() => {
      const seen: string[] = [];
      (window as unknown as { progressSeen: string[] }).progressSeen = seen;
      const el = document.getElementById('progress-text')!;
      // each record's added text: the callback runs once for several changes made in one task
      new MutationObserver((records) => {
        for (const r of records) for (const n of r.addedNodes) seen.push(n.textContent ?? '');
      }).observe(el, { childList: true });
    });
  const progressSeen = (page: Page) => page.evaluate(() => (window as unknown as { progressSeen: string[] }).progressSeen);

  async function customSize(page: Page, w: number, hgt: number) {
    await page.selectOption('#size', 'custom');
    await page.fill('#width', String(w));
    await page.fill('#height', String(hgt));
  }

  /** naturalWidth/Height of the gallery's images, once all have loaded. */
  async function loadedImages(page: Page, count: number) {
    try {
      // an error shown ends the wait at once (and fails below)
      await page.waitForFunction((n) => {
        const imgs = [...document.querySelectorAll<HTMLImageElement>('#gallery img')];
        return !document.getElementById('error')!.hidden || (imgs.length >= n && imgs.every((i) => i.complete && i.naturalWidth > 0));
      }, count, { timeout: 120_000 });
      assert.ok(await page.isHidden('#error'));
    } catch (e) {
      await shot(page, 'failed');
      const state = await page.evaluate(() => ({ progress: document.getElementById('progress-text')?.textContent, error: document.getElementById('error')?.textContent, imgs: [...document.querySelectorAll<HTMLImageElement>('#gallery img')].map((i) => [i.src, i.complete, i.naturalWidth]) }));
      throw new Error(`no ${count} loaded images: ${JSON.stringify(state)} (${(e as Error).message.split('\n')[0]})`);
    }
    return page.$$eval('#gallery img', (imgs) => (imgs as HTMLImageElement[]).map((i) => ({ w: i.naturalWidth, h: i.naturalHeight, src: i.src })));
  }

  test('the page and its assets are served without a key; the config carries the API presets', async () => {
    const html = await fetch(h.url + '/');
    assert.match(html.headers.get('content-type') ?? '', /text\/html/);
    const text = await html.text();
    assert.match(text, /id="klein-config"/);
    const js = await fetch(h.url + '/playground/app.js');
    assert.equal(js.status, 200);
    assert.match(js.headers.get('content-type') ?? '', /javascript/);
    assert.ok((await js.text()).length > 2000);
    const css = await fetch(h.url + '/playground/app.css');
    assert.match(css.headers.get('content-type') ?? '', /text\/css/);
  });

  test('generates an image: progress per step, the <img> loads at the asked size, key kept, snippets, download', async () => {
    const page = await open();
    await page.fill('#prompt', 'a red cube on a table');
    await customSize(page, 80, 64);
    await page.fill('#seed', '1234');
    await page.fill('#steps', '3');
    await page.selectOption('#count', '2');
    await page.selectOption('#format', 'webp');
    await page.click('#code summary');
    const curl = await page.textContent('#code-curl');
    assert.match(curl!, /\/v1\/models\/black-forest-labs\/flux-2-klein-4b\/runs/);
    assert.match(curl!, /"width": 80/);
    assert.match(curl!, /"seed": 1234/);
    await page.click('#tab-ts');
    const ts = await page.textContent('#code-ts');
    assert.match(ts!, /num_inference_steps": 3/);
    assert.ok(await page.isHidden('#code-curl'));
    await shot(page, '1-form');

    await recordProgress(page);
    await page.click('#generate');
    const imgs = await loadedImages(page, 2);
    assert.deepEqual(imgs.map((i) => [i.w, i.h]), [[80, 64], [80, 64]]);
    const seen = await progressSeen(page);
    for (const step of [1, 2, 3]) assert.ok(seen.some((t) => t.startsWith(`Step ${step} of 3`)), `no "Step ${step} of 3" in ${JSON.stringify(seen)}`);
    assert.match(await page.textContent('#progress-text') ?? '', /^Done · 2 images in/);
    assert.ok(await page.isHidden('#cancel'));
    assert.ok(await page.isEnabled('#generate'));
    assert.deepEqual(await page.$$eval('.meta-seed', (d) => d.map((x) => x.textContent)), ['1234', '1235']);
    assert.deepEqual(await page.$$eval('.meta-size', (d) => d.map((x) => x.textContent)), ['80×64', '80×64']);
    assert.match((await page.textContent('.meta-cost'))!, /^\$\d+\.\d+/);
    // opaque results get no transparency checkerboard and no background line
    assert.equal(await page.locator('#gallery img.alpha').count(), 0);
    assert.equal(await page.locator('.meta-background').count(), 0);
    assert.match((await page.textContent('.meta-time'))!, /\d s/);

    // the download link is the image itself, with a file name
    const link = page.locator('.card a[download]').first();
    const href = await link.getAttribute('href');
    assert.match((await link.getAttribute('download'))!, /\.webp$/);
    const meta = await sharp(Buffer.from(await (await fetch(href!)).arrayBuffer())).metadata();
    assert.deepEqual([meta.format, meta.width, meta.height], ['webp', 80, 64]);
    await shot(page, '2-generated');

    // the key survives a reload (localStorage), and "reuse settings" puts a result's settings back
    await page.reload();
    await page.waitForSelector('html[data-ready=true]');
    assert.equal(await page.inputValue('#api-key'), h.key);
    assert.equal(await page.inputValue('#prompt'), '');
    assert.deepEqual(jsErrors(page), []);
    await page.context().close();
  });

  test('shows live progress while a longer run denoises, and reuse settings restores it', async () => {
    const page = await open();
    await page.fill('#prompt', 'a long walk');
    await customSize(page, 256, 256);
    await page.fill('#steps', '40');
    await page.fill('#seed', '77');
    await recordProgress(page);
    await page.click('#generate');
    await page.waitForFunction(() => /^Step \d+ of 40/.test(document.getElementById('progress-text')?.textContent ?? ''), null, { timeout: 120_000 });
    assert.ok(await page.isVisible('#cancel'));
    assert.equal(await page.textContent('#generate'), 'Generating…');
    await shot(page, '3-progress');
    await loadedImages(page, 1);
    const steps = (await progressSeen(page)).map((t) => /^Step (\d+) of 40/.exec(t)?.[1]).filter(Boolean).map(Number);
    assert.ok(steps.length >= 2 && steps[steps.length - 1] === 40, JSON.stringify(steps));
    assert.deepEqual(steps, [...steps].sort((a, b) => a - b));
    const bar = await page.$eval('#progress-bar', (p) => (p as HTMLProgressElement).value);
    assert.equal(bar, 100);

    // change everything, then reuse the result's settings
    await page.fill('#prompt', 'something else');
    await page.selectOption('#size', 'square');
    await page.fill('#steps', '');
    await page.fill('#seed', '');
    await page.click('.card button:has-text("Reuse settings")');
    assert.equal(await page.inputValue('#prompt'), 'a long walk');
    assert.equal(await page.inputValue('#size'), 'custom');
    assert.deepEqual([await page.inputValue('#width'), await page.inputValue('#height')], ['256', '256']);
    assert.equal(await page.inputValue('#steps'), '40');
    assert.equal(await page.inputValue('#seed'), '77');
    assert.equal(await page.evaluate(() => document.activeElement?.id), 'prompt');
    assert.deepEqual(jsErrors(page), []);
    await page.context().close();
  });

  test('cancel stops a running run and says it was not billed', async () => {
    const page = await open();
    await page.fill('#prompt', 'never mind');
    await customSize(page, 256, 256);
    await page.fill('#steps', '50');
    await page.click('#generate');
    await page.waitForFunction(() => /^Step \d+ of 50/.test(document.getElementById('progress-text')?.textContent ?? ''), null, { timeout: 120_000 });
    await page.click('#cancel');
    await page.waitForFunction(() => document.getElementById('progress-text')?.textContent === 'Cancelled; not billed.');
    assert.equal(await page.locator('#gallery li').count(), 0);
    assert.ok(await page.isHidden('#cancel'));
    const runs = await h.api('GET', '/v1/runs?limit=1');
    assert.equal(runs.json.data[0].status_code, 'cancelled');
    assert.equal(runs.json.data[0].input.prompt, 'never mind');
    assert.deepEqual(jsErrors(page), []);
    await page.context().close();
  });

  test('edits with an uploaded reference: thumbnail, size from the reference, result at that size', async () => {
    const dir = tempDir('klein-web-');
    const ref = path.join(dir, 'ref photo.png');
    // a real image with structure (a gradient with a square), 96×80
    const w = 96, hh = 80;
    const px = Buffer.alloc(w * hh * 3);
    for (let y = 0; y < hh; y++) for (let x = 0; x < w; x++) {
      const o = (y * w + x) * 3;
      const inSq = x > 30 && x < 60 && y > 20 && y < 50;
      px[o] = inSq ? 240 : (x * 255) / w;
      px[o + 1] = inSq ? 40 : (y * 255) / hh;
      px[o + 2] = 120;
    }
    await sharp(px, { raw: { width: w, height: hh, channels: 3 } }).png().toFile(ref);

    const page = await open();
    await page.check('input[name=model][value=edit]');
    assert.ok(await page.isVisible('#drop'));
    assert.equal(await page.inputValue('#size'), 'auto');
    // Generate without a reference: the page says what is missing before asking the API
    await page.fill('#prompt', 'make the square blue');
    await page.click('#generate');
    assert.match((await page.textContent('#error'))!, /at least one reference image/);

    await page.setInputFiles('#ref-files', ref);
    await page.waitForFunction(() => {
      const i = document.querySelector<HTMLImageElement>('#thumbs img');
      return !!i && i.complete && i.naturalWidth === 96;
    });
    assert.equal(await page.getAttribute('#thumbs img', 'alt'), 'Reference 1: ref photo.png');
    assert.match((await page.textContent('#size-hint'))!, /^96×80 = /);
    await page.click('#code summary');
    const curl = (await page.textContent('#code-curl'))!;
    assert.match(curl, /IMG1="data:image\/png;base64,\$\(base64 -w0 'ref photo\.png'\)"/);
    assert.match((await page.textContent('#code-ts'))!, /dataUri\("ref photo\.png", "image\/png"\)/);
    // the snippets are the same request: run both beside the file and get the edit back at the reference's size
    const env = { ...process.env, KLEIN_API_KEY: h.key };
    // asynchronously: the server answering them runs in this process
    const run = promisify(execFile);
    const sh = await run('bash', ['-c', curl], { cwd: dir, env, timeout: 120_000 });
    const viaCurl = JSON.parse(sh.stdout);
    assert.equal(viaCurl.status_code, 'succeeded', sh.stdout.slice(0, 500));
    assert.deepEqual([viaCurl.output.images[0].width, viaCurl.output.images[0].height], [96, 80]);
    fs.writeFileSync(path.join(dir, 'snippet.mts'), (await page.textContent('#code-ts'))!);
    const ts = await run(path.join(ROOT, 'node_modules/.bin/tsx'), ['snippet.mts'], { cwd: dir, env, timeout: 120_000 });
    assert.match(ts.stdout, /^succeeded \[\s+'http:\/\/127\.0\.0\.1:\d+\/v1\/files\//);
    await page.fill('#steps', '2');
    await shot(page, '4-edit-form');

    await recordProgress(page);
    await page.click('#generate');
    const imgs = await loadedImages(page, 1);
    assert.deepEqual([imgs[0].w, imgs[0].h], [96, 80]);
    assert.ok(await page.isHidden('#error'));
    assert.ok((await progressSeen(page)).some((t) => t.startsWith('Step 2 of 2')));
    await shot(page, '5-edited');

    // drag and drop: four more images onto the drop zone; the fifth is refused with a message
    const dropped = await fs.promises.readFile(ref);
    await page.evaluate((b64) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      for (let i = 1; i <= 4; i++) dt.items.add(new File([bytes], `dropped-${i}.png`, { type: 'image/png' }));
      document.getElementById('drop')!.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }, dropped.toString('base64'));
    await page.waitForFunction(() => document.querySelectorAll('#thumbs img').length === 4);
    assert.match((await page.textContent('#error'))!, /dropped-4\.png: at most 4 reference images/);
    assert.deepEqual(await page.$$eval('#thumbs img', (l) => l.map((i) => i.getAttribute('alt'))), ['Reference 1: ref photo.png', 'Reference 2: dropped-1.png', 'Reference 3: dropped-2.png', 'Reference 4: dropped-3.png']);
    await shot(page, '5b-four-references');
    for (let i = 0; i < 3; i++) await page.click('#thumbs li:last-child .remove');

    // remove the reference with the keyboard: focus its button, press Enter
    await page.focus('#thumbs .remove');
    await page.keyboard.press('Enter');
    assert.equal(await page.locator('#thumbs li').count(), 0);
    // reuse brings the reference back (from the run's input)
    await page.click('.card button:has-text("Reuse settings")');
    await page.waitForFunction(() => document.querySelectorAll('#thumbs img').length === 1);
    assert.ok(await page.isChecked('input[name=model][value=edit]'));
    assert.deepEqual(jsErrors(page), []);
    await page.context().close();
  });

  test('transparent background: jpeg is not offered, the field is sent, the result shows its alpha over a checkerboard', async () => {
    const page = await open();
    await page.fill('#prompt', 'a yellow rubber duck');
    await customSize(page, 64, 64);
    await page.fill('#seed', '21');
    await page.fill('#steps', '2');
    await page.selectOption('#format', 'jpeg');
    assert.equal(await page.textContent('#background-hint'), '');
    // choosing transparent while jpeg is picked: the format visibly becomes png, the hint says why, jpeg is disabled
    await page.selectOption('#background', 'transparent');
    assert.equal(await page.inputValue('#format'), 'png');
    assert.match((await page.textContent('#background-hint'))!, /JPEG has no alpha channel, so the format is now PNG/);
    assert.ok(await page.$eval('#format option[value=jpeg]', (o) => (o as HTMLOptionElement).disabled));
    // typing elsewhere keeps the notice; picking a format (webp) ends it
    await page.fill('#prompt', 'a yellow rubber duck, studio photo');
    assert.match((await page.textContent('#background-hint'))!, /format is now PNG/);
    await page.selectOption('#format', 'webp');
    assert.match((await page.textContent('#background-hint'))!, /^The subject is cut out by a matting model/);
    await page.click('#code summary');
    assert.match((await page.textContent('#code-curl'))!, /"background": "transparent"/);
    await shot(page, '9-transparent-form');

    // the request the page sends carries the field
    const sent = page.waitForRequest((r) => r.method() === 'POST' && r.url().endsWith('/runs'));
    await page.click('#generate');
    assert.deepEqual(JSON.parse((await sent).postData()!).input.background, 'transparent');
    const [img] = await loadedImages(page, 1);
    assert.deepEqual([img.w, img.h], [64, 64]);
    const file = await sharp(Buffer.from(await (await fetch(img.src)).arrayBuffer())).metadata();
    assert.deepEqual([file.format, file.channels], ['webp', 4]);
    assert.equal(await page.textContent('.meta-background'), 'transparent');
    const card = page.locator('#gallery img').first();
    assert.ok(await card.evaluate((e) => e.classList.contains('alpha')));
    assert.match(await card.evaluate((e) => getComputedStyle(e).backgroundImage), /conic-gradient/);
    // the checkerboard really shows through: the rendered card changes when the pattern behind it is taken away
    const withBoard = await card.screenshot();
    await card.evaluate((e) => ((e as HTMLElement).style.background = 'none'));
    const without = await card.screenshot();
    assert.ok(!withBoard.equals(without), 'the alpha lets the checkerboard through');
    await card.evaluate((e) => ((e as HTMLElement).style.background = ''));
    await shot(page, '10-transparent-result');

    // back to opaque: jpeg is offered again; reuse restores transparent
    await page.selectOption('#background', 'opaque');
    assert.ok(!(await page.$eval('#format option[value=jpeg]', (o) => (o as HTMLOptionElement).disabled)));
    assert.equal(await page.textContent('#background-hint'), '');
    await page.click('.card button:has-text("Reuse settings")');
    assert.equal(await page.inputValue('#background'), 'transparent');
    assert.equal(await page.inputValue('#format'), 'webp');
    assert.deepEqual(jsErrors(page), []);
    await page.context().close();
  });

  test('a server without matting weights: Transparent is not offered, and the page says how to install them', async () => {
    // the probe klein serve uses, pointed at a folder that holds no matting model
    const bare = await startService({ pipeline: engine, matting: mattingProbe({ explicit: path.join(tempDir('klein-web-'), 'no-matting') }) });
    try {
      const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
      const page = await ctx.newPage();
      await page.goto(bare.url + '/');
      await page.waitForSelector('html[data-ready=true]');
      await page.waitForFunction(() => (document.querySelector('#background option[value=transparent]') as HTMLOptionElement).disabled);
      assert.equal(await page.textContent('#background option[value=transparent]'), 'Transparent (not installed on this server)');
      assert.match((await page.textContent('#background-hint'))!, /^Transparent backgrounds are not available here: .*klein pull --matting/);
      // jpeg stays on offer: only transparency is missing
      assert.ok(!(await page.$eval('#format option[value=jpeg]', (o) => (o as HTMLOptionElement).disabled)));
      await shot(page, '11-no-matting');
      await ctx.close();
    } finally {
      await bare.svc.close();
    }
  });

  test('API errors: an invalid size and a missing key show the envelope message', async () => {
    const page = await open();
    await page.fill('#prompt', 'a cat');
    await customSize(page, 1000, 64);
    // the hint warns before sending
    assert.match((await page.textContent('#size-hint'))!, /width 1000 is not a multiple of 16/);
    assert.ok(await page.$eval('#size-hint', (e) => e.classList.contains('warn')));
    await page.click('#generate');
    await page.waitForSelector('#error:not([hidden])');
    // the same request straight to the API: the page shows its message and field errors
    const api = await h.api('POST', '/v1/models/black-forest-labs/flux-2-klein-4b/runs', { input: { prompt: 'a cat', image_size: { width: 1000, height: 64 }, num_images: 1, output_format: 'png' } });
    assert.equal(api.status, 422);
    assert.equal(await page.textContent('#error .error-message'), api.json.message);
    const items = await page.$$eval('#error li', (l) => l.map((x) => x.textContent));
    assert.ok(items.length >= 1 && items.some((t) => t!.startsWith('image_size')), JSON.stringify(items));
    assert.match((await page.textContent('#error'))!, /VALIDATION_ERROR · HTTP 422/);
    assert.equal(await page.textContent('#generate'), 'Generate');
    assert.ok(await page.isHidden('#progress'));
    await shot(page, '6-error-size');

    // no key: the API's 401 message
    await page.fill('#api-key', '');
    await customSize(page, 64, 64);
    await page.click('#generate');
    await page.waitForFunction(() => /API key was refused/.test(document.getElementById('error')?.textContent ?? ''));
    const noKey = await fetch(h.url + '/v1/models/black-forest-labs/flux-2-klein-4b/runs', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"input":{"prompt":"x"}}' });
    assert.equal(await page.textContent('#error .error-message'), ((await noKey.json()) as { message: string }).message);
    assert.match((await page.textContent('#error .advice'))!, /klein keys create/);
    await shot(page, '7-error-key');
    assert.deepEqual(jsErrors(page), []);
    await page.context().close();
  });

  test('keyboard only on a narrow screen: no sideways scroll, visible focus, tab order, Ctrl+Enter generates', async () => {
    const page = await open({ width: 375, height: 812 });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the page scrolls sideways by ${overflow}px at 375px`);
    // the form fields come in reading order when tabbing from the key field
    await page.focus('#api-key');
    const order: string[] = [];
    for (let i = 0; i < 16; i++) {
      await page.keyboard.press('Tab');
      order.push(await page.evaluate(() => document.activeElement?.id || (document.activeElement as HTMLInputElement)?.value || ''));
    }
    const want = ['t2i', 'prompt', 'size', 'seed', 'dice', 'steps', 'count', 'format', 'background', 'generate'];
    assert.deepEqual(order.filter((x) => want.includes(x)), want, order.join(','));
    // focus is drawn: a focused field gets a box-shadow ring
    await page.focus('#seed');
    await page.keyboard.press('Shift+Tab');
    await page.keyboard.press('Tab');
    assert.notEqual(await page.$eval('#seed', (e) => getComputedStyle(e).boxShadow), 'none');
    // the dice, by keyboard
    await page.focus('#dice');
    await page.keyboard.press('Enter');
    assert.match(await page.inputValue('#seed'), /^\d+$/);
    // edit mode by arrow keys in the radio group
    await page.focus('input[name=model][value=t2i]');
    await page.keyboard.press('ArrowRight');
    assert.ok(await page.isChecked('input[name=model][value=edit]'));
    await page.keyboard.press('ArrowLeft');
    // type a prompt and generate with Ctrl+Enter
    await page.focus('#prompt');
    await page.keyboard.type('a tiny boat');
    await customSize(page, 64, 64);
    await page.fill('#steps', '1');
    await page.focus('#prompt');
    await page.keyboard.press('Control+Enter');
    const imgs = await loadedImages(page, 1);
    assert.deepEqual([imgs[0].w, imgs[0].h], [64, 64]);
    const after = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(after <= 0, `with a result the page scrolls sideways by ${after}px`);
    await page.focus('#seed');
    await shot(page, '8-narrow');
    assert.deepEqual(jsErrors(page), []);
    await page.context().close();
  });
});
