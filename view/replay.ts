/**
 * Replaying a `log` filter file into a `ServerStats`, as if its requests
 * were happening now, at an adjustable speed: the view server then shows
 * the replay exactly as it shows a live server (block map, counters,
 * connections, /stats, /metrics).
 *
 * @module
 */

import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
} from "../protocol/constants.ts";
import type { ConnectionInfo, ServerStats } from "../server/stats.ts";
import { type LogLine, parseLogLine, readLines } from "./log_format.ts";
import type { ReplayChange, ReplayControl, ReplayState } from "./view_server.ts";

/** Log actions that are requests, and the command each stands for. */
const REQUEST_ACTIONS: Readonly<Record<string, number>> = {
  Read: NBD_CMD_READ,
  Write: NBD_CMD_WRITE,
  Flush: NBD_CMD_FLUSH,
  Trim: NBD_CMD_TRIM,
  Cache: NBD_CMD_CACHE,
  Zero: NBD_CMD_WRITE_ZEROES,
  Extents: NBD_CMD_BLOCK_STATUS,
};
const OPEN = 100;
const CLOSE = 101;

/** Fastest replay: a million log seconds per second. */
export const MAX_SPEED = 1e6;

/**
 * The events of a log file, in columns (a long log stays compact): time,
 * kind (a command number, or open/close), connection, offset, length,
 * elapsed seconds and success.
 */
export class ReplayLog {
  /** Number of events. */
  length = 0;
  /** Requests among them. */
  requests = 0;
  /** Lines that were not log filter lines, or not understood. */
  skipped = 0;
  #time = new Float64Array(1024);
  #kind = new Uint8Array(1024);
  #connection = new Uint32Array(1024);
  #offset = new Float64Array(1024);
  #count = new Float64Array(1024);
  #elapsed = new Float32Array(1024);
  #ok = new Uint8Array(1024);
  /** Export name, TLS and size for Open events, by event index. */
  readonly opens = new Map<number, { exportName: string; tls: boolean; size?: number }>();
  /** Size of each export: from its Open lines, or the furthest byte a request reached. */
  readonly sizes = new Map<string, number>();
  #exportOf = new Map<number, string>();
  #declared = new Set<string>();

  /** Time of the first event (ms since the epoch), or 0. */
  get start(): number {
    return this.length ? this.#time[0]! : 0;
  }

  /** Length of the log in milliseconds. */
  get duration(): number {
    return this.length ? this.#time[this.length - 1]! - this.#time[0]! : 0;
  }

  /** Time of event `i` relative to the first, in milliseconds. */
  at(i: number): number {
    return this.#time[i]! - this.#time[0]!;
  }

  /** Event `i`. */
  event(i: number): {
    kind: number;
    connection: number;
    offset: number;
    count: number;
    elapsed: number;
    ok: boolean;
  } {
    return {
      kind: this.#kind[i]!,
      connection: this.#connection[i]!,
      offset: this.#offset[i]!,
      count: this.#count[i]!,
      elapsed: this.#elapsed[i]!,
      ok: this.#ok[i] === 1,
    };
  }

  /** Whether event kind `kind` is Open / Close. */
  static isOpen(kind: number): boolean {
    return kind === OPEN;
  }
  /** Whether event kind `kind` is Close. */
  static isClose(kind: number): boolean {
    return kind === CLOSE;
  }

