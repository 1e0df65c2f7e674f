// Where ORT placed each node of the sessions a script opens: ORT lists every session's node placement at log level 0
// (verbose), so the script runs in a child process with KLEIN_ORT_LOG_LEVEL=0 and its log is parsed here. ORT writes
// some lines to stdout and some to stderr: both go to one file, in order.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';

/** Per session opened, in order: execution provider → op type → node count. */
export type Placement = Record<string, Record<string, number>>;

/** Runs `script` (an ES module body; it may import the sources by absolute path) and returns each session's placement. */
export async function ortPlacements(script: string, logFile: string): Promise<Placement[]> {
  const fd = fs.openSync(logFile, 'w');
  try {
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { env: { ...process.env, KLEIN_ORT_LOG_LEVEL: '0' }, stdio: ['ignore', fd, fd] });
    const [code] = await once(child, 'exit');
    assert.equal(code, 0, fs.readFileSync(logFile, 'utf8').slice(-2000));
  } finally {
    fs.closeSync(fd);
  }
  const placed: Placement[] = [];
  let ep = '';
  for (const line of fs.readFileSync(logFile, 'utf8').split('\n')) {
    if (line.includes('Node placements')) placed.push({});
    const m = line.match(/Node\(s\) placed on \[(\w+)\]/);
    if (m && placed.length) placed[placed.length - 1][(ep = m[1])] = {};
    const n = line.match(/VerifyEachNodeIsAssignedToAnEp\] {3}(\w+) \(/);
    if (n && ep && placed.length) {
      const counts = placed[placed.length - 1][ep];
      counts[n[1]] = (counts[n[1]] ?? 0) + 1;
    }
  }
  return placed;
}
