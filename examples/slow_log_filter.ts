/**
 * A filter that logs requests slower than a threshold to stderr, and
 * changes nothing else: it overrides the calls it times, and everything
 * else (and the data) passes through to the layer below.
 *
 * ```
 * nbd serve --filter=./examples/slow_log_filter.ts file disk.img threshold=50ms
 * ```
 *
 * @module
 */

import { defineFilter } from "../mod.ts";

/** Runs `call`, logging it when it took longer than `thresholdMs`. */
async function timed<T>(
  thresholdMs: number,
  what: string,
  call: () => Promise<T>,
): Promise<T> {
  const start = performance.now();
  try {
    return await call();
  } finally {
    const ms = performance.now() - start;
    if (ms >= thresholdMs) console.error(`slow: ${what} took ${ms.toFixed(1)} ms`);
  }
}

export default defineFilter({
  name: "slowlog",
  summary: "log requests slower than a threshold",
  params: [
    {
      name: "threshold",
      value: "DURATION",
      type: "duration",
      default: "100ms",
      description: "log requests that take at least this long",
    },
  ],
  create: (params) => ({ thresholdMs: params.takeDuration("threshold") ?? 100 }),
  pread(buf, offset) {
    return timed(
      this.config.thresholdMs,
      `pread ${buf.length}@${offset}`,
      () => this.next.pread(buf, offset),
    );
  },
  pwrite(buf, offset, flags) {
    return timed(
      this.config.thresholdMs,
      `pwrite ${buf.length}@${offset}`,
      () => this.next.pwrite(buf, offset, flags),
    );
  },
  flush() {
    return timed(this.config.thresholdMs, "flush", () => this.next.flush());
  },
});
