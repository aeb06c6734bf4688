/**
 * `nbd attached [--json] [--all]`: the attachments (and with --all the
 * plain mounts) with their process, export and I/O counters.
 *
 * @module
 */

import { linuxOnly } from "../io/platform.ts";
import type { IoStats } from "../mount/io_counters.ts";
import { controlRequest, listSessions, type SessionRecord } from "../mount/registry.ts";
import { formatSize } from "../util/parse.ts";
import { UsageError } from "../util/usage_error.ts";
import { type Command, formatOptions, parseOptions } from "./command.ts";
import { writeStdout } from "./output.ts";

const OPTIONS = {
  json: { type: "boolean", help: "print JSON" },
  all: { type: "boolean", short: "a", help: 'include "nbd mount" file mounts' },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const USAGE = `Usage: nbd attached [OPTIONS]

List the exports attached by "nbd attach": device, serving process,
connections, mode, I/O counters (requests received, in flight, completed,
failed; bytes read and written; time since the last request and the last
reply) and the export's URI. Connections that were lost or declared stale
are listed under their attachment.

Options:
${formatOptions(OPTIONS)}
`;

/** One listed session, as printed with --json. */
export interface AttachedEntry extends SessionRecord {
  /** Whether the serving process runs. */
  alive: boolean;
  /** Counters, when the process answered. */
  stats: IoStats | null;
  /** Why there are no counters. */
  error?: string;
}

function ago(ms: number | null): string {
  if (ms === null) return "-";
  if (ms < 1000) return `${ms}ms`;
  if (ms < 120_000) return `${(ms / 1000).toFixed(1)}s`;
  if (ms < 7_200_000) return `${Math.round(ms / 60_000)}m`;
  return `${Math.round(ms / 3_600_000)}h`;
}

function bytes(n: number): string {
  const units = ["B", "K", "M", "G", "T", "P"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0
    ? `${n}B`
    : `${value < 10 ? value.toFixed(1) : Math.round(value)}${units[unit]}`;
}

/** Gathers every session with its counters. */
async function attachedEntries(all: boolean): Promise<AttachedEntry[]> {
  const entries: AttachedEntry[] = [];
  for (const session of await listSessions()) {
    if (!all && session.record.kind !== "attach") continue;
    const entry: AttachedEntry = { ...session.record, alive: session.alive, stats: null };
    if (!session.alive) entry.error = "the serving process is not running";
    else {
      try {
        const reply = await controlRequest(session.dir, { op: "status" }, 5000);
        if (reply.ok && reply.stats) entry.stats = reply.stats;
        else entry.error = reply.error ?? "no counters";
      } catch (error) {
        entry.error = `no answer: ${(error as Error).message}`;
      }
    }
    entries.push(entry);
  }
  return entries;
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) =>
    r.map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i]!))).join("  ")
  ).join("\n") + "\n";
}

/** The `nbd attached` command. */
export const attachedCommand: Command = {
  name: "attached",
  summary: "list attached exports with their I/O counters",
  usage: USAGE,
  options: OPTIONS,
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseOptions(argv, OPTIONS);
    if (values.help) {
      await writeStdout(USAGE);
      return 0;
    }
    const refusal = linuxOnly("attached", "there are no attached devices on this system");
    if (refusal) throw new Error(refusal);
    if (positionals.length !== 0) throw new UsageError("attached takes no arguments (see --help)");
    const entries = await attachedEntries(values.all ?? false);
    if (values.json) {
      await writeStdout(JSON.stringify(entries, null, 2) + "\n");
      return 0;
    }
    if (entries.length === 0) return 0;
    const rows: string[][] = [[
      values.all ? "DEVICE/FILE" : "DEVICE",
      "PID",
      "SIZE",
      "CONN",
      "MODE",
      "RECEIVED",
      "INFLIGHT",
      "COMPLETED",
      "FAILED",
      "READ",
      "WRITTEN",
      "LAST-REQ",
      "LAST-REPLY",
      "URI",
    ]];
    const notes: string[] = [];
    for (const e of entries) {
      const s = e.stats;
      const live = s ? s.connections.filter((c) => c.state === "connected").length : 0;
      rows.push([
        e.device ?? e.file,
        String(e.pid),
        formatSize(e.size),
        s ? (live === e.connections ? String(live) : `${live}/${e.connections}`) : "-",
        e.readOnly ? "ro" : "rw",
        s ? String(s.received) : "-",
        s ? String(s.inFlight) : "-",
        s ? String(s.completed) : "-",
        s ? String(s.failed) : "-",
        s ? bytes(s.bytesRead) : "-",
        s ? bytes(s.bytesWritten) : "-",
        s ? ago(s.msSinceRequest) : "-",
        s ? ago(s.msSinceReply) : "-",
        e.uri,
      ]);
      const name = e.device ?? e.file;
      if (e.error) {
        const cleanUp = e.kind === "attach" ? `nbd detach ${name}` : `nbd umount ${e.mountpoint}`;
        notes.push(`${name}: ${e.error}${e.alive ? "" : ` (clean up with "${cleanUp}")`}`);
      }
      s?.connections.forEach((c, i) => {
        if (c.state !== "connected") notes.push(`${name}: connection ${i + 1}: ${c.state}`);
      });
    }
    await writeStdout(table(rows) + notes.map((n) => n + "\n").join(""));
    return 0;
  },
};
