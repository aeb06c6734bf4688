/**
 * Soak: a memory export and a file export, each in its own `nbd serve`
 * process, served at the same time for a long while (10 minutes by default)
 * under a mixed load: on each, eight connections (the exports advertise
 * multi-conn) with many requests in flight doing verified writes, reads,
 * WRITE_ZEROES (with and without NO_HOLE), FUA writes and FLUSHes. The
 * servers' RSS is sampled every second.
 *
 * It fails when any request fails or hangs, any block reads back other than
 * last written, the file image on disk disagrees after the server stopped,
 * a server does not exit cleanly on SIGTERM, or a server's RSS grows by more
 * than 10% after the warm-up (the first half of the run, long enough on a
 * loaded machine): the largest sample of the last fifth is compared with the
 * largest of the third quarter, so the garbage collector's sawtooth is not
 * mistaken for growth.
 *
 *   deno task soak                      # 600 s
 *   deno task soak --duration 60        # what the test suite runs
 *
 * @module
 */

import { parseArgs } from "node:util";
import { tempDir } from "./helpers.ts";
import { PipelinedClient } from "./pipelined_client.ts";
import {
  type ChaosStats,
  ChaosWorker,
  emptyChaosStats,
  errorReplies,
  mergeChaosStats,
} from "./chaos_worker.ts";
import { type NbdProcess, serveUnix, socketCount } from "./chaos.ts";
import { formatKiB, rssKiB } from "./proc_stats.ts";
import * as C from "../protocol/constants.ts";

/**
 * V8 grows its young generation in doubling steps during the first minute
 * or two under load (each step adds some 15 to 30 MiB of RSS while the live
 * heap stays the same). The soak's servers start with it at full size, so a
 * 60 s run measures what the server keeps, not when V8 resized itself.
 */
const PRESIZED_YOUNG_GENERATION = "--min-semi-space-size=16,--max-semi-space-size=16";

const KiB = 1024;
const MiB = 1024 * KiB;

/** Options of a soak run. */
export interface SoakOptions {
  /** Seconds of load (default 600). */
  duration?: number;
  /** Connections per export (default 8). */
  connections?: number;
  /** Requests in flight per connection (default 16). */
  inFlight?: number;
  /** Allowed RSS growth after the warm-up, as a fraction (default 0.10). */
  rssTolerance?: number;
  /** Progress and report lines (default: none). */
  log?: (line: string) => void;
}

/** One export's soak. */
export interface SoakResult {
  /** "memory" or "file". */
  export: string;
  /** Seconds of load. */
  seconds: number;
  /** What the clients saw, the read-back and the on-disk check included. */
  stats: ChaosStats;
  /** RSS samples (KiB), one a second. */
  samples: number[];
  /** Largest RSS of the third quarter, after the warm-up (KiB). */
  rssBaseline: number;
  /** Largest RSS of the last fifth (KiB). */
  rssFinal: number;
  /** Why it failed (empty when it passed). */
  failures: string[];
}

/** Runs the soak on both exports at once. */
export async function runSoak(options: SoakOptions = {}): Promise<SoakResult[]> {
  return await Promise.all(
    (["memory", "file"] as const).map((kind) => soakOne(kind, options)),
  );
}

