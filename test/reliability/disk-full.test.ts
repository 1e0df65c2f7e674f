// Disk full on the data folder: a small tmpfs is mounted as the data folder (needs root; skipped where mounting is
// not allowed), filled to the last byte, and runs are created. The server must answer with codes, not crash or
// hang: a run that cannot be stored is refused, a run whose image cannot be written fails with a code, no
// half-written file stays behind, and once space is back the server works again.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { pollUntil, realPipeline, startService, tempDir, terminal } from '../service/helpers.ts';

const T2I = '/v1/models/black-forest-labs/flux-2-klein-4b/runs';
const mountPoint = tempDir('klein-diskfull-');
const mounted = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mountPoint]).status === 0;
after(() => { if (mounted) spawnSync('umount', ['-l', mountPoint]); });

function fill(dir: string): string {
  const f = path.join(dir, 'filler');
  const fd = fs.openSync(f, 'w');
  const chunk = Buffer.alloc(64 * 1024, 1);
  try {
    for (;;) fs.writeSync(fd, chunk);
  } catch (e) {
    assert.equal((e as NodeJS.ErrnoException).code, 'ENOSPC');
  }
  // the last partial chunk too
  try { for (;;) fs.writeSync(fd, Buffer.alloc(512, 1)); } catch { /* full */ }
  fs.closeSync(fd);
  return f;
}

test('disk full on the data folder: refused or failed with a code, nothing half-written, healthy once space is back', { skip: !mounted && 'cannot mount a tmpfs here (needs root)' }, async () => {
  const engine = await realPipeline();
  const h = await startService({ pipeline: engine, dataDir: mountPoint });
  try {
    const ok = await h.api('POST', T2I, { input: { prompt: 'before', image_size: { width: 64, height: 64 } } });
    assert.equal((await pollUntil(h, ok.json.id, terminal, 120_000)).status_code, 'succeeded');
    const filler = fill(mountPoint);
    const outcomes: string[] = [];
    for (let i = 0; i < 3; i++) {
      const c = await h.api('POST', T2I, { input: { prompt: `full ${i}`, image_size: { width: 256, height: 256 } } });
      assert.ok(c.status < 500 || c.json.code === 'STORAGE_FULL', `${c.status} ${JSON.stringify(c.json)}`);
      assert.equal(typeof c.json.code === 'string' || typeof c.json.id === 'string', true);
      if (c.status !== 201) { outcomes.push(`${c.status} ${c.json.code}`); continue; }
      const run = await pollUntil(h, c.json.id, terminal, 120_000);
      assert.equal(run.status_code, 'failed', JSON.stringify(run));
      assert.ok(run.failure_code, JSON.stringify(run));
      assert.match(run.failure_message, /ENOSPC|no space|full/i);
      outcomes.push(`failed ${run.failure_code}`);
    }
    console.log('disk full outcomes:', outcomes.join('; '));
    // the image write of a run that was stored before the disk filled: ENOSPC, and no partial file left behind
    await assert.rejects(h.svc.files.save('01FULLDISKRUN', 0, { data: new Uint8Array(2 * 1024 * 1024), contentType: 'image/png', width: 64, height: 64 } as never), /ENOSPC/);
    const partial = fs.readdirSync(path.join(mountPoint, 'outputs'), { recursive: true }).map(String).filter((f) => f.endsWith('.tmp'));
    assert.deepEqual(partial, []);
    assert.equal((await fetch(h.url + '/v1/health')).status, 200);
    fs.rmSync(filler);
    const after = await h.api('POST', T2I, { input: { prompt: 'space is back', image_size: { width: 64, height: 64 } } });
    assert.equal(after.status, 201);
    assert.equal((await pollUntil(h, after.json.id, terminal, 120_000)).status_code, 'succeeded');
  } finally {
    await h.svc.close();
    await engine.close();
  }
});
