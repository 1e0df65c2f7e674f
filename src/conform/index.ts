// The registry of conformance components, in pipeline order.
import type { ConformComponent } from './types.ts';
import { notImplemented } from './not-implemented.ts';
import { vaeComponent } from './vae.ts';
import { samplerComponent } from './sampler.ts';

export const COMPONENTS: ConformComponent[] = [
  notImplemented('tokenizer', 'tokenizer'),
  notImplemented('text-encoder', 'text_encoder'),
  notImplemented('transformer', 'transformer'),
  vaeComponent,
  samplerComponent,
  notImplemented('pipeline', 'pipeline'),
  notImplemented('birefnet', 'birefnet'),
];
