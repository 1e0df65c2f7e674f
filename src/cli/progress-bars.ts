// Progress on stderr for long CLI commands: a cli-progress bar per stage on a terminal, one plain line per
// stage (and per step) otherwise, so logs of CI runs and services still show where the time went.
import cliProgress from 'cli-progress';

export interface StageBar {
  /** Starts (or switches to) a stage of `total` units. */
  stage(label: string, total: number, unit?: string): void;
  update(value: number): void;
  stop(): void;
}

function fmtBytes(n: number): string {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  if (n >= 2 ** 10) return `${(n / 2 ** 10).toFixed(1)} KiB`;
  return `${n} B`;
}

export function stageBar(opts: { quiet?: boolean; stream?: NodeJS.WriteStream } = {}): StageBar {
  const stream = opts.stream ?? process.stderr;
  if (opts.quiet) return { stage() {}, update() {}, stop() {} };
  if (!stream.isTTY) {
    let label = '';
    let total = 0;
    let unit = '';
    return {
      stage(l, t, u = '') {
        label = l;
        total = t;
        unit = u;
        stream.write(`klein: ${l}${t > 1 && u !== 'bytes' ? ` (${t}${u ? ` ${u}` : ''})` : ''}\n`);
      },
      update(v) {
        // per-step lines for step counts; byte counts would flood the log
        if (unit === 'steps') stream.write(`klein: ${label} ${v}/${total}\n`);
      },
      stop() {},
    };
  }
  let bar: cliProgress.SingleBar | undefined;
  let isBytes = false;
  return {
    stage(label, total, unit = '') {
      bar?.stop();
      isBytes = unit === 'bytes';
      bar = new cliProgress.SingleBar(
        {
          stream,
          format: (_options, params) => {
            const width = 30;
            const done = Math.round(params.progress * width);
            const count = isBytes ? `${fmtBytes(params.value)}/${fmtBytes(params.total)}` : `${params.value}/${params.total}${unit ? ` ${unit}` : ''}`;
            const eta = params.eta > 0 && params.progress < 1 ? ` eta ${Math.round(params.eta)}s` : '';
            return `${label.padEnd(12)} [${'█'.repeat(done)}${'░'.repeat(width - done)}] ${count}${eta}`;
          },
          hideCursor: true,
          clearOnComplete: false,
          etaBuffer: 20,
        },
        cliProgress.Presets.shades_classic,
      );
      bar.start(Math.max(total, 1), 0);
    },
    update(v) {
      bar?.update(v);
    },
    stop() {
      bar?.stop();
      bar = undefined;
    },
  };
}

export { fmtBytes };
