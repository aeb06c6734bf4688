/**
 * Progress reports for a copy:
 * - a bar on stderr when it is a terminal (bytes, percentage, rate, ETA),
 *   or a plain line every few seconds when it is not (logs);
 * - `N/100` lines on a file descriptor whenever the percentage changes,
 *   the format nbdcopy's `--progress=FD` uses;
 * - JSON lines with absolute figures (bytes done, total, rate, elapsed),
 *   on stderr or a file descriptor.
 *
 * @module
 */

/** Where reports go: text written as it comes. */
export interface ProgressOutput {
  /** Writes `text`. */
  write(text: string): void;
}

/** One kind of report. */
interface Reporter {
  update(done: number, elapsedMs: number): void;
  finish(done: number, elapsedMs: number, ok: boolean): void;
}

/** Options of `Progress`. */
export interface ProgressOptions {
  /** Human-readable progress on stderr. */
  human?: { output: ProgressOutput; terminal: boolean };
  /** `N/100` lines. */
  percent?: ProgressOutput;
  /** JSON lines. */
  json?: ProgressOutput;
  /** Clock in milliseconds (tests replace it). */
  now?: () => number;
}

const encoder = new TextEncoder();

/** Text written synchronously to stderr. */
export const stderrOutput: ProgressOutput = {
  write(text) {
    try {
      const bytes = encoder.encode(text);
      for (let done = 0; done < bytes.length;) {
        done += Deno.stderr.writeSync(bytes.subarray(done));
      }
    } catch { /* progress must never break the copy */ }
  },
};

/**
 * Text written to an inherited file descriptor. Deno has no API for a raw
 * descriptor number, so it is reopened through /proc/self/fd (same pipe or
 * file; appending so an earlier position is never overwritten).
 */
export function fdOutput(fd: number): ProgressOutput {
  if (!Number.isSafeInteger(fd) || fd < 0) throw new Error(`bad file descriptor "${fd}"`);
  if (fd === 0) throw new Error("progress cannot go to file descriptor 0 (stdin)");
  if (fd === 2) return stderrOutput;
  let target: string;
  try {
    target = Deno.readLinkSync(`/proc/self/fd/${fd}`);
  } catch {
    throw new Error(`file descriptor ${fd} is not open`);
  }
  // Descriptors of the runtime itself (event loop, caches) are never ours to write to.
  if (target.startsWith("anon_inode:")) throw new Error(`file descriptor ${fd} is not open`);
  const file = Deno.openSync(`/proc/self/fd/${fd}`, { write: true, append: true });
  return {
    write(text) {
      try {
        const bytes = encoder.encode(text);
        for (let done = 0; done < bytes.length;) done += file.writeSync(bytes.subarray(done));
      } catch { /* a reader that went away must not break the copy */ }
    },
  };
}

/** 1536 → "1.5 KiB". */
export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0
    ? `${n} B`
    : `${value.toFixed(value < 10 ? 2 : value < 100 ? 1 : 0)} ${units[unit]}`;
}

