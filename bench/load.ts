/**
 * Load test: `nbd serve` subprocesses (a memory export and a file export,
 * one after the other) under many connections, each with many requests in
 * flight, doing writes and verified reads for a fixed time. Every
 * connection owns its own region of the export, so every read can be
 * checked exactly; at the end each region is read back in full and the
 * file export's image is checked on disk after the server has stopped.
 *
 *   deno task load                                   # 16 connections x 32 in flight, 20 s per export
 *   deno task load --seconds 5 --connections 4 --exports memory
 *   deno task load --workers 2                       # the server on two threads
 *
 * Prints requests served, errors, mismatches, latency percentiles,
 * throughput and the server's peak RSS; exits 1 on any error or mismatch.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { type ServerProcess, startNbdServe, tempDir } from "../tests/helpers.ts";
import { PipelinedClient } from "../tests/pipelined_client.ts";
import { formatKiB, peakRssKiB, percentile } from "../tests/proc_stats.ts";
import { emptyStats, type IoStats, mergeStats, VerifiedWorker } from "../tests/verified_io.ts";

/** Options of a load run. */
export interface LoadOptions {
  /** Connections per export (default 16). */
  connections?: number;
  /** Requests in flight per connection (default 32). */
  inFlight?: number;
  /** Seconds of load per export (default 20). */
  seconds?: number;
  /** Which exports to load, in order (default memory and file). */
  exports?: Array<"memory" | "file">;
  /** Block size in bytes (default 4096). */
  blockSize?: number;
  /** Largest request in blocks (default 8). */
  maxBlocks?: number;
  /** Blocks owned by each connection (default 1024). */
  regionBlocks?: number;
  /** Negotiate extended headers instead of structured replies. */
  extended?: boolean;
  /** Threads serving (`nbd serve --workers`, default 1). */
  workers?: number;
  /** Progress and report lines (default: none). */
  log?: (line: string) => void;
}

/** The outcome of loading one export. */
export interface LoadResult {
  /** "memory" or "file". */
  export: string;
  /** Connections used. */
  connections: number;
  /** Requests in flight per connection. */
  inFlight: number;
  /** Seconds the load ran (measured). */
  seconds: number;
  /** Merged figures of all connections (sweeps and the on-disk check included). */
  stats: IoStats;
  /** Latency percentiles in milliseconds. */
  p50: number;
  /** 90th percentile latency (ms). */
  p90: number;
  /** 99th percentile latency (ms). */
  p99: number;
  /** Largest latency (ms). */
  max: number;
  /** Requests per second. */
  requestsPerSecond: number;
  /** Payload MiB per second. */
  mibPerSecond: number;
  /** Peak RSS of the server process in KiB. */
  peakRssKiB: number | undefined;
  /** The server exited with status 0 when asked to stop. */
  cleanExit: boolean;
}

/** Runs the load against each export in turn. */
export async function runLoad(options: LoadOptions = {}): Promise<LoadResult[]> {
  const results: LoadResult[] = [];
  for (const kind of options.exports ?? ["memory", "file"]) {
    results.push(await loadOne(kind, options));
  }
  return results;
}

