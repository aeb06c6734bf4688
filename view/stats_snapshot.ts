/**
 * The `/stats` document: a JSON snapshot of a server's counters per export
 * and per connection, as `nbd stats` and the page show them.
 *
 * @module
 */

import { VERSION } from "../util/version.ts";
import {
  COUNTED_COMMANDS,
  type CountedCommand,
  type IoCounters,
  IoCounters as Counters,
  percentile,
  type ServerStats,
} from "../server/stats.ts";

/** Latency percentiles in microseconds (upper bounds of histogram buckets); null without requests. */
export interface LatencySummary {
  /** Median. */
  p50: number | null;
  /** 90th percentile. */
  p90: number | null;
  /** 99th percentile. */
  p99: number | null;
}

/** Counters of one command. */
export interface CommandSnapshot {
  /** Requests received. */
  received: number;
  /** Received and not yet answered. */
  inFlight: number;
  /** Answered successfully. */
  completed: number;
  /** Answered with an error. */
  failed: number;
  /** Bytes covered by successful requests. */
  bytes: number;
  /** Latency percentiles. */
  latencyMicros: LatencySummary;
}

/** Counters of a set of requests: an export's or a connection's. */
export interface CountersSnapshot {
  /** Totals over all commands. */
  requests: { received: number; inFlight: number; completed: number; failed: number };
  /** Bytes by what happened to them (successful requests only). */
  bytes: { read: number; written: number; trimmed: number; zeroed: number; cached: number };
  /** Latency percentiles over all commands. */
  latencyMicros: LatencySummary;
  /** Wall-clock time of the last request received (ISO 8601), or null. */
  lastRequestAt: string | null;
  /** Wall-clock time of the last reply (ISO 8601), or null. */
  lastReplyAt: string | null;
  /** Seconds since the last request, or null. */
  secondsSinceLastRequest: number | null;
  /** Seconds since the last reply, or null. */
  secondsSinceLastReply: number | null;
  /** Per-command counters (OTHER = commands the server does not know). */
  commands: Record<CountedCommand, CommandSnapshot>;
}

/** One export. */
export interface ExportSnapshot extends CountersSnapshot {
  /** Export name ("" = the default export). */
  name: string;
  /** Size in bytes once a client has opened it, else null. */
  size: number | null;
  /** Connections currently using it. */
  connections: number;
  /** Its injected faults, with `nbd serve --view-control` only. */
  faults?: {
    /** Requests are failing now. */
    enabled: boolean;
    /** Which: read, write or all. */
    kinds: string;
    /** The error. */
    errno: string;
    /** Share of those requests that fail, 0..1. */
    rate: number;
  };
}

/** One open connection. */
export interface ConnectionSnapshot extends CountersSnapshot {
  /** Connection number. */
  id: number;
  /** Peer address. */
  peer: string;
  /** Export chosen, or null during the handshake. */
  export: string | null;
  /** TLS negotiated. */
  tls: boolean;
  /** Negotiated features. */
  features: string[];
  /** When it connected (ISO 8601). */
  connectedAt: string;
  /** Seconds since it connected. */
  secondsConnected: number;
}

/** The whole `/stats` document. */
export interface StatsSnapshot {
  /** Always "nbd". */
  program: "nbd";
  /** Program version. */
  version: string;
  /** "serve" for a live server, "replay" for `nbd view LOGFILE`. */
  mode: "serve" | "replay";
  /** When this snapshot was taken (ISO 8601). */
  generatedAt: string;
  /** When the server started (ISO 8601). */
  startedAt: string;
  /** Seconds since the start. */
  uptimeSeconds: number;
  /** Connections open now. */
  connectionsOpen: number;
  /** Connections accepted since the start. */
  connectionsTotal: number;
  /** Exports, listed ones first, then any others that saw requests. */
  exports: ExportSnapshot[];
  /** Open connections by id. */
  connections: ConnectionSnapshot[];
  /** Present when the server offers fault injection (`--view-control`). */
  control?: {
    /** Changes need the `--view-token` token. */
    tokenRequired: boolean;
  };
}

