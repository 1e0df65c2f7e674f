// The FLUX.2 [klein] sampler maths: the empirical-mu timestep schedule, the Euler step of the rectified-flow ODE
// and classifier-free guidance for the base (undistilled) variants. Pure functions on Float32Arrays; the model
// evaluations live in the pipeline. Spec: flux2-klein-spec.md §6.3–6.6; golden: sampler/schedules.json.

/**
 * `compute_empirical_mu(image_seq_len, num_steps)`: a linear fit in the token count, itself interpolated between
 * fitted 10-step and 200-step lines (so it depends on the step count), except above 4300 tokens where only the
 * 200-step line is used. Evaluated in float64 exactly as the reference's Python floats.
 */
export function computeEmpiricalMu(imageSeqLen: number, numSteps: number): number {
  const a1 = 8.73809524e-5;
  const b1 = 1.89833333;
  const a2 = 0.00016927;
  const b2 = 0.45666666;
  if (imageSeqLen > 4300) return a2 * imageSeqLen + b2;
  const m200 = a2 * imageSeqLen + b2;
  const m10 = a1 * imageSeqLen + b1;
  const a = (m200 - m10) / 190.0;
  const b = m200 - 200.0 * a;
  return a * numSteps + b;
}

/** torch.linspace(start, end, steps) in float32: the first half counts up from start, the second down from end. */
export function linspaceF32(start: number, end: number, steps: number): Float32Array {
  const out = new Float32Array(steps);
  if (steps === 1) {
    out[0] = start;
    return out;
  }
  const step = Math.fround((end - start) / (steps - 1));
  const half = Math.floor(steps / 2);
  for (let i = 0; i < steps; i++) {
    out[i] = i < half ? Math.fround(start + Math.fround(step * i)) : Math.fround(end - Math.fround(step * (steps - i - 1)));
  }
  return out;
}

/**
 * BFL `get_schedule(num_steps, image_seq_len)`: `t = linspace(1, 0, n+1)` shifted by
 * `t ← e^mu / (e^mu + (1/t − 1))` (the exponential time-SNR shift with sigma = 1). The reference evaluates the
 * shift with float32 tensors (a scalar divided by a tensor is torch's `reciprocal(x) * scalar`); we round at the
 * same places, which reproduces `bfl.timesteps` bit for bit in 92 % of the golden values and within one float32
 * ulp (6e-8) in the rest.
 */
export function getSchedule(numSteps: number, imageSeqLen: number): Float32Array {
  if (!Number.isInteger(numSteps) || numSteps < 1) throw new RangeError(`num_steps must be a positive integer, got ${numSteps}`);
  const mu = computeEmpiricalMu(imageSeqLen, numSteps);
  const emu = Math.fround(Math.exp(mu));
  const t = linspaceF32(1, 0, numSteps + 1);
  const out = new Float32Array(numSteps + 1);
  for (let i = 0; i < t.length; i++) {
    if (t[i] === 0 || t[i] === 1) {
      // 1/0 − 1 = inf ⇒ e^mu/inf = 0; at t = 1 the float32 reciprocal-multiply can land one ulp below 1
      out[i] = t[i];
      continue;
    }
    const r = Math.fround(Math.fround(1 / t[i]) - 1);
    out[i] = Math.fround(Math.fround(1 / Math.fround(emu + r)) * emu);
  }
  return out;
}

/**
 * The diffusers `FlowMatchEulerDiscreteScheduler` values for the same schedule (`sigmas = linspace(1, 1/N, N)` in
 * float64, exponential shift with `mu`, float32, then a trailing 0), for cross-checking against the golden file.
 */
export function diffusersSigmas(numSteps: number, imageSeqLen: number): Float32Array {
  const mu = computeEmpiricalMu(imageSeqLen, numSteps);
  const out = new Float32Array(numSteps + 1);
  for (let i = 0; i < numSteps; i++) {
    const s = numSteps === 1 ? 1 : 1 + ((1 / numSteps - 1) * i) / (numSteps - 1);
    out[i] = Math.exp(mu) / (Math.exp(mu) + (1 / s - 1));
  }
  out[numSteps] = 0;
  return out;
}

/** Number of image tokens the schedule is computed for: target tokens only, references never count. */
export function imageSeqLen(width: number, height: number): number {
  return Math.floor(height / 16) * Math.floor(width / 16);
}

/**
 * One Euler step of the flow ODE, in place: `x ← x + (t_next − t_curr) · v`. `v` may be longer than `x` (the
 * model's output over target + reference tokens, per batch row): only its first `x.length / batch` values of each
 * row are used, as `pred[:, :n_img]` in the reference.
 */
export function eulerStep(x: Float32Array, v: Float32Array, tCurr: number, tNext: number, batch = 1): void {
  const dt = Math.fround(tNext - tCurr); // a Python float scalar times a float32 tensor: the scalar is cast first
  const rowX = x.length / batch;
  const rowV = v.length / batch;
  if (!Number.isInteger(rowX) || !Number.isInteger(rowV) || rowV < rowX) {
    throw new RangeError(`euler step: velocity of ${v.length} values does not cover latents of ${x.length} in a batch of ${batch}`);
  }
  for (let b = 0; b < batch; b++) {
    const ox = b * rowX;
    const ov = b * rowV;
    for (let i = 0; i < rowX; i++) x[ox + i] = x[ox + i] + dt * v[ov + i];
  }
}

/**
 * Classifier-free guidance on a `[uncond, cond]` batch output of 2·n values (row 0 = the empty prompt):
 * `uncond + g · (cond − uncond)`, returning n values.
 */
export function cfgCombine(uncondCond: Float32Array, guidance: number): Float32Array {
  if (uncondCond.length % 2 !== 0) throw new RangeError(`CFG needs an [uncond, cond] batch, got ${uncondCond.length} values`);
  const n = uncondCond.length / 2;
  const out = new Float32Array(n);
  const g = Math.fround(guidance);
  for (let i = 0; i < n; i++) {
    const u = uncondCond[i];
    out[i] = u + g * Math.fround(uncondCond[n + i] - u);
  }
  return out;
}
