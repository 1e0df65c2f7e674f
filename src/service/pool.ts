// Several pipelines behind one ImagePipeline: each generate() takes a free instance. A pipeline runs one request at
// a time, so `workers` > 1 needs this (and the memory for that many models).
import type { GenerateOptions, GenerateRequest, GenerateResult, ImagePipeline } from '../pipeline/types.ts';

export class PipelinePool implements ImagePipeline {
  private free: ImagePipeline[];
  private waiting: ((p: ImagePipeline) => void)[] = [];

  constructor(readonly members: ImagePipeline[]) {
    if (members.length === 0) throw new RangeError('a pipeline pool needs at least one pipeline');
    this.free = [...members];
  }

  get size(): number {
    return this.members.length;
  }

  async generate(req: GenerateRequest, opts?: GenerateOptions): Promise<GenerateResult> {
    const p = this.free.pop() ?? (await new Promise<ImagePipeline>((resolve) => this.waiting.push(resolve)));
    try {
      return await p.generate(req, opts);
    } finally {
      const next = this.waiting.shift();
      if (next) next(p);
      else this.free.push(p);
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.members.map((p) => p.close()));
  }
}
