/**
 * The `stats` filter: counts requests, bytes and time per kind of request
 * over all connections, and writes a summary to a file when the server
 * exits.
 *
 * ```
 * nbd serve --filter=stats memory 1G statsfile=stats.txt
 * ```
 *
 * Parameters:
 * - `statsfile=PATH` (required): where to write the summary.
 * - `statsappend=true`: append instead of replacing the file.
 *
 * Output, one line per kind of request that was used (bytes in binary
 * units; "op" rates are bytes over the time spent in those requests,
 * "total" rates are bytes over the time the server ran):
 *
 * ```
 * elapsed: 2.503110 s
 * total: 40 ops, 0.010112 s, 10.00 MiB, 3.99 MiB/s total
 * read: 20 ops, 0 errors, 0.004001 s, 5.00 MiB, 1.22 GiB/s op, 2.00 MiB/s total
 * ```
 *
 * @module
 */

import {
  type Backend,
  type Extent,
  type ExtentsFlags,
  type Filter,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";

/** Counters of one kind of request. */
export interface Counter {
  /** Requests completed (including failures). */
  ops: number;
  /** Requests that failed. */
  errors: number;
  /** Bytes requested by successful requests. */
  bytes: number;
  /** Milliseconds spent inside requests, summed. */
  time: number;
}

/** Kinds of request counted, in output order. */
const STAT_KINDS = ["read", "write", "trim", "zero", "extents", "cache", "flush"] as const;
/** One kind of request. */
export type StatKind = typeof STAT_KINDS[number];

/** Formats a byte count with a binary unit: "3.16 MiB". */
export function humanBytes(n: number): string {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n} bytes` : `${n.toFixed(2)} ${units[i]}`;
}

function rate(bytes: number, ms: number): string {
  return ms > 0 ? `${humanBytes(bytes / (ms / 1000))}/s` : "0 bytes/s";
}

/** Counters shared by every connection. */
export class Stats {
  /** Counters per kind. */
  readonly counters: Record<StatKind, Counter>;
  /** When counting started (performance.now()). */
  readonly started = performance.now();

  /** Creates zeroed counters. */
  constructor() {
    this.counters = Object.fromEntries(
      STAT_KINDS.map((k) => [k, { ops: 0, errors: 0, bytes: 0, time: 0 }]),
    ) as Record<StatKind, Counter>;
  }

  /** Runs a request and counts it. */
  async count<T>(kind: StatKind, bytes: number, run: () => Promise<T>): Promise<T> {
    const counter = this.counters[kind];
    const start = performance.now();
    try {
      const result = await run();
      counter.bytes += bytes;
      return result;
    } catch (error) {
      counter.errors++;
      throw error;
    } finally {
      counter.ops++;
      counter.time += performance.now() - start;
    }
  }

  /** The summary text. */
  format(): string {
    const wall = performance.now() - this.started;
    const used = STAT_KINDS.filter((k) => this.counters[k].ops > 0);
    const sum = used.reduce(
      (acc, k) => {
        const c = this.counters[k];
        return { ops: acc.ops + c.ops, time: acc.time + c.time, bytes: acc.bytes + c.bytes };
      },
      { ops: 0, time: 0, bytes: 0 },
    );
    const lines = [
      `elapsed: ${(wall / 1000).toFixed(6)} s`,
      `total: ${sum.ops} ops, ${(sum.time / 1000).toFixed(6)} s, ${humanBytes(sum.bytes)}, ${
        rate(sum.bytes, wall)
      } total`,
    ];
    for (const kind of used) {
      const c = this.counters[kind];
      lines.push(
        `${kind}: ${c.ops} ops, ${c.errors} errors, ${(c.time / 1000).toFixed(6)} s, ${
          humanBytes(c.bytes)
        }, ${rate(c.bytes, c.time)} op, ${rate(c.bytes, wall)} total`,
      );
    }
    return lines.join("\n") + "\n";
  }
}

class StatsBackend extends PassthroughBackend {
  readonly #stats: Stats;
  constructor(next: Backend, stats: Stats) {
    super(next);
    this.#stats = stats;
    // Keep zero-copy reads: they complete at once, so they count with no time spent.
    if (next.readView) {
      this.readView = (offset, length) => {
        const segments = next.readView!(offset, length);
        if (segments) {
          const counter = stats.counters.read;
          counter.ops++;
          counter.bytes += length;
        }
        return segments;
      };
    }
  }
  override pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.#stats.count("read", buf.length, () => this.next.pread(buf, offset));
  }
  override pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.#stats.count("write", buf.length, () => this.next.pwrite(buf, offset, flags));
  }
  override flush(): Promise<void> {
    return this.#stats.count("flush", 0, () => this.next.flush());
  }
  override trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.#stats.count("trim", length, () => this.next.trim(offset, length, flags));
  }
  override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.#stats.count("zero", length, () => this.next.zero(offset, length, flags));
  }
  override extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    return this.#stats.count("extents", length, () => this.next.extents(offset, length, flags));
  }
  override cache(offset: number, length: number): Promise<void> {
    return this.#stats.count("cache", length, () => this.next.cache(offset, length));
  }
}

/** The stats filter. */
export const statsFilter: Filter = {
  name: "stats",
  summary: "count requests, bytes and time per command; written to a file at exit",
  description: "Example:\n  nbd serve --filter=stats memory 1G statsfile=stats.txt",
  params: [
    {
      name: "statsfile",
      value: "PATH",
      type: "path",
      description: "file for the summary",
      required: true,
    },
    {
      name: "statsappend",
      value: "BOOL",
      type: "boolean",
      default: "false",
      description: "append instead of replacing the file",
    },
  ],
  create(params) {
    const path = params.take("statsfile")!;
    const append = params.takeBoolean("statsappend") ?? false;
    try {
      // Find out now, not at exit, whether the file can be written.
      Deno.writeTextFileSync(path, "", { append });
    } catch (error) {
      throw new UsageError(`statsfile: cannot write ${path}: ${(error as Error).message}`);
    }
    const stats = new Stats();
    return Promise.resolve({
      wrap: (next) => Promise.resolve(new StatsBackend(next, stats)),
      async close() {
        await Deno.writeTextFile(path, stats.format(), { append });
      },
    });
  },
};
