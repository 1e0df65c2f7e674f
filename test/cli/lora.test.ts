// `klein generate|edit --lora FILE_OR_HUB_REF[:SCALE]` as a user runs them, on a tiny model and its tiny LoRAs
// (`klein dev make-tiny-lora`): a LoRA changes the image, :0 gives the base bytes, --lora-dir and $KLEIN_LORA_DIR
// resolve relative names, --json reports the file and its sha256, and every LoRA that cannot be used exits 2 with
// a message that says why, before anything is generated or written.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { runKlein, tmpDir } from './helpers.ts';

let work: string;
let model: string;
let loras: string;
const GEN = ['-W', '96', '-H', '64', '--seed', '5', '-q'];

before(async () => {
  work = tmpDir('cli-lora');
  model = path.join(work, 'tiny');
  loras = path.join(work, 'loras');
  assert.equal((await runKlein(['dev', 'make-tiny-model', model, '--seed', '3'])).code, 0);
  const r = await runKlein(['dev', 'make-tiny-lora', model, loras, '--format', 'kohya', 'diffusers']);
  assert.equal(r.code, 0, r.stderr);
});

test('--lora changes the image, :0 gives the base bytes; --lora-dir / $KLEIN_LORA_DIR resolve names; --json names the file', async () => {
  const out = (n: string) => path.join(work, n);
  assert.equal((await runKlein(['generate', 'a fox', '-m', model, ...GEN, '-o', out('base.png')])).code, 0);
  const zero = await runKlein(['generate', 'a fox', '-m', model, ...GEN, '-o', out('zero.png'), '--lora', `${loras}/kohya.safetensors:0`]);
  assert.equal(zero.code, 0, zero.stderr);
  assert.ok(fs.readFileSync(out('base.png')).equals(fs.readFileSync(out('zero.png'))), 'scale 0 is the base image');
  const two = await runKlein(['generate', 'a fox', '-m', model, ...GEN, '-o', out('two.png'), '--lora-dir', loras, '--lora', 'kohya.safetensors:0.9', '--lora', 'diffusers.safetensors', '--json']);
  assert.equal(two.code, 0, two.stderr);
  const j = JSON.parse(two.stdout);
  const sha = crypto.createHash('sha256').update(fs.readFileSync(path.join(loras, 'kohya.safetensors'))).digest('hex');
  assert.deepEqual(j.loras.map((l: { ref: string; scale: number; sha256: string }) => [l.ref, l.scale, l.sha256.length]), [['kohya.safetensors', 0.9, 64], ['diffusers.safetensors', 1, 64]]);
  assert.equal(j.loras[0].sha256, sha);
  assert.ok(j.timings.lora > 0);
  const [a, b] = await Promise.all([sharp(out('base.png')).raw().toBuffer(), sharp(out('two.png')).raw().toBuffer()]);
  assert.ok(a.some((v, i) => Math.abs(v - b[i]) > 8), 'the LoRAs changed the image');
  const env = await runKlein(['generate', 'a fox', '-m', model, ...GEN, '-o', out('env.png'), '--lora', 'kohya.safetensors:0.9', '--lora', 'diffusers.safetensors'], { KLEIN_LORA_DIR: loras });
  assert.equal(env.code, 0, env.stderr);
  assert.ok(fs.readFileSync(out('env.png')).equals(fs.readFileSync(out('two.png'))), 'the same LoRAs through $KLEIN_LORA_DIR');
});

test('LoRAs that cannot be used exit 2 with the reason, and no image is written', async () => {
  const flux1 = path.join(work, 'flux1.safetensors');
  const kohya = fs.readFileSync(path.join(loras, 'kohya.safetensors'));
  fs.writeFileSync(path.join(work, 'truncated.safetensors'), kohya.subarray(0, kohya.length - 100));
  fs.writeFileSync(path.join(work, 'notes.ckpt'), 'not a LoRA');
  // a FLUX.1 kohya key: per-block modulation exists in FLUX.1 only
  const header = JSON.stringify({ 'lora_unet_double_blocks_0_img_mod_lin.lora_down.weight': { dtype: 'F32', shape: [1, 4], data_offsets: [0, 16] }, 'lora_unet_double_blocks_0_img_mod_lin.lora_up.weight': { dtype: 'F32', shape: [4, 1], data_offsets: [16, 32] } });
  const h = Buffer.from(header);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(h.length));
  fs.writeFileSync(flux1, Buffer.concat([len, h, Buffer.alloc(32)]));
  const cases: Array<[string[], RegExp]> = [
    [['--lora', flux1], /FLUX\.1 LoRA/],
    [['--lora', path.join(work, 'truncated.safetensors')], /not a valid safetensors file/],
    [['--lora', path.join(work, 'notes.ckpt')], /not a \.safetensors file/],
    [['--lora', path.join(work, 'missing.safetensors')], /not an existing file/],
    [['--lora', `${loras}/kohya.safetensors:12`], /between -10 and 10/],
    [['--lora', 'https://10.0.0.1/x.safetensors'], /private, loopback or link-local/],
    [Array.from({ length: 5 }, () => ['--lora', `${loras}/kohya.safetensors`]).flat(), /at most 4 --lora/],
  ];
  for (const [args, why] of cases) {
    const o = path.join(work, 'refused.png');
    const r = await runKlein(['generate', 'a fox', '-m', model, ...GEN, '-o', o, ...args]);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, why);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
    assert.ok(!fs.existsSync(o));
  }
});
