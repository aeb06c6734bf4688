/**
 * `/metrics`: the server's counters in the Prometheus text exposition
 * format (version 0.0.4), one family per quantity, labelled by export,
 * command and connection.
 *
 * @module
 */

import {
  COUNTED_COMMANDS,
  type CountedCommand,
  type IoCounters,
  LATENCY_BUCKETS_MICROS,
  type ServerStats,
} from "../server/stats.ts";
import { countersOf, exportNames, wallClock } from "./stats_snapshot.ts";

/** Content type of the exposition format. */
export const METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

const COMMANDS: CountedCommand[] = [...COUNTED_COMMANDS, "OTHER"];

/** Escapes a label value: backslash, double quote and newline. */
export function escapeLabelValue(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

type Labels = Record<string, string>;

function formatLabels(labels: Labels): string {
  const parts = Object.entries(labels).map(([k, v]) => `${k}="${escapeLabelValue(v)}"`);
  return parts.length ? `{${parts.join(",")}}` : "";
}

/** Formats a sample value the way Prometheus reads it. */
function formatValue(value: number): string {
  if (Number.isNaN(value)) return "NaN";
  if (value === Infinity) return "+Inf";
  if (value === -Infinity) return "-Inf";
  return String(value);
}

/** Accumulates metric families, each with its HELP and TYPE lines before its samples. */
class Exposition {
  readonly #lines: string[] = [];

  family(
    name: string,
    type: "counter" | "gauge" | "histogram",
    help: string,
    samples: Array<[Labels, number]>,
  ): void {
    this.#lines.push(`# HELP ${name} ${help.replace(/\\/g, "\\\\").replace(/\n/g, "\\n")}`);
    this.#lines.push(`# TYPE ${name} ${type}`);
    for (const [labels, value] of samples) {
      this.#lines.push(`${name}${formatLabels(labels)} ${formatValue(value)}`);
    }
  }

  /** A histogram family: cumulative buckets, sum and count per label set. */
  histogram(name: string, help: string, series: Array<[Labels, number[], number]>): void {
    this.#lines.push(`# HELP ${name} ${help}`);
    this.#lines.push(`# TYPE ${name} histogram`);
    for (const [labels, histogram, sum] of series) {
      let cumulative = 0;
      LATENCY_BUCKETS_MICROS.forEach((bound, i) => {
        cumulative += histogram[i]!;
        const le = formatValue(bound / 1e6);
        this.#lines.push(`${name}_bucket${formatLabels({ ...labels, le })} ${cumulative}`);
      });
      cumulative += histogram[LATENCY_BUCKETS_MICROS.length]!;
      this.#lines.push(`${name}_bucket${formatLabels({ ...labels, le: "+Inf" })} ${cumulative}`);
      this.#lines.push(`${name}_sum${formatLabels(labels)} ${formatValue(sum / 1e6)}`);
      this.#lines.push(`${name}_count${formatLabels(labels)} ${cumulative}`);
    }
  }

  text(): string {
    return this.#lines.join("\n") + "\n";
  }
}

function perCommand(
  sets: Array<[Labels, IoCounters]>,
  value: (counters: IoCounters, command: CountedCommand) => number,
): Array<[Labels, number]> {
  const samples: Array<[Labels, number]> = [];
  for (const [labels, counters] of sets) {
    for (const command of COMMANDS) {
      samples.push([{ ...labels, command: command.toLowerCase() }, value(counters, command)]);
    }
  }
  return samples;
}

/**
 * Formats the counters of `stats` as Prometheus text. `listed` are the
 * export names the server lists (reported even before their first request).
 */
export function formatMetrics(stats: ServerStats, listed: readonly string[]): string {
  const out = new Exposition();
  const exports: Array<[Labels, IoCounters]> = exportNames(stats, listed).map((
    name,
  ) => [{ export: name }, countersOf(stats, name)]);
  const connections = [...stats.connections.values()].sort((a, b) => a.id - b.id);
  const perConnection: Array<[Labels, IoCounters]> = connections.map((c) => [
    { connection: String(c.id), export: c.exportName ?? "" },
    c.counters,
  ]);

  out.family(
    "nbd_start_time_seconds",
    "gauge",
    "When the server started, in seconds since the Unix epoch.",
    [[{}, stats.startedAt / 1000]],
  );
  out.family("nbd_connections_open", "gauge", "Connections open now.", [[{}, connections.length]]);
  out.family(
    "nbd_connections_accepted_total",
    "counter",
    "Connections accepted since the start.",
    [[{}, stats.connectionsTotal]],
  );
  out.family(
    "nbd_export_size_bytes",
    "gauge",
    "Size of each export that a client has opened.",
    [...stats.exportSizes].map(([name, size]) => [{ export: name }, size]),
  );

  const requestFamilies = (prefix: string, sets: Array<[Labels, IoCounters]>, scope: string) => {
    out.family(
      `${prefix}_requests_received_total`,
      "counter",
      `Requests received, by ${scope} and command.`,
      perCommand(sets, (c, cmd) => c.commands[cmd].received),
    );
    out.family(
      `${prefix}_requests_completed_total`,
      "counter",
      `Requests answered successfully, by ${scope} and command.`,
      perCommand(sets, (c, cmd) => c.commands[cmd].completed),
    );
    out.family(
      `${prefix}_requests_failed_total`,
      "counter",
      `Requests answered with an error, by ${scope} and command.`,
      perCommand(sets, (c, cmd) => c.commands[cmd].failed),
    );
    out.family(
      `${prefix}_requests_in_flight`,
      "gauge",
      `Requests received and not yet answered, by ${scope} and command.`,
      perCommand(sets, (c, cmd) => c.commands[cmd].inFlight),
    );
    out.family(
      `${prefix}_bytes_total`,
      "counter",
      `Bytes read, written, trimmed, zeroed, cached or queried by successful requests, by ${scope} and command.`,
      perCommand(sets, (c, cmd) => c.commands[cmd].bytes),
    );
    const stamp = (t: number) => t === 0 ? 0 : wallClock(t) / 1000;
    out.family(
      `${prefix}_last_request_timestamp_seconds`,
      "gauge",
      `When the last request arrived, in seconds since the Unix epoch (0 = never), by ${scope}.`,
      sets.map(([labels, c]) => [labels, stamp(c.lastRequestAt)]),
    );
    out.family(
      `${prefix}_last_reply_timestamp_seconds`,
      "gauge",
      `When the last reply was sent, in seconds since the Unix epoch (0 = never), by ${scope}.`,
      sets.map(([labels, c]) => [labels, stamp(c.lastReplyAt)]),
    );
  };
  requestFamilies("nbd", exports, "export");
  out.histogram(
    "nbd_request_duration_seconds",
    "Time from receiving a request to finishing it, by export and command.",
    exports.flatMap(([labels, c]) =>
      COMMANDS.map((cmd): [Labels, number[], number] => [
        { ...labels, command: cmd.toLowerCase() },
        c.commands[cmd].histogram,
        c.commands[cmd].latencySumMicros,
      ])
    ),
  );

  out.family(
    "nbd_connection_info",
    "gauge",
    "One series per open connection describing it (the value is always 1).",
    connections.map((c) => [{
      connection: String(c.id),
      export: c.exportName ?? "",
      peer: c.peer,
      tls: c.tls ? "1" : "0",
      features: c.features.join(","),
    }, 1]),
  );
  requestFamilies("nbd_connection", perConnection, "connection");
  return out.text();
}
