// The matting probe (src/service/background.ts) that /v1/health and run creation ask: weights installed, changed or
// removed while the server runs are noticed at its next look; unchanged ones are not read again.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { mattingProbe } from '../../src/service/background.ts';
import { writeTinyMattingModel } from '../../src/fixtures/tiny-model.ts';
import { BUNDLED_MATTING_DIR } from '../../src/weights/matting-folder.ts';
import { tempDir } from './helpers.ts';

test('installed, changed and removed matting weights are noticed; unchanged ones are not read again', () => {
  const saved = { home: process.env.KLEIN_HOME, matting: process.env.KLEIN_MATTING_MODEL };
  // nothing in the environment or the default cache: only the model folder's matting/ counts
  process.env.KLEIN_HOME = tempDir('klein-home-');
  delete process.env.KLEIN_MATTING_MODEL;
  try {
    const root = tempDir('klein-probe-');
    const probe = mattingProbe({ modelRoot: root }, 0); // every call looks
    assert.match(probe() ?? '', /klein pull --matting/);
    const dir = path.join(root, BUNDLED_MATTING_DIR);
    writeTinyMattingModel(dir);
    const weights = fs.readdirSync(dir).filter((f) => f.endsWith('.safetensors')).map((f) => path.join(dir, f));
    assert.ok(weights.length > 0);
    const when = 1_700_000_000; // whole seconds: a time the file system keeps exactly
    fs.utimesSync(weights[0], when, when);
    assert.equal(probe(), null);
    // the weights overwritten with garbage but their size and time kept: the probe sees no change and reads nothing
    fs.writeFileSync(weights[0], Buffer.alloc(fs.statSync(weights[0]).size, 0xff));
    fs.utimesSync(weights[0], when, when);
    assert.equal(probe(), null);
    // a newer time: read again, and the broken header is the answer
    fs.utimesSync(weights[0], when, when + 5);
    assert.match(probe() ?? '', /does not hold BiRefNet matting weights .*bad header/);
    fs.rmSync(dir, { recursive: true });
    assert.match(probe() ?? '', /klein pull --matting/);
  } finally {
    if (saved.home === undefined) delete process.env.KLEIN_HOME;
    else process.env.KLEIN_HOME = saved.home;
    if (saved.matting !== undefined) process.env.KLEIN_MATTING_MODEL = saved.matting;
  }
});