/** Converts a performance.now() reading to wall-clock milliseconds. */
export function wallClock(monotonic: number): number {
  return performance.timeOrigin + monotonic;
}

function seconds(ms: number): number {
  return Math.round(ms) / 1000;
}

function latency(histograms: number[][]): LatencySummary {
  return {
    p50: percentile(histograms, 0.5),
    p90: percentile(histograms, 0.9),
    p99: percentile(histograms, 0.99),
  };
}

function countersSnapshot(counters: IoCounters, now: number): CountersSnapshot {
  const c = counters.commands;
  const commands = {} as Record<CountedCommand, CommandSnapshot>;
  const requests = { received: 0, inFlight: 0, completed: 0, failed: 0 };
  for (const name of [...COUNTED_COMMANDS, "OTHER"] as CountedCommand[]) {
    const cmd = c[name];
    commands[name] = {
      received: cmd.received,
      inFlight: cmd.inFlight,
      completed: cmd.completed,
      failed: cmd.failed,
      bytes: cmd.bytes,
      latencyMicros: latency([cmd.histogram]),
    };
    requests.received += cmd.received;
    requests.inFlight += cmd.inFlight;
    requests.completed += cmd.completed;
    requests.failed += cmd.failed;
  }
  const at = (t: number) => t === 0 ? null : new Date(wallClock(t)).toISOString();
  const since = (t: number) => t === 0 ? null : seconds(now - t);
  return {
    requests,
    bytes: {
      read: c.READ.bytes,
      written: c.WRITE.bytes,
      trimmed: c.TRIM.bytes,
      zeroed: c.WRITE_ZEROES.bytes,
      cached: c.CACHE.bytes,
    },
    latencyMicros: latency(Object.values(c).map((cmd) => cmd.histogram)),
    lastRequestAt: at(counters.lastRequestAt),
    lastReplyAt: at(counters.lastReplyAt),
    secondsSinceLastRequest: since(counters.lastRequestAt),
    secondsSinceLastReply: since(counters.lastReplyAt),
    commands,
  };
}

/**
 * The exports to report: those the server lists, in its order, then any
 * other that has counters or a known size.
 */
export function exportNames(stats: ServerStats, listed: readonly string[]): string[] {
  const names = [...listed];
  for (const name of [...stats.exports.keys(), ...stats.exportSizes.keys()]) {
    if (!names.includes(name)) names.push(name);
  }
  return names;
}

/** Counters of an export, or zeroes when it has seen no request. */
export function countersOf(stats: ServerStats, name: string): IoCounters {
  return stats.exports.get(name) ?? new Counters();
}

/**
 * Takes a snapshot of `stats`. `listed` are the export names the server
 * lists (so exports nobody used yet appear too).
 */
export function statsSnapshot(
  stats: ServerStats,
  listed: readonly string[],
  mode: "serve" | "replay" = "serve",
): StatsSnapshot {
  const now = performance.now();
  const wallNow = wallClock(now);
  const connections = [...stats.connections.values()].sort((a, b) => a.id - b.id);
  return {
    program: "nbd",
    version: VERSION,
    mode,
    generatedAt: new Date(wallNow).toISOString(),
    startedAt: new Date(stats.startedAt).toISOString(),
    uptimeSeconds: seconds(wallNow - stats.startedAt),
    connectionsOpen: stats.connections.size,
    connectionsTotal: stats.connectionsTotal,
    exports: exportNames(stats, listed).map((name) => ({
      name,
      size: stats.exportSizes.get(name) ?? null,
      connections: connections.filter((c) => c.exportName === name).length,
      ...countersSnapshot(countersOf(stats, name), now),
    })),
    connections: connections.map((c) => ({
      id: c.id,
      peer: c.peer,
      export: c.exportName ?? null,
      tls: c.tls,
      features: [...c.features],
      connectedAt: new Date(c.connectedAt).toISOString(),
      secondsConnected: seconds(wallNow - c.connectedAt),
      ...countersSnapshot(c.counters, now),
    })),
  };
}
