// `klein bench pipeline`'s own options, through the real CLI: contradictory ones are usage errors (exit 2) before
// any model folder is written or read — `--outliers` and `--blocks` build random models, so they cannot go with
// `--model`, and `--compare-exact` compares a fast image with the exact one.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runKlein } from './helpers.ts';

test('klein bench pipeline: --outliers or --blocks with --model, a bad --blocks, and --compare-exact without fast exit 2', async () => {
  const cases: Array<[string[], RegExp]> = [
    [['--outliers', '--model', '/nonexistent'], /--outliers builds the random stress model; it cannot be combined with --model/],
    [['--blocks', '1,2', '--model', '/nonexistent'], /--blocks builds a random model; it cannot be combined with --model/],
    [['--blocks', '0,0'], /--blocks must be DOUBLE,SINGLE \(e\.g\. 1,2; klein 4B is 5,20\), got "0,0"/],
    [['--compare-exact', '--precision', 'exact'], /--compare-exact needs --precision fast/],
  ];
  for (const [args, message] of cases) {
    const r = await runKlein(['bench', 'pipeline', ...args], { KLEIN_DEVICE: 'cpu', KLEIN_PRECISION: undefined });
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, message, args.join(' '));
  }
  const help = await runKlein(['bench', 'pipeline', '--help']);
  assert.match(help.stdout, /--outliers\s+the stress model/);
});
