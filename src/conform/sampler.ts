// Conformance of the sampler maths: every schedule of sampler/schedules.json (mu, the BFL timesteps and the
// diffusers scheduler values), and the Euler update replayed on the stored model outputs of pipeline/*.safetensors
// (so the update rule is checked without running any model).
import fs from 'node:fs';
import path from 'node:path';
import { computeEmpiricalMu, diffusersSigmas, eulerStep, getSchedule } from '../pipeline/schedule.ts';
import { GoldenCase, absResult, errorResult, findCases } from './golden.ts';
import type { CaseResult, ConformComponent } from './types.ts';

const NAME = 'sampler';
/** Float32 schedule values: the reference evaluates in float32, we agree within a few ulps (ulp at 1 = 6e-8). */
const SCHEDULE_TOL = 1e-6;

interface ScheduleEntry {
  width: number;
  height: number;
  num_steps: number;
  image_seq_len: number;
  mu: number;
  bfl: { timesteps: number[] };
  diffusers: { sigmas: number[]; timesteps: number[]; model_timestep_input: number[] };
}

function* scheduleCases(file: string): Generator<CaseResult> {
  const doc = JSON.parse(fs.readFileSync(file, 'utf8')) as { schedules: ScheduleEntry[] };
  for (const s of doc.schedules) {
    const tag = `sampler/schedules.json ${s.width}x${s.height} ${s.num_steps} steps`;
    try {
      const seq = Math.floor(s.height / 16) * Math.floor(s.width / 16);
      if (seq !== s.image_seq_len) {
        yield { component: NAME, name: `${tag} image_seq_len`, maxAbsErr: Math.abs(seq - s.image_seq_len), tolerance: 0, passed: false };
        continue;
      }
      yield absResult(NAME, `${tag} mu`, [computeEmpiricalMu(seq, s.num_steps)], [s.mu], 1e-12);
      yield absResult(NAME, `${tag} bfl.timesteps`, getSchedule(s.num_steps, seq), s.bfl.timesteps, SCHEDULE_TOL);
      const sig = diffusersSigmas(s.num_steps, seq);
      yield absResult(NAME, `${tag} diffusers.sigmas`, sig, s.diffusers.sigmas, SCHEDULE_TOL);
      const ts = Array.from(sig.subarray(0, s.num_steps), (x) => Math.fround(x * 1000));
      // timesteps are ~1000: one float32 ulp there is 6e-5
      yield absResult(NAME, `${tag} diffusers.timesteps`, ts, s.diffusers.timesteps, 1e-3);
      yield absResult(NAME, `${tag} diffusers.model_timestep_input`, ts.map((x) => Math.fround(x / 1000)), s.diffusers.model_timestep_input, SCHEDULE_TOL);
    } catch (e) {
      yield errorResult(NAME, tag, e);
    }
  }
}

/** Replays `x ← x + (t[i+1] − t[i]) · model_out[:, :n_img]` from `x_init` on the stored model outputs. */
function* eulerCases(file: string): Generator<CaseResult> {
  const c = new GoldenCase(file);
  const tag = `pipeline/${c.name} euler`;
  if (!c.has('step0.model_out') || !c.has('x_init')) return; // the CFG case stores no single-model steps
  try {
    const t = c.f32('timesteps');
    const x = c.f32('x_init');
    for (let i = 0; i + 1 < t.length && c.has(`step${i}.model_out`); i++) {
      eulerStep(x, c.f32(`step${i}.model_out`), t[i], t[i + 1], c.shape('x_init')[0]);
      yield absResult(NAME, `${tag} step${i}.x_after`, x, c.f32(`step${i}.x_after`), 1e-5);
    }
  } catch (e) {
    yield errorResult(NAME, tag, e);
  }
}

export const samplerComponent: ConformComponent = {
  name: NAME,
  async *run(goldenDir: string): AsyncIterable<CaseResult> {
    const sched = path.join(goldenDir, 'sampler', 'schedules.json');
    if (fs.existsSync(sched)) yield* scheduleCases(sched);
    for (const f of findCases(path.join(goldenDir, 'pipeline'), /\.safetensors$/)) yield* eulerCases(f);
  },
};
