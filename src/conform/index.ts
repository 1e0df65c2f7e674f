// The registry of conformance components, in pipeline order.
import type { ConformComponent } from './types.ts';
import { vaeComponent } from './vae.ts';
import { tokenizerComponent } from './tokenizer.ts';
import { textEncoderComponent } from './text-encoder.ts';
import { samplerComponent } from './sampler.ts';
import { pipelineComponent } from './pipeline.ts';
import { birefnetComponent } from './birefnet.ts';
import { transformerComponent } from './transformer.ts';

export const COMPONENTS: ConformComponent[] = [
  tokenizerComponent,
  textEncoderComponent,
  transformerComponent,
  vaeComponent,
  samplerComponent,
  pipelineComponent,
  birefnetComponent,
];
