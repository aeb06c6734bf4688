/**
 * The `log` filter: writes one line per request to a file, when the
 * request completes, plus a line when a connection opens the export and
 * when it closes it. Placed first it shows the client's requests; placed
 * later it shows what the filters before it made of them.
 *
 * ```
 * nbd serve --filter=log memory 1G logfile=requests.log
 * ```
 *
 * Parameters:
 * - `logfile=PATH` (required): where to write.
 * - `logappend=true`: append instead of truncating.
 *
 * Line format (fields are `key=value`, strings in double quotes with JSON
 * escapes, numbers in decimal; the timestamp is the completion time in UTC
 * with microseconds, so lines are in time order and a request started at
 * `timestamp - elapsed`):
 *
 * ```
 * 2026-01-02T03:04:05.123456Z connection=1 Open export="" tls=0 readonly=0 size=1048576 write=1 ...
 * 2026-01-02T03:04:05.123501Z connection=1 Write id=1 offset=0 count=512 fua=0 elapsed=0.000012 return=0
 * 2026-01-02T03:04:05.123620Z connection=1 Read id=2 offset=0 count=512 elapsed=0.000007 return=EIO error="..."
 * 2026-01-02T03:04:05.124001Z connection=1 Close transactions=2
 * ```
 *
 * Actions: Open, Read, Write, Zero, Trim, Flush, Extents, Cache, Close.
 *
 * @module
 */

import { errnoName } from "../protocol/constants.ts";
import { toWireErrno } from "../protocol/errors.ts";
import {
  type Backend,
  type Extent,
  type ExtentsFlags,
  type Filter,
  type OpenContext,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";

/** Formats a wall-clock time (milliseconds since the epoch) with microseconds. */
export function formatTimestamp(ms: number): string {
  const whole = Math.floor(ms);
  const micros = Math.floor((ms - whole) * 1000);
  const iso = new Date(whole).toISOString(); // 2026-01-02T03:04:05.123Z
  return `${iso.slice(0, -1)}${String(micros).padStart(3, "0")}Z`;
}

/** The current wall-clock time in milliseconds, with sub-millisecond precision. */
function now(): number {
  return performance.timeOrigin + performance.now();
}

/** Formats `key=value` fields: strings quoted, booleans as 0/1. */
function formatFields(fields: Record<string, string | number | boolean>): string {
  return Object.entries(fields).map(([k, v]) =>
    `${k}=${typeof v === "string" ? JSON.stringify(v) : typeof v === "boolean" ? (v ? 1 : 0) : v}`
  ).join(" ");
}

/** A log file shared by every connection; each line is written whole, at once. */
export class LogWriter {
  readonly #file: Deno.FsFile;
  readonly #encoder = new TextEncoder();

  /** Opens (truncates or appends to) the log file. */
  constructor(path: string, append: boolean) {
    this.#file = Deno.openSync(path, {
      write: true,
      create: true,
      append,
      truncate: !append,
    });
  }

  /** Writes one line stamped with the current time. */
  line(text: string): void {
    const bytes = this.#encoder.encode(`${formatTimestamp(now())} ${text}\n`);
    // A synchronous write keeps lines whole and in completion order.
    let done = 0;
    while (done < bytes.length) done += this.#file.writeSync(bytes.subarray(done));
  }

  /** Closes the file. */
  close(): void {
    this.#file.close();
  }
}

class LogBackend extends PassthroughBackend {
  readonly #log: LogWriter;
  readonly #prefix: string;
  #id = 0;

  constructor(next: Backend, log: LogWriter, context: OpenContext) {
    super(next);
    this.#log = log;
    this.#prefix = `connection=${context.connectionId}`;
    const caps = next.capabilities();
    log.line(`${this.#prefix} Open ${
      formatFields({
        export: context.exportName,
        tls: context.tls,
        readonly: context.readonly,
        size: next.size(),
        write: caps.writable,
        flush: caps.flush,
        trim: caps.trim,
        zero: caps.zero,
        fast_zero: caps.fastZero,
        fua: caps.fua,
        extents: caps.extents,
        cache: caps.cache,
        multi_conn: caps.multiConn,
        minsize: caps.blockSize.minimum,
        prefsize: caps.blockSize.preferred,
        maxsize: caps.blockSize.maximum,
      })
    }`);
  }

