// Seconds per pipeline stage; a stage nested in another (a lazy load inside `text`) is charged to itself only.
export type Timings = Record<string, number>;

export class Stopwatch {
  readonly timings: Timings = {};
  private readonly t0 = performance.now();
  private readonly open: number[] = []; // nested seconds of each running stage

  async time<T>(stage: string, fn: () => Promise<T>): Promise<T> {
    const s = performance.now();
    this.open.push(0);
    try {
      return await fn();
    } finally {
      const total = (performance.now() - s) / 1000;
      const nested = this.open.pop()!;
      this.timings[stage] = (this.timings[stage] ?? 0) + total - nested;
      if (this.open.length) this.open[this.open.length - 1] += total;
    }
  }

  total(): number {
    return (performance.now() - this.t0) / 1000;
  }
}
