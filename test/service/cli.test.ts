import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { realPipeline, tempDir } from './helpers.ts';
import { startServe, stopProcess, type ServeProcess } from '../cli/helpers.ts';

const ROOT = path.resolve(import.meta.dirname, '../..');
const klein = (...args: string[]) => spawnSync(process.execPath, [path.join(ROOT, 'bin/klein.js'), ...args], { encoding: 'utf8', env: { ...process.env, KLEIN_LOG_LEVEL: 'silent' } });

let modelDir: string;
before(async () => {
  const p = await realPipeline(); // makes (or reuses) the tiny model folder
  modelDir = p.modelDir;
  await p.close();
});

const started: ChildProcess[] = [];
// a failed assertion must not leave a server running (it would keep this test file from ever exiting)
after(() => {
  for (const p of started) if (p.exitCode === null) p.kill('SIGKILL');
});

/** Start `klein serve` on a free port; resolves with the process and everything it printed once listening. */
function serve(dataDir: string, ...extra: string[]): Promise<ServeProcess> {
  return startServe(['--model', modelDir, '--data', dataDir, '--port', '0', ...extra], { track: started });
}

const stop = stopProcess;
const me = (url: string, key: string) => fetch(`${url}/v1/auth/me`, { headers: { authorization: `Bearer ${key}` } });

test('klein serve prints an admin key once; klein keys create prints a working key on its last line; list and revoke', async () => {
  const data = tempDir();
  const first = await serve(data);
  const admin = first.lines[first.lines.length - 1];
  assert.match(admin, /^kl_live_[\w-]{32}$/);
  assert.equal((await me(first.url, admin)).status, 200);

  const created = klein('keys', 'create', '--data', data, '--name', 'ci', '--rate-limit', '30');
  assert.equal(created.status, 0, created.stderr);
  const key = created.stdout.trim().split('\n').pop()!;
  assert.match(key, /^kl_live_/);
  const r = (await (await me(first.url, key)).json()) as any; // created while the server runs: WAL shares it
  assert.equal(r.key.name, 'ci');
  assert.equal(r.limits.run_creations_per_minute, 30);

  const list = klein('keys', 'list', '--data', data, '--json');
  const rows = JSON.parse(list.stdout);
  assert.deepEqual(rows.map((k: any) => [k.name, k.is_admin]), [['admin', 1], ['ci', 0]]);
  assert.ok(!list.stdout.includes(key) && !list.stdout.includes('hash'), 'no key material listed');

  const revoked = klein('keys', 'revoke', rows[1].id, '--data', data);
  assert.equal(revoked.status, 0, revoked.stderr);
  const denied = await me(first.url, key);
  assert.equal(denied.status, 401);
  await stop(first.proc);

  const second = await serve(data);
  assert.ok(!second.lines.some((l) => l.startsWith('kl_live_')), 'the admin key is printed on first start only');
  assert.equal((await me(second.url, admin)).status, 200);
  await stop(second.proc);

  const bad = klein('keys', 'revoke', 'key_nope', '--data', data);
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /no key with id or prefix/);
  const port = klein('serve', '--port', 'eighty', '--data', data, '--model', modelDir);
  assert.equal(port.status, 2);
  assert.match(port.stderr, /--port must be a whole number/);
});


test('klein serve checks transparent requests against its matting weights (--matting-model) at creation', async () => {
  const missing = path.join(tempDir(), 'no-such-matting-model');
  const s = await serve(tempDir(), '--matting-model', missing);
  const admin = s.lines[s.lines.length - 1];
  const create = (input: object) => fetch(`${s.url}/v1/models/flux-2-klein-4b/runs`, { method: 'POST', headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' }, body: JSON.stringify({ input }) });
  const r = await create({ prompt: 'a sticker', background: 'transparent' });
  const body = (await r.json()) as { code: string; message: string };
  assert.equal(r.status, 503, `${JSON.stringify(body)} ${s.lines.join('|')}`);
  assert.equal(body.code, 'MATTING_UNAVAILABLE');
  assert.ok(body.message.includes(missing), body.message);
  assert.match(body.message, /klein pull --matting/);
  const runs = (await (await fetch(`${s.url}/v1/runs`, { headers: { authorization: `Bearer ${admin}` } })).json()) as { data: unknown[] };
  assert.equal(runs.data.length, 0);
  await stop(s.proc);
});
