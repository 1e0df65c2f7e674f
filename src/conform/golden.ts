// Reading golden case files and turning comparisons into results.
import fs from 'node:fs';
import path from 'node:path';
import { SafetensorsFile, readFloat32, readInt64, readUint8 } from '../weights/safetensors.ts';
import { compareAbsolute, compareRelative } from './compare.ts';
import type { CaseResult } from './types.ts';

export class GoldenCase {
  readonly file: SafetensorsFile;
  constructor(readonly path: string) {
    this.file = new SafetensorsFile(path);
  }
  get name(): string {
    return path.basename(this.path, '.safetensors');
  }
  has(name: string): boolean {
    return this.file.tensors.has(name);
  }
  shape(name: string): number[] {
    return this.file.info(name).shape;
  }
  f32(name: string): Float32Array {
    return readFloat32(this.file.info(name));
  }
  i64(name: string): BigInt64Array {
    return readInt64(this.file.info(name));
  }
  u8(name: string): Uint8Array {
    return readUint8(this.file.info(name));
  }
  get metadata(): Record<string, string> {
    return this.file.metadata;
  }
}

/** Files in `dir` whose names match `pattern`, sorted naturally (case2 before case10). */
export function findCases(dir: string, pattern: RegExp): string[] {
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((f) => pattern.test(f))
    .sort((a, b) => a.localeCompare(b, 'en', { numeric: true }))
    .map((f) => path.join(dir, f));
}

export function relResult(component: string, name: string, actual: ArrayLike<number>, expected: ArrayLike<number>, factor = 1e-4): CaseResult {
  const c = compareRelative(actual, expected, factor);
  return { component, name, maxAbsErr: c.maxAbsErr, tolerance: c.tolerance, passed: c.passed, error: actual.length !== expected.length ? `length ${actual.length} ≠ ${expected.length}` : undefined };
}

export function absResult(component: string, name: string, actual: ArrayLike<number>, expected: ArrayLike<number>, tolerance: number): CaseResult {
  const c = compareAbsolute(actual, expected, tolerance);
  return { component, name, maxAbsErr: c.maxAbsErr, tolerance: c.tolerance, passed: c.passed, error: actual.length !== expected.length ? `length ${actual.length} ≠ ${expected.length}` : undefined };
}

export function errorResult(component: string, name: string, e: unknown): CaseResult {
  return { component, name, maxAbsErr: NaN, tolerance: NaN, passed: false, error: e instanceof Error ? e.message : String(e) };
}