async function soakOne(kind: "memory" | "file", options: SoakOptions): Promise<SoakResult> {
  const duration = options.duration ?? 600;
  const connections = options.connections ?? 8;
  const inFlight = options.inFlight ?? 16;
  const tolerance = options.rssTolerance ?? 0.10;
  const regionBlocks = 512;
  const blockSize = 4 * KiB;
  const size = connections * regionBlocks * blockSize;
  const log = options.log ?? (() => {});
  await using dir = await tempDir(`nbd-soak-${kind}`);
  const image = `${dir.path}/disk.img`;
  const socket = `${dir.path}/sock`;
  if (kind === "file") {
    const f = await Deno.open(image, { create: true, write: true, truncate: true });
    await f.truncate(size);
    f.close();
  }
  const server: NbdProcess = await serveUnix(
    dir.path,
    socket,
    [
      "serve",
      "--max-in-flight",
      "64",
      ...(kind === "file" ? ["file", image] : ["memory", String(size)]),
    ],
    { denoFlags: [`--v8-flags=${PRESIZED_YOUNG_GENERATION}`] },
  );
  const result: SoakResult = {
    export: kind,
    seconds: 0,
    stats: emptyChaosStats(),
    samples: [],
    rssBaseline: 0,
    rssFinal: 0,
    failures: [],
  };
  let stopped = false;
  try {
    const probe = await PipelinedClient.connect(socket);
    if (!(probe.flags & C.NBD_FLAG_CAN_MULTI_CONN)) {
      result.failures.push("the export does not advertise multi-conn");
    }
    await probe.disconnect();
    const socketsBefore = socketCount(server.pid);
    const workers = Array.from({ length: connections }, (_, i) =>
      new ChaosWorker({
        id: i,
        connect: () => PipelinedClient.connect(socket),
        regionStart: i * regionBlocks * blockSize,
        regionBlocks,
        blockSize,
        inFlight,
        maxBlocks: 16,
        fuaPercent: 5,
        flushPercent: 1,
        zeroPercent: 10,
        watchdogMs: 30_000,
      }));
    let stop = false;
    const started = performance.now();
    const running = workers.map((w) => w.run(() => stop));
    const sampler = (async () => {
      while (!stop) {
        const kib = rssKiB(server.pid);
        if (kib !== undefined) result.samples.push(kib);
        const elapsed = (performance.now() - started) / 1000;
        if (result.samples.length % 60 === 0 && result.samples.length > 0) {
          log(`soak: ${kind}: ${elapsed.toFixed(0)} s, RSS ${formatKiB(kib)}`);
        }
        await new Promise((r) => setTimeout(r, 1000));
      }
    })();
    await new Promise((r) => setTimeout(r, duration * 1000));
    stop = true;
    await Promise.all(running);
    await sampler;
    result.seconds = (performance.now() - started) / 1000;
    for (const w of workers) await w.settle();
    for (const w of workers) await w.sweep();
    await Promise.all(workers.map((w) => w.close()));
    const deadline = Date.now() + 10_000;
    while (socketCount(server.pid) > socketsBefore && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const leaked = socketCount(server.pid) - socketsBefore;
    if (leaked > 0) {
      result.failures.push(`the server holds ${leaked} sockets after the clients left`);
    }
    const status = await server.stop();
    stopped = true;
    if (status.code !== 0) result.failures.push(`the server exited with ${status.code} on SIGTERM`);
    if (kind === "file") {
      const bytes = await Deno.readFile(image);
      for (const w of workers) w.checkImage(bytes, "on disk");
    }
    for (const w of workers) mergeChaosStats(result.stats, w.stats);
  } finally {
    if (!stopped) await server.kill();
  }
  judge(result, tolerance);
  log(formatSoak(result));
  return result;
}

function judge(r: SoakResult, tolerance: number): void {
  const s = r.stats;
  const failed = errorReplies(s) + s.connectionLosses + s.hangs;
  if (failed > 0) r.failures.push(`${failed} requests failed or hung`);
  if (s.foreign > 0 || s.lostAckedBytes > 0) {
    r.failures.push(`${s.foreign} foreign blocks, ${s.lostAckedBytes} bytes lost`);
  }
  if (s.writes === 0 || s.reads === 0 || s.zeroes === 0 || s.flushes === 0) {
    r.failures.push("the mix lacked writes, reads, zeroes or flushes");
  }
  const n = r.samples.length;
  if (n < 10) {
    r.failures.push(`only ${n} RSS samples`);
    return;
  }
  r.rssBaseline = Math.max(...r.samples.slice(Math.floor(n / 2), Math.floor((3 * n) / 4)));
  r.rssFinal = Math.max(...r.samples.slice(Math.floor((4 * n) / 5)));
  if (r.rssFinal > r.rssBaseline * (1 + tolerance)) {
    r.failures.push(
      `RSS grew from ${formatKiB(r.rssBaseline)} to ${formatKiB(r.rssFinal)} after the warm-up`,
    );
  }
}

/** One export's report. */
export function formatSoak(r: SoakResult): string {
  const s = r.stats;
  const growth = r.rssBaseline ? ((r.rssFinal / r.rssBaseline - 1) * 100).toFixed(1) : "?";
  return [
    `${r.export}: ${s.requests} requests in ${r.seconds.toFixed(0)} s (${s.reads} reads, ` +
    `${s.writes} writes, ${s.zeroes} zeroes, ${s.flushes} flushes), ` +
    `${(s.bytesVerified / MiB).toFixed(0)} MiB verified`,
    `  failed ${errorReplies(s) + s.connectionLosses}, hangs ${s.hangs}, foreign ${s.foreign}, ` +
    `lost ${s.lostAckedBytes} bytes`,
    `  RSS after warm-up ${formatKiB(r.rssBaseline)}, at the end ${formatKiB(r.rssFinal)} ` +
    `(${growth}%), peak ${formatKiB(Math.max(...r.samples))}`,
    `  ${r.failures.length ? `FAILED: ${r.failures.join("; ")}` : "ok"}`,
    ...s.problems.slice(0, 5).map((p) => `  problem: ${p}`),
  ].join("\n");
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      duration: { type: "string", short: "d" },
      connections: { type: "string" },
      "in-flight": { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(
      "Usage: deno task soak [--duration SECONDS] [--connections N] [--in-flight N]\n\n" +
        "Serves a memory and a file export for SECONDS (default 600) under verified load.",
    );
    return 0;
  }
  const number = (text: string | undefined, name: string, fallback: number) => {
    if (text === undefined) return fallback;
    const n = Number(text);
    if (!(n > 0)) {
      console.error(`soak: ${name}: expected a positive number, got "${text}"`);
      Deno.exit(2);
    }
    return n;
  };
  const results = await runSoak({
    duration: number(values.duration, "--duration", 600),
    connections: number(values.connections, "--connections", 8),
    inFlight: number(values["in-flight"], "--in-flight", 16),
    log: (line) => console.log(line),
  });
  const failed = results.some((r) => r.failures.length > 0);
  console.log(failed ? "soak: FAILED" : "soak: OK");
  return failed ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main());
