/**
 * IO counters kept by the server for each export and each connection:
 * requests received / in flight / completed / failed per command, bytes,
 * latency histograms, and the times of the last request and reply. Also a
 * hook for live per-request events (the block-activity view).
 *
 * Recording is a handful of integer updates per request, cheap enough to be
 * always on.
 *
 * @module
 */

import { commandName } from "../protocol/constants.ts";

/** Commands with counters, by name. */
export const COUNTED_COMMANDS = [
  "READ",
  "WRITE",
  "FLUSH",
  "TRIM",
  "CACHE",
  "WRITE_ZEROES",
  "BLOCK_STATUS",
] as const;
/** A counted command name. */
export type CountedCommand = (typeof COUNTED_COMMANDS)[number] | "OTHER";

/** Latency histogram buckets: upper bounds in microseconds, doubling from 8 µs. */
export const LATENCY_BUCKETS_MICROS: readonly number[] = Array.from(
  { length: 26 },
  (_, i) => 8 * 2 ** i,
);
const BUCKET_BOUNDS = LATENCY_BUCKETS_MICROS;

/** Counters of one command. */
export class CommandCounters {
  /** Requests received. */
  received = 0;
  /** Requests finished successfully. */
  completed = 0;
  /** Requests that ended with an error. */
  failed = 0;
  /** Bytes covered by successful requests (read, written, trimmed, zeroed...). */
  bytes = 0;
  /** Latency histogram (counts per bucket of LATENCY_BUCKETS_MICROS, last = overflow). */
  readonly histogram: number[] = new Array(BUCKET_BOUNDS.length + 1).fill(0);
  /** Sum of all latencies in microseconds (a Prometheus histogram needs it). */
  latencySumMicros = 0;

  /** Requests received and not yet answered. */
  get inFlight(): number {
    return this.received - this.completed - this.failed;
  }

  /** Records one finished request. */
  record(ok: boolean, bytes: number, micros: number): void {
    if (ok) {
      this.completed++;
      this.bytes += bytes;
    } else {
      this.failed++;
    }
    this.latencySumMicros += micros;
    let bucket = 0;
    while (bucket < BUCKET_BOUNDS.length && micros > BUCKET_BOUNDS[bucket]!) bucket++;
    this.histogram[bucket]!++;
  }
}

/** Estimates a latency percentile (0..1) in microseconds from histograms. */
export function percentile(histograms: number[][], p: number): number | null {
  const merged = new Array(BUCKET_BOUNDS.length + 1).fill(0);
  for (const h of histograms) h.forEach((n, i) => merged[i] += n);
  const total = merged.reduce((a, b) => a + b, 0);
  if (total === 0) return null;
  const rank = p * total;
  let seen = 0;
  for (let i = 0; i < merged.length; i++) {
    seen += merged[i];
    if (seen >= rank) return BUCKET_BOUNDS[Math.min(i, BUCKET_BOUNDS.length - 1)]!;
  }
  return BUCKET_BOUNDS[BUCKET_BOUNDS.length - 1]!;
}

/** Counters for a set of requests (an export, or a connection). */
export class IoCounters {
  /** Per-command counters. */
  readonly commands: Record<CountedCommand, CommandCounters>;
  /** performance.now() of the last request received, or 0. */
  lastRequestAt = 0;
  /** performance.now() of the last reply, or 0. */
  lastReplyAt = 0;

  /** Creates zeroed counters. */
  constructor() {
    this.commands = Object.fromEntries(
      [...COUNTED_COMMANDS, "OTHER"].map((c) => [c, new CommandCounters()]),
    ) as Record<CountedCommand, CommandCounters>;
  }

  /** Requests in flight over all commands. */
  get inFlight(): number {
    let n = 0;
    for (const c of Object.values(this.commands)) n += c.inFlight;
    return n;
  }
}

