/**
 * `nbd stats [--json] URL`: prints the counters of a server running with
 * `--view` (or of `nbd view`), read from its `/stats`.
 *
 * @module
 */

import { UsageError } from "../util/usage_error.ts";
import type {
  CommandSnapshot,
  CountersSnapshot,
  LatencySummary,
  StatsSnapshot,
} from "../view/stats_snapshot.ts";
import { type Command, formatOptions, parseOptions } from "./command.ts";
import { describeFaults, type FaultState } from "../filters/fault_switch.ts";

const OPTIONS = {
  json: { type: "boolean", help: "print the server's /stats document as it is" },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const USAGE = `Usage: nbd stats [--json] URL

Print the IO counters of a server started with --view (or of nbd view):
per export and per connection, requests received / in flight / completed /
failed per command, bytes, latency percentiles, the time since the last
request and reply, and, for a server with --view-control, each export's
injected faults.

URL is the view address: http://HOST:PORT, HOST:PORT or PORT (on 127.0.0.1).

Options:
${formatOptions(OPTIONS)}

Examples:
  nbd serve --view memory 1G &
  nbd stats http://127.0.0.1:8080
  nbd stats --json 8080 | jq '.exports[0].requests'
`;

/** The /stats URL for a view address given on the command line. */
export function statsUrl(text: string): URL {
  let base = text;
  if (/^\d+$/.test(base)) base = `127.0.0.1:${base}`;
  if (!/^[a-z]+:\/\//i.test(base)) base = `http://${base}`;
  let url: URL;
  try {
    url = new URL(base);
  } catch {
    throw new UsageError(`not a URL: "${text}"`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new UsageError(`expected an http:// URL, got "${text}"`);
  }
  url.pathname = url.pathname.replace(/\/(stats)?$/, "") + "/stats";
  url.search = "";
  return url;
}

function bytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${units[i]}`;
}

function micros(us: number | null): string {
  if (us === null) return "-";
  if (us < 1000) return `${us}us`;
  if (us < 1e6) return `${(us / 1000).toFixed(us < 10000 ? 1 : 0)}ms`;
  return `${(us / 1e6).toFixed(1)}s`;
}

function ago(seconds: number | null): string {
  return seconds === null ? "never" : `${duration(seconds)} ago`;
}

function duration(s: number): string {
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function latency(l: LatencySummary): string {
  return `p50 ${micros(l.p50)} p90 ${micros(l.p90)} p99 ${micros(l.p99)}`;
}

function commandTable(commands: Record<string, CommandSnapshot>, indent: string): string[] {
  const head = [
    "command",
    "received",
    "in flight",
    "completed",
    "failed",
    "bytes",
    "p50",
    "p90",
    "p99",
  ];
  const rows = Object.entries(commands)
    .filter(([name, c]) => c.received > 0 || name === "READ" || name === "WRITE")
    .map(([name, c]) => [
      name.toLowerCase(),
      String(c.received),
      String(c.inFlight),
      String(c.completed),
      String(c.failed),
      bytes(c.bytes),
      micros(c.latencyMicros.p50),
      micros(c.latencyMicros.p90),
      micros(c.latencyMicros.p99),
    ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  return [head, ...rows].map((r) =>
    indent + r.map((cell, i) => i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))
      .join("  ")
  );
}

function totals(c: CountersSnapshot): string {
  const r = c.requests;
  return `${r.received} requests (${r.inFlight} in flight, ${r.failed} failed); ` +
    `last request ${ago(c.secondsSinceLastRequest)}, last reply ${ago(c.secondsSinceLastReply)}`;
}

function exportLabel(name: string): string {
  return name === "" ? '"" (default)' : JSON.stringify(name);
}

/** Formats a /stats document for people. */
export function formatStats(stats: StatsSnapshot): string {
  const lines: string[] = [];
  lines.push(
    `nbd ${stats.version}${stats.mode === "replay" ? " (replaying a log)" : ""}: up ${
      duration(stats.uptimeSeconds)
    }, ${stats.connectionsOpen} connection${
      stats.connectionsOpen === 1 ? "" : "s"
    } open, ${stats.connectionsTotal} accepted`,
  );
  for (const e of stats.exports) {
    lines.push("");
    lines.push(
      `export ${exportLabel(e.name)}${
        e.size === null ? "" : ` (${bytes(e.size)})`
      }: ${e.connections} connection${e.connections === 1 ? "" : "s"}, ${totals(e)}`,
    );
    lines.push(
      `  read ${bytes(e.bytes.read)}, written ${bytes(e.bytes.written)}, trimmed ${
        bytes(e.bytes.trimmed)
      }, zeroed ${bytes(e.bytes.zeroed)}; latency ${latency(e.latencyMicros)}`,
    );
    if (e.faults) lines.push(`  injected faults: ${describeFaults(e.faults as FaultState)}`);
    lines.push(...commandTable(e.commands, "  "));
  }
  if (stats.connections.length) {
    lines.push("");
    lines.push("connections:");
  }
  for (const c of stats.connections) {
    lines.push(
      `  #${c.id} ${c.peer}  export ${
        c.export === null ? "(handshake)" : exportLabel(c.export)
      }  ` +
        `TLS ${c.tls ? "yes" : "no"}  ${c.features.join(", ") || "-"}  up ${
          duration(c.secondsConnected)
        }`,
    );
    lines.push(`     ${totals(c)}`);
    lines.push(
      `     read ${bytes(c.bytes.read)}, written ${bytes(c.bytes.written)}, trimmed ${
        bytes(c.bytes.trimmed)
      }, zeroed ${bytes(c.bytes.zeroed)}; latency ${latency(c.latencyMicros)}`,
    );
  }
  return lines.join("\n");
}

/** `nbd stats`. */
export const statsCommand: Command = {
  name: "stats",
  summary: "print the IO counters of a server running with --view",
  usage: USAGE,
  options: OPTIONS,
  async run(argv) {
    const { values, positionals } = parseOptions(argv, OPTIONS);
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    if (positionals.length !== 1) {
      throw new UsageError("expected one URL (e.g. nbd stats http://127.0.0.1:8080)");
    }
    const url = statsUrl(positionals[0]!);
    let response: Response;
    try {
      response = await fetch(url, { signal: AbortSignal.timeout(10_000) });
    } catch (error) {
      throw new Error(`Cannot read ${url}: ${(error as Error).message}`);
    }
    const body = await response.text();
    if (!response.ok) {
      throw new Error(`Cannot read ${url}: HTTP ${response.status} ${body.trim()}`);
    }
    let stats: StatsSnapshot;
    try {
      stats = JSON.parse(body);
    } catch {
      throw new Error(`Cannot read ${url}: the answer is not JSON`);
    }
    if (stats?.program !== "nbd" || !Array.isArray(stats.exports)) {
      throw new Error(`Cannot read ${url}: not an nbd /stats document`);
    }
    if (values.json) {
      await Deno.stdout.write(new TextEncoder().encode(body.endsWith("\n") ? body : body + "\n"));
    } else {
      console.log(formatStats(stats));
    }
    return 0;
  },
};