async function loadOne(kind: "memory" | "file", options: LoadOptions): Promise<LoadResult> {
  const connections = options.connections ?? 16;
  const inFlight = options.inFlight ?? 32;
  const seconds = options.seconds ?? 20;
  const blockSize = options.blockSize ?? 4096;
  const regionBlocks = options.regionBlocks ?? 1024;
  const log = options.log ?? (() => {});
  const size = connections * regionBlocks * blockSize;
  await using dir = await tempDir("nbd-load");
  const image = `${dir.path}/disk.img`;
  let args: string[];
  if (kind === "file") {
    const f = await Deno.open(image, { create: true, write: true, truncate: true });
    await f.truncate(size);
    f.close();
    args = ["--max-in-flight", String(Math.max(64, inFlight)), "file", image];
  } else {
    args = ["--max-in-flight", String(Math.max(64, inFlight)), "memory", String(size)];
  }
  if ((options.workers ?? 1) > 1) args = ["--workers", String(options.workers), ...args];
  const server: ServerProcess = await startNbdServe(args);
  const stats = emptyStats();
  let measured = 0;
  let peak: number | undefined;
  let cleanExit = false;
  const workers: VerifiedWorker[] = [];
  try {
    const clients = await Promise.all(
      Array.from(
        { length: connections },
        () => PipelinedClient.connect(server.socket!, { extended: options.extended }),
      ),
    );
    clients.forEach((client, i) =>
      workers.push(
        new VerifiedWorker(client, {
          id: i,
          regionStart: i * regionBlocks * blockSize,
          regionBlocks,
          blockSize,
          maxBlocks: options.maxBlocks ?? 8,
          inFlight,
        }),
      )
    );
    log(
      `load: ${kind} export, ${connections} connections x ${inFlight} in flight, ${seconds} s`,
    );
    const started = performance.now();
    const deadline = started + seconds * 1000;
    await Promise.all(workers.map((w) => w.run(() => performance.now() >= deadline)));
    measured = (performance.now() - started) / 1000;
    for (const w of workers) mergeStats(stats, w.stats);
    // A full read-back of every region (not counted in the latency figures).
    for (const w of workers) {
      const before = { ...w.stats, problems: w.stats.problems.length };
      await w.sweep();
      stats.errors += w.stats.errors - before.errors;
      stats.mismatches += w.stats.mismatches - before.mismatches;
      stats.problems.push(...w.stats.problems.slice(before.problems));
    }
    peak = peakRssKiB(server.child.pid);
    await Promise.all(clients.map((c) => c.disconnect()));
  } finally {
    // SIGTERM: the server finishes, flushes and exits 0.
    await server[Symbol.asyncDispose]();
    cleanExit = (await server.child.status).code === 0;
  }
  if (kind === "file") {
    const bytes = await Deno.readFile(image);
    let bad = 0;
    for (const w of workers) {
      const before = w.stats.problems.length;
      bad += w.checkImage(bytes);
      stats.problems.push(...w.stats.problems.slice(before));
    }
    stats.mismatches += bad;
  }
  const sorted = Float64Array.from(stats.latencies).sort();
  const result: LoadResult = {
    export: kind,
    connections,
    inFlight,
    seconds: measured,
    stats,
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    max: sorted.length ? sorted[sorted.length - 1]! : NaN,
    requestsPerSecond: stats.requests / measured,
    mibPerSecond: stats.bytes / measured / 1048576,
    peakRssKiB: peak,
    cleanExit,
  };
  log(formatResult(result));
  return result;
}

/** A human-readable report of one export's run. */
export function formatResult(r: LoadResult): string {
  const s = r.stats;
  const lines = [
    `${r.export}: ${s.requests} requests in ${r.seconds.toFixed(1)} s ` +
    `(${s.reads} reads, ${s.writes} writes, ${s.flushes} flushes) over ${r.connections} connections x ${r.inFlight} in flight`,
    `  errors ${s.errors}, mismatches ${s.mismatches}, server exit ${
      r.cleanExit ? "clean" : "NOT clean"
    }`,
    `  latency ms: p50 ${r.p50.toFixed(2)}, p90 ${r.p90.toFixed(2)}, p99 ${r.p99.toFixed(2)}, max ${
      r.max.toFixed(2)
    }`,
    `  throughput: ${Math.round(r.requestsPerSecond)} requests/s, ${
      r.mibPerSecond.toFixed(1)
    } MiB/s`,
    `  server peak RSS: ${formatKiB(r.peakRssKiB)}`,
  ];
  for (const p of s.problems.slice(0, 5)) lines.push(`  problem: ${p}`);
  return lines.join("\n");
}

function positive(text: string | undefined, name: string, fallback: number): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n <= 0) {
    console.error(`load: ${name}: expected a positive integer, got "${text}"`);
    Deno.exit(2);
  }
  return n;
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      connections: { type: "string", short: "c" },
      "in-flight": { type: "string", short: "r" },
      seconds: { type: "string", short: "s" },
      exports: { type: "string" },
      "block-size": { type: "string" },
      "max-blocks": { type: "string" },
      "region-blocks": { type: "string" },
      extended: { type: "boolean" },
      workers: { type: "string", short: "w" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(
      `Usage: deno task load [--connections N] [--in-flight N] [--seconds S] [--exports memory,file]
                      [--block-size BYTES] [--max-blocks N] [--region-blocks N] [--extended]
                      [--workers N]`,
    );
    return 0;
  }
  const exports = (values.exports ?? "memory,file").split(",").map((e) => e.trim());
  for (const e of exports) {
    if (e !== "memory" && e !== "file") {
      console.error(`load: --exports: unknown export kind "${e}" (memory, file)`);
      return 2;
    }
  }
  const results = await runLoad({
    connections: positive(values.connections, "--connections", 16),
    inFlight: positive(values["in-flight"], "--in-flight", 32),
    seconds: positive(values.seconds, "--seconds", 20),
    exports: exports as Array<"memory" | "file">,
    blockSize: positive(values["block-size"], "--block-size", 4096),
    maxBlocks: positive(values["max-blocks"], "--max-blocks", 8),
    regionBlocks: positive(values["region-blocks"], "--region-blocks", 1024),
    extended: values.extended,
    workers: positive(values.workers, "--workers", 1),
    log: (line) => console.log(line),
  });
  const failed = results.some((r) => r.stats.errors > 0 || r.stats.mismatches > 0 || !r.cleanExit);
  console.log(failed ? "load: FAILED" : "load: OK (0 errors, 0 mismatches)");
  return failed ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main());
