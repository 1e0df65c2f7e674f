#!/usr/bin/env node
// The CLI runs the TypeScript sources directly through tsx's loader, so a fresh clone works right after
// `npm ci` with no build step and no stale build can ever be run.
import { register } from 'tsx/esm/api';

register();
const { reexecWithMallocTunables } = await import('../src/cli/reexec.ts');
if (!reexecWithMallocTunables(process.argv)) {
  const { main } = await import('../src/cli/main.ts');
  await main(process.argv);
}