  /** Runs a request and logs it with its result when it completes. */
  async #logged<T>(
    action: string,
    fields: Record<string, string | number | boolean>,
    run: () => Promise<T>,
    describe?: (result: T) => Record<string, number>,
  ): Promise<T> {
    const id = ++this.#id;
    const start = performance.now();
    const head = `${this.#prefix} ${action} id=${id}${
      Object.keys(fields).length ? " " + formatFields(fields) : ""
    }`;
    try {
      const result = await run();
      const extra = describe ? " " + formatFields(describe(result)) : "";
      this.#log.line(`${head}${extra} ${elapsed(start)} return=0`);
      return result;
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      this.#log.line(
        `${head} ${elapsed(start)} return=${errnoName(toWireErrno(error))} ${
          formatFields({ error: message })
        }`,
      );
      throw error;
    }
  }

  override pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.#logged(
      "Read",
      { offset, count: buf.length },
      () => this.next.pread(buf, offset),
    );
  }
  override pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.#logged(
      "Write",
      { offset, count: buf.length, fua: flags.fua },
      () => this.next.pwrite(buf, offset, flags),
    );
  }
  override flush(): Promise<void> {
    return this.#logged("Flush", {}, () => this.next.flush());
  }
  override trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.#logged(
      "Trim",
      { offset, count: length, fua: flags.fua },
      () => this.next.trim(offset, length, flags),
    );
  }
  override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.#logged(
      "Zero",
      { offset, count: length, trim: flags.mayTrim, fua: flags.fua, fast: flags.fast },
      () => this.next.zero(offset, length, flags),
    );
  }
  override extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    return this.#logged(
      "Extents",
      { offset, count: length, req_one: flags.reqOne },
      () => this.next.extents(offset, length, flags),
      (extents) => ({ extents: extents.length }),
    );
  }
  override cache(offset: number, length: number): Promise<void> {
    return this.#logged(
      "Cache",
      { offset, count: length },
      () => this.next.cache(offset, length),
    );
  }
  override async close(): Promise<void> {
    try {
      await this.next.close();
    } finally {
      this.#log.line(`${this.#prefix} Close transactions=${this.#id}`);
    }
  }
}

function elapsed(start: number): string {
  return `elapsed=${((performance.now() - start) / 1000).toFixed(6)}`;
}

/** The log filter. */
export const logFilter: Filter = {
  name: "log",
  summary: "log every request (connection, command, offset, count, result) to a file",
  description: "Each line: TIMESTAMP connection=N ACTION id=N key=value ... return=0|ERRNO\n" +
    "where ACTION is Open, Read, Write, Zero, Trim, Flush, Extents, Cache or Close.\n\n" +
    "Example:\n  nbd serve --filter=log memory 1G logfile=requests.log",
  params: [
    {
      name: "logfile",
      value: "PATH",
      type: "path",
      description: "file to write the log to",
      required: true,
    },
    {
      name: "logappend",
      value: "BOOL",
      type: "boolean",
      default: "false",
      description: "append instead of truncating",
    },
  ],
  create(params) {
    const path = params.take("logfile")!;
    const append = params.takeBoolean("logappend") ?? false;
    let log: LogWriter;
    try {
      log = new LogWriter(path, append);
    } catch (error) {
      throw new UsageError(`logfile: cannot open ${path}: ${(error as Error).message}`);
    }
    return Promise.resolve({
      wrap: (next, context) => Promise.resolve(new LogBackend(next, log, context)),
      close() {
        log.close();
        return Promise.resolve();
      },
    });
  },
};