/** 75 → "1:15", 3700 → "1:01:40". */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${rest}` : `${m}:${rest}`;
}

/** Bytes per second, 0 before any time has passed. */
function rateOf(done: number, elapsedMs: number): number {
  return elapsedMs > 0 ? (done * 1000) / elapsedMs : 0;
}

const BAR_WIDTH = 30;

/** The terminal bar, redrawn in place at most 10 times a second. */
class BarReporter implements Reporter {
  readonly #output: ProgressOutput;
  readonly #total: number | undefined;
  #last = -Infinity;
  #width = 0;

  constructor(output: ProgressOutput, total: number | undefined) {
    this.#output = output;
    this.#total = total;
  }

  #line(done: number, elapsedMs: number, final: boolean): string {
    const rate = rateOf(done, elapsedMs);
    const total = this.#total;
    if (total === undefined) {
      return `${formatBytes(done)} copied  ${formatBytes(rate)}/s  ${
        formatDuration(elapsedMs / 1000)
      }`;
    }
    const fraction = total > 0 ? Math.min(1, done / total) : 1;
    const filled = Math.round(fraction * BAR_WIDTH);
    const bar = "#".repeat(filled) + "-".repeat(BAR_WIDTH - filled);
    const eta = final
      ? `in ${formatDuration(elapsedMs / 1000)}`
      : rate > 0
      ? `ETA ${formatDuration((total - done) / rate)}`
      : "ETA --:--";
    return `[${bar}] ${(fraction * 100).toFixed(0).padStart(3)}%  ${formatBytes(done)} / ${
      formatBytes(total)
    }  ${formatBytes(rate)}/s  ${eta}`;
  }

  #draw(text: string, newline: boolean): void {
    const pad = Math.max(0, this.#width - text.length);
    this.#width = text.length;
    this.#output.write(`\r${text}${" ".repeat(pad)}${newline ? "\n" : ""}`);
  }

  update(done: number, elapsedMs: number): void {
    if (elapsedMs - this.#last < 100) return;
    this.#last = elapsedMs;
    this.#draw(this.#line(done, elapsedMs, false), false);
  }

  finish(done: number, elapsedMs: number, ok: boolean): void {
    this.#draw(this.#line(done, elapsedMs, ok), true);
  }
}

/** Plain lines for logs: one every few seconds, and one at the end. */
class LineReporter implements Reporter {
  readonly #output: ProgressOutput;
  readonly #total: number | undefined;
  readonly #intervalMs: number;
  #last = 0;

  constructor(output: ProgressOutput, total: number | undefined, intervalMs = 2000) {
    this.#output = output;
    this.#total = total;
    this.#intervalMs = intervalMs;
  }

  update(done: number, elapsedMs: number): void {
    if (elapsedMs - this.#last < this.#intervalMs) return;
    this.#last = elapsedMs;
    const rate = rateOf(done, elapsedMs);
    const total = this.#total;
    if (total === undefined) {
      this.#output.write(`copied ${formatBytes(done)}, ${formatBytes(rate)}/s\n`);
      return;
    }
    const percent = total > 0 ? (100 * done) / total : 100;
    const eta = rate > 0 ? `, ETA ${formatDuration((total - done) / rate)}` : "";
    this.#output.write(
      `copied ${formatBytes(done)} of ${formatBytes(total)} (${percent.toFixed(0)}%), ${
        formatBytes(rate)
      }/s${eta}\n`,
    );
  }

  finish(done: number, elapsedMs: number, ok: boolean): void {
    const rate = rateOf(done, elapsedMs);
    this.#output.write(
      `${ok ? "copied" : "stopped after"} ${formatBytes(done)} in ${
        (elapsedMs / 1000).toFixed(1)
      } s (${formatBytes(rate)}/s)\n`,
    );
  }
}

/** `N/100` whenever the whole percentage changes; 100/100 only on success. */
class PercentReporter implements Reporter {
  readonly #output: ProgressOutput;
  readonly #total: number | undefined;
  #last = -1;

  constructor(output: ProgressOutput, total: number | undefined) {
    this.#output = output;
    this.#total = total;
  }

  #emit(percent: number): void {
    if (percent === this.#last) return;
    this.#last = percent;
    this.#output.write(`${percent}/100\n`);
  }

  update(done: number): void {
    const total = this.#total;
    if (total === undefined) return;
    // Never report 100 before the copy is really finished (flushed, renamed).
    const percent = total > 0 ? Math.min(99, Math.floor((100 * done) / total)) : 0;
    this.#emit(percent);
  }

  finish(_done: number, _elapsedMs: number, ok: boolean): void {
    if (ok) this.#emit(100);
  }
}

/** One JSON object per line, at most twice a second, and a last one with "done". */
class JsonReporter implements Reporter {
  readonly #output: ProgressOutput;
  readonly #total: number | undefined;
  #last = -Infinity;

  constructor(output: ProgressOutput, total: number | undefined) {
    this.#output = output;
    this.#total = total;
  }

  #emit(done: number, elapsedMs: number, state: "running" | "done" | "failed"): void {
    const total = this.#total ?? null;
    const rate = rateOf(done, elapsedMs);
    const record = {
      bytes: done,
      total,
      percent: total === null ? null : total > 0 ? Number(((100 * done) / total).toFixed(2)) : 100,
      rate: Math.round(rate),
      elapsed: Number((elapsedMs / 1000).toFixed(3)),
      eta: total === null || rate === 0 ? null : Number(((total - done) / rate).toFixed(1)),
      state,
    };
    this.#output.write(`${JSON.stringify(record)}\n`);
  }

  update(done: number, elapsedMs: number): void {
    if (elapsedMs - this.#last < 500) return;
    this.#last = elapsedMs;
    this.#emit(done, elapsedMs, "running");
  }

  finish(done: number, elapsedMs: number, ok: boolean): void {
    this.#emit(done, elapsedMs, ok ? "done" : "failed");
  }
}

/** All the reports asked for, fed from one place. */
export class Progress {
  readonly #reporters: Reporter[] = [];
  readonly #now: () => number;
  readonly #start: number;
  #done = 0;

  /** Starts the clock; `total` is undefined for a stream source. */
  constructor(total: number | undefined, options: ProgressOptions) {
    this.#now = options.now ?? (() => performance.now());
    this.#start = this.#now();
    if (options.human) {
      this.#reporters.push(
        options.human.terminal
          ? new BarReporter(options.human.output, total)
          : new LineReporter(options.human.output, total),
      );
    }
    if (options.percent) this.#reporters.push(new PercentReporter(options.percent, total));
    if (options.json) this.#reporters.push(new JsonReporter(options.json, total));
    this.update(0);
  }

  /** Whether any report was asked for. */
  get active(): boolean {
    return this.#reporters.length > 0;
  }

  /** Bytes of the image done so far. */
  update(done: number): void {
    this.#done = done;
    if (this.#reporters.length === 0) return;
    const elapsed = this.#now() - this.#start;
    for (const reporter of this.#reporters) reporter.update(done, elapsed);
  }

  /** The last report: success (after flush and rename) or failure. */
  finish(ok: boolean, done: number = this.#done): void {
    const elapsed = this.#now() - this.#start;
    for (const reporter of this.#reporters) reporter.finish(done, elapsed, ok);
  }
}