  /** Adds one parsed line (lines must come in time order, as the filter writes them). */
  add(line: LogLine): void {
    const connection = Number(line.fields.connection);
    if (!Number.isSafeInteger(connection) || connection < 0) {
      this.skipped++;
      return;
    }
    const f = line.fields;
    let kind: number;
    let offset = 0;
    let count = 0;
    if (line.action === "Open") {
      kind = OPEN;
      const exportName = f.export ?? "";
      const size = f.size === undefined ? undefined : Number(f.size);
      this.opens.set(this.length, {
        exportName,
        tls: f.tls === "1",
        size: Number.isSafeInteger(size) ? size : undefined,
      });
      this.#exportOf.set(connection, exportName);
      if (size !== undefined && Number.isSafeInteger(size)) {
        this.sizes.set(exportName, size);
        this.#declared.add(exportName);
      }
    } else if (line.action === "Close") {
      kind = CLOSE;
    } else if (line.action in REQUEST_ACTIONS) {
      kind = REQUEST_ACTIONS[line.action]!;
      if (kind !== NBD_CMD_FLUSH) {
        offset = Number(f.offset);
        count = Number(f.count);
        if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(count)) {
          this.skipped++;
          return;
        }
        const exportName = this.#exportOf.get(connection) ?? "";
        if (!this.#declared.has(exportName)) {
          // No Open line for it: the map must still reach the furthest request.
          this.sizes.set(exportName, Math.max(this.sizes.get(exportName) ?? 0, offset + count));
        }
      }
      this.requests++;
    } else {
      this.skipped++;
      return;
    }
    this.#grow();
    const i = this.length++;
    this.#time[i] = line.time;
    this.#kind[i] = kind;
    this.#connection[i] = connection;
    this.#offset[i] = offset;
    this.#count[i] = count;
    this.#elapsed[i] = Number(f.elapsed ?? 0) || 0;
    this.#ok[i] = f.return === undefined || f.return === "0" ? 1 : 0;
  }

  #grow(): void {
    if (this.length < this.#time.length) return;
    const n = this.#time.length * 2;
    const grow = <T extends Float64Array | Float32Array | Uint8Array | Uint32Array>(
      old: T,
      make: (n: number) => T,
    ): T => {
      const next = make(n);
      next.set(old);
      return next;
    };
    this.#time = grow(this.#time, (n) => new Float64Array(n));
    this.#kind = grow(this.#kind, (n) => new Uint8Array(n));
    this.#connection = grow(this.#connection, (n) => new Uint32Array(n));
    this.#offset = grow(this.#offset, (n) => new Float64Array(n));
    this.#count = grow(this.#count, (n) => new Float64Array(n));
    this.#elapsed = grow(this.#elapsed, (n) => new Float32Array(n));
    this.#ok = grow(this.#ok, (n) => new Uint8Array(n));
  }

  /** Builds a log from lines of text. */
  static fromLines(lines: Iterable<string>): ReplayLog {
    const log = new ReplayLog();
    for (const text of lines) log.#addText(text);
    return log;
  }

  /** Reads a log file (streamed, so a long log is never held as text). */
  static async fromFile(path: string): Promise<ReplayLog> {
    const log = new ReplayLog();
    using file = await Deno.open(path);
    for await (const text of readLines(file.readable)) log.#addText(text);
    return log;
  }

  #addText(text: string): void {
    if (text.trim() === "") return;
    const line = parseLogLine(text);
    if (line) this.add(line);
    else this.skipped++;
  }

  /** Export names in order of first appearance. */
  get exportNames(): string[] {
    const names = [...this.sizes.keys()];
    for (const open of this.opens.values()) {
      if (!names.includes(open.exportName)) names.push(open.exportName);
    }
    return names;
  }
}

/** Options of a `Replayer`. */
export interface ReplayerOptions {
  /** Log file name (for display). */
  file: string;
  /** Log seconds per wall-clock second (default 1). */
  speed?: number;
  /** Start paused. */
  paused?: boolean;
  /** Timer period in milliseconds (default 10). */
  tick?: number;
}

function checkSpeed(speed: number): number {
  if (!(typeof speed === "number" && speed > 0 && speed <= MAX_SPEED)) {
    throw new RangeError(`Cannot set the replay speed: expected 0 < speed <= ${MAX_SPEED}`);
  }
  return speed;
}

/** Plays a `ReplayLog` into a `ServerStats` in (scaled) real time. */
export class Replayer implements ReplayControl {
  readonly #log: ReplayLog;
  readonly #stats: ServerStats;
  readonly #file: string;
  readonly #tickMs: number;
  readonly #connections = new Map<number, ConnectionInfo>();
  #speed: number;
  #paused: boolean;
  #next = 0;
  #replayed = 0;
  #position = 0; // log milliseconds from the first event
  #lastWall = 0;
  #run = 0;
  #timer: ReturnType<typeof setInterval> | undefined;

