// A conformance component runs every golden case it finds under a folder laid out like test/golden.
import type { ExecutionTarget } from '../runtime/target.ts';

export interface CaseResult {
  component: string;
  /** e.g. `transformer/case1 (bfl) output` */
  name: string;
  maxAbsErr: number;
  tolerance: number;
  passed: boolean;
  /** Why a case failed without numbers (missing file, exception, not implemented). */
  error?: string;
}

export interface ConformOptions {
  /** Where and how the components run (fast mode is not conformance: exact, or fp16/fp32 on a GPU). */
  target: ExecutionTarget;
}

export interface ConformComponent {
  name: string;
  /** Yields one result per checked output; must yield nothing when `dir` holds no case of this component. */
  run(goldenDir: string, opts: ConformOptions): AsyncIterable<CaseResult>;
}
