// The playground's LoRA box (web/request.ts, no DOM): one PATH[:SCALE] per line as the CLI's --lora reads it, into
// the run input's `loras`, and back from a finished run's input ("reuse settings").
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { buildRequest, loraLines, parseLoraLines, settingsFromRun, type Settings } from '../../web/request.ts';
import { parseLoraSpec } from '../../src/service/lora-fetch.ts';
import { LIMITS, SIZE_PRESETS } from '../../src/pipeline/limits.ts';

const CFG = { presets: SIZE_PRESETS, limits: LIMITS, models: { t2i: 'm', edit: 'm/edit' } };

test('LoRA lines parse as the CLI parses --lora, reach the input, and come back from a run', () => {
  const lines = ['styles/ink.safetensors:0.75', '  acme/ink-lora  ', 'https://h.example:8443/x.safetensors:-.5', 'https://h.example:8443', '', 'odd:name.safetensors'];
  const parsed = parseLoraLines(lines.join('\n'));
  assert.deepEqual(parsed, lines.map((l) => l.trim()).filter(Boolean).map((l) => { const s = parseLoraSpec(l); return { path: s.ref, scale: s.scale }; }));
  const s: Settings = { mode: 't2i', prompt: 'x', size: 'square', width: 0, height: 0, seed: null, steps: null, count: 1, format: 'png', background: 'auto', refs: [], loras: parsed };
  const req = buildRequest(s, CFG);
  assert.deepEqual(req.body.input.loras, parsed);
  assert.equal(buildRequest({ ...s, loras: [] }, CFG).body.input.loras, undefined);
  assert.deepEqual(parseLoraLines(loraLines(parsed)), parsed);
  assert.deepEqual(settingsFromRun(req.body.input, 1, false, CFG, []).loras, parsed);
});