/** One request, as the live view sees it. */
export interface IoEvent {
  /** Connection id. */
  connection: number;
  /** Export name. */
  exportName: string;
  /** Command name. */
  command: string;
  /** Offset of the request. */
  offset: number;
  /** Length of the request. */
  length: number;
  /** Whether it succeeded. */
  ok: boolean;
}

/** What is known about a connection for the stats page. */
export interface ConnectionInfo {
  /** Connection id. */
  id: number;
  /** Peer address. */
  peer: string;
  /** Export name once chosen. */
  exportName?: string;
  /** TLS negotiated. */
  tls: boolean;
  /** Negotiated features, e.g. "structured replies". */
  features: string[];
  /** When it connected (Date.now()). */
  connectedAt: number;
  /** Its counters. */
  counters: IoCounters;
}

function bucketOf(type: number): CountedCommand {
  const name = commandName(type);
  return (COUNTED_COMMANDS as readonly string[]).includes(name) ? name as CountedCommand : "OTHER";
}

/** All counters of a server. */
export class ServerStats {
  /** Counters per export name. */
  readonly exports: Map<string, IoCounters> = new Map();
  /** Open connections. */
  readonly connections: Map<number, ConnectionInfo> = new Map();
  /** Size in bytes of each export a connection has opened (for the block map). */
  readonly exportSizes: Map<string, number> = new Map();
  /** Connections ever accepted. */
  connectionsTotal = 0;
  /** When the server started (Date.now()). */
  startedAt: number = Date.now();
  /** Live listeners for finished requests (installed by the view). */
  readonly listeners: Set<(event: IoEvent) => void> = new Set();

  /** Registers a new connection. */
  open(id: number, peer: string): ConnectionInfo {
    const info: ConnectionInfo = {
      id,
      peer,
      tls: false,
      features: [],
      connectedAt: Date.now(),
      counters: new IoCounters(),
    };
    this.connections.set(id, info);
    this.connectionsTotal++;
    return info;
  }

  /** Records the size of an export as a connection opened it. */
  noteExportSize(name: string, size: number): void {
    this.exportSizes.set(name, size);
  }

  /** Clears every counter and connection (a log replay starting over); listeners stay. */
  reset(): void {
    this.exports.clear();
    this.connections.clear();
    this.exportSizes.clear();
    this.connectionsTotal = 0;
    this.startedAt = Date.now();
  }

  /** Forgets a closed connection. */
  close(id: number): void {
    this.connections.delete(id);
  }

  /** Counters of an export, created on first use. */
  exportCounters(name: string): IoCounters {
    let counters = this.exports.get(name);
    if (!counters) {
      counters = new IoCounters();
      this.exports.set(name, counters);
    }
    return counters;
  }

  /** Records a request arriving. Returns a token to pass to `finish`. */
  start(connection: ConnectionInfo, exportCounters: IoCounters, type: number): number {
    const now = performance.now();
    const bucket = bucketOf(type);
    connection.counters.commands[bucket].received++;
    exportCounters.commands[bucket].received++;
    connection.counters.lastRequestAt = now;
    exportCounters.lastRequestAt = now;
    return now;
  }

  /** Records a request finishing. */
  finish(
    connection: ConnectionInfo,
    exportCounters: IoCounters,
    type: number,
    offset: number,
    length: number,
    ok: boolean,
    startedAt: number,
  ): void {
    const now = performance.now();
    const micros = (now - startedAt) * 1000;
    const bucket = bucketOf(type);
    const bytes = type === 3 /* FLUSH */ || type === 7 /* BLOCK_STATUS */ ? 0 : length;
    connection.counters.commands[bucket].record(ok, bytes, micros);
    exportCounters.commands[bucket].record(ok, bytes, micros);
    connection.counters.lastReplyAt = now;
    exportCounters.lastReplyAt = now;
    if (this.listeners.size > 0) {
      const event: IoEvent = {
        connection: connection.id,
        exportName: connection.exportName ?? "",
        command: bucket,
        offset,
        length,
        ok,
      };
      for (const listener of this.listeners) listener(event);
    }
  }
}
