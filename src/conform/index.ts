// The registry of conformance components, in pipeline order.
import type { ConformComponent } from './types.ts';
import { notImplemented } from './not-implemented.ts';

export const COMPONENTS: ConformComponent[] = [
  notImplemented('tokenizer', 'tokenizer'),
  notImplemented('text-encoder', 'text_encoder'),
  notImplemented('transformer', 'transformer'),
  notImplemented('vae', 'vae'),
  notImplemented('sampler', 'sampler'),
  notImplemented('pipeline', 'pipeline'),
  notImplemented('birefnet', 'birefnet'),
];