  /** Prepares a replay of `log` into `stats` (which it resets). */
  constructor(log: ReplayLog, stats: ServerStats, options: ReplayerOptions) {
    this.#log = log;
    this.#stats = stats;
    this.#file = options.file;
    this.#speed = checkSpeed(options.speed ?? 1);
    this.#paused = options.paused ?? false;
    this.#tickMs = options.tick ?? 10;
    this.#rewind();
  }

  /** Starts the clock. */
  start(): void {
    if (this.#timer !== undefined) return;
    this.#lastWall = performance.now();
    this.#timer = setInterval(() => this.advance(), this.#tickMs);
  }

  /** Stops the clock for good. */
  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  #rewind(): void {
    this.#stats.reset();
    this.#connections.clear();
    this.#next = 0;
    this.#replayed = 0;
    this.#position = 0;
    // Sizes are known up front, so the page can lay the map out before the first request.
    for (const [name, size] of this.#log.sizes) this.#stats.noteExportSize(name, size);
  }

  /**
   * Moves the log clock forward by the wall time since the last call (times
   * the speed) and replays every event up to it. Called by the timer;
   * callable directly (tests step a replay with `advance(ms)`).
   */
  advance(wallMs?: number): void {
    const now = performance.now();
    const elapsed = wallMs ?? now - this.#lastWall;
    this.#lastWall = now;
    if (this.#paused || this.done) return;
    this.#position = Math.min(this.#position + elapsed * this.#speed, this.#log.duration);
    const log = this.#log;
    while (this.#next < log.length && log.at(this.#next) <= this.#position) {
      this.#emit(this.#next++);
    }
  }

  /** Whether every event has been replayed. */
  get done(): boolean {
    return this.#next >= this.#log.length;
  }

  #connection(id: number, exportName?: string): ConnectionInfo {
    let info = this.#connections.get(id);
    if (!info) {
      info = this.#stats.open(id, "log");
      info.exportName = exportName ?? "";
      this.#connections.set(id, info);
    }
    return info;
  }

  #emit(i: number): void {
    const log = this.#log;
    const e = log.event(i);
    if (ReplayLog.isOpen(e.kind)) {
      const open = log.opens.get(i)!;
      const info = this.#connection(e.connection, open.exportName);
      info.exportName = open.exportName;
      info.tls = open.tls;
      if (open.size !== undefined) this.#stats.noteExportSize(open.exportName, open.size);
      return;
    }
    if (ReplayLog.isClose(e.kind)) {
      this.#stats.close(e.connection);
      this.#connections.delete(e.connection);
      return;
    }
    const info = this.#connection(e.connection);
    const counters = this.#stats.exportCounters(info.exportName ?? "");
    const started = this.#stats.start(info, counters, e.kind);
    // The latency recorded is the one the log measured.
    this.#stats.finish(info, counters, e.kind, e.offset, e.count, e.ok, started - e.elapsed * 1000);
    this.#replayed++;
  }

  /** Where the replay stands. */
  state(): ReplayState {
    return {
      file: this.#file,
      position: Math.round(this.#position) / 1000,
      duration: Math.round(this.#log.duration) / 1000,
      speed: this.#speed,
      paused: this.#paused,
      done: this.done,
      replayed: this.#replayed,
      requests: this.#log.requests,
      run: this.#run,
    };
  }

  /** Changes speed, pauses or resumes, or restarts. */
  change(change: ReplayChange): ReplayState {
    if (change.speed !== undefined) this.#speed = checkSpeed(change.speed);
    if (change.paused !== undefined) {
      if (typeof change.paused !== "boolean") {
        throw new TypeError("Cannot change the replay: paused must be true or false");
      }
      this.#paused = change.paused;
    }
    if (change.restart) {
      this.#run++;
      this.#rewind();
    }
    this.#lastWall = performance.now();
    return this.state();
  }
}
