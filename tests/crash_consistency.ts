/**
 * Crash consistency of the writable layers: verified clients write through
 * a filter (FUA writes and FLUSHes among plain writes) and the server is
 * SIGKILLed at a random moment; then the image is checked and the server
 * restarted on it, and every block is read back through it.
 *
 * - `cache` (cache=writeback, a small cache so blocks are evicted too) and
 *   `qcow2` promise persistence for what FLUSH or a FUA write acknowledged:
 *   not one such byte may be missing after the restart, and no block may
 *   hold data nobody wrote there. Unflushed acknowledged writes may be lost
 *   (both layers keep them, or the metadata that finds them, in memory);
 *   they are counted, not failed. For qcow2, `qemu-img check` must never
 *   report corruption (exit 2); leaked clusters (exit 3) are allowed.
 * - `cow` is documented as volatile: its overlay is a deleted temporary
 *   file. After the crash the layer below must be byte-for-byte what it was,
 *   no overlay file may be left in $TMPDIR, and the restarted export shows
 *   the layer below again.
 *
 *   deno task crash                         # 4 rounds per layer
 *   deno task crash --rounds 100 --layers qcow2
 *
 * @module
 */

import { parseArgs } from "node:util";
import { hasCommand, INTEROP_REQUIRED, randomBytes, run, tempDir } from "./helpers.ts";
import { PipelinedClient } from "./pipelined_client.ts";
import { type ChaosStats, ChaosWorker, emptyChaosStats, mergeChaosStats } from "./chaos_worker.ts";
import { type NbdProcess, serveUnix } from "./chaos.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** The layers under test. */
export const CRASH_LAYERS = ["cache", "qcow2", "cow"] as const;
/** One of them. */
export type CrashLayer = typeof CRASH_LAYERS[number];

/** Options of a crash run. */
export interface CrashOptions {
  /** Rounds (kill and restart) per layer (default 4). */
  rounds?: number;
  /** Clients writing at once (default 4). */
  clients?: number;
  /** Progress and report lines (default: none). */
  log?: (line: string) => void;
}

/** What one layer's rounds found. */
export interface CrashResult {
  /** The layer. */
  layer: CrashLayer;
  /** Why it did not run, if it did not. */
  skipped?: string;
  /** Rounds run (each ends in a SIGKILL). */
  rounds: number;
  /** What the clients saw, the read-back after each restart included (cache, qcow2). */
  stats: ChaosStats;
  /** `qemu-img check` exit statuses, by status (qcow2). */
  checks: Record<string, number>;
  /** Bytes the clients had written through the cow overlay before each crash (cow). */
  overlayBytes: number;
  /** Why it failed (empty when it passed). */
  failures: string[];
}

function between(min: number, max: number): number {
  return Math.floor(min + Math.random() * (max - min));
}

/** Runs `rounds` crash rounds on one layer. */
export async function runCrash(
  layer: CrashLayer,
  options: CrashOptions = {},
): Promise<CrashResult> {
  const result: CrashResult = {
    layer,
    rounds: 0,
    stats: emptyChaosStats(),
    checks: {},
    overlayBytes: 0,
    failures: [],
  };
  const log = options.log ?? (() => {});
  if (layer === "qcow2" && !hasCommand("qemu-img")) {
    if (INTEROP_REQUIRED) throw new Error("qemu-img is missing");
    result.skipped = "qemu-img is missing";
    log(`crash: qcow2: SKIPPED: ${result.skipped}`);
    return result;
  }
  for (let round = 0; round < (options.rounds ?? 4); round++) {
    await using dir = await tempDir(`nbd-crash-${layer}`);
    if (layer === "cow") await cowRound(dir.path, result);
    else await durableRound(dir.path, layer, round, options.clients ?? 4, result);
    result.rounds++;
  }
  judge(result);
  log(formatCrash(result));
  return result;
}

/** One round on a layer that promises persistence of flushed data. */
async function durableRound(
  dir: string,
  layer: "cache" | "qcow2",
  round: number,
  clients: number,
  result: CrashResult,
): Promise<void> {
  const regionBlocks = 256;
  const blockSize = 4 * KiB;
  const size = clients * regionBlocks * blockSize;
  const socket = `${dir}/sock`;
  let image: string;
  let args: string[];
  if (layer === "cache") {
    image = `${dir}/disk.img`;
    const f = await Deno.open(image, { create: true, write: true });
    await f.truncate(size);
    f.close();
    // A cache of a quarter of the disk: dirty blocks are evicted (written below) too.
    args = [
      "serve",
      "--filter=cache",
      "file",
      image,
      "cache=writeback",
      `cache-max-size=${size / 4}`,
    ];
  } else {
    image = `${dir}/disk.qcow2`;
    // Small clusters on odd rounds: many more metadata updates per write.
    const clusterSize = round % 2 ? 4096 : 65536;
    const created = await run("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      `cluster_size=${clusterSize}`,
      image,
      String(size),
    ]);
    if (created.code !== 0) throw new Error(`qemu-img create: ${created.stderr}`);
    args = ["serve", "--filter=qcow2", "file", image];
  }
  let server: NbdProcess = await serveUnix(dir, socket, args);
  try {
    const workers = Array.from({ length: clients }, (_, i) =>
      new ChaosWorker({
        id: i,
        connect: () => PipelinedClient.connect(socket),
        regionStart: i * regionBlocks * blockSize,
        regionBlocks,
        blockSize,
        inFlight: 8,
        fuaPercent: 10,
        flushPercent: 3,
        watchdogMs: 20_000,
      }));
    let stop = false;
    const running = workers.map((w) => w.run(() => stop));
    // The kill comes at a random moment, in the middle of the writes.
    await new Promise((r) => setTimeout(r, between(300, 1500)));
    stop = true;
    await server.kill();
    await Promise.all(running);
    if (layer === "qcow2") {
      const check = await run("qemu-img", ["check", "-q", image]);
      result.checks[check.code] = (result.checks[check.code] ?? 0) + 1;
      if (check.code !== 0 && check.code !== 3) {
        result.failures.push(
          `round ${round}: qemu-img check exited ${check.code}: ${
            (check.stderr + check.stdout).trim().split("\n").slice(0, 3).join(" / ")
          }`,
        );
      }
    }
    // After the restart every flushed byte must be there.
    server = await serveUnix(dir, socket, args);
    for (const w of workers) await w.sweep();
    await Promise.all(workers.map((w) => w.close()));
    for (const w of workers) mergeChaosStats(result.stats, w.stats);
  } finally {
    await server.kill();
  }
}

/** One round on cow: everything written is gone after the crash, the layer below untouched. */
async function cowRound(dir: string, result: CrashResult): Promise<void> {
  const size = 4 * MiB;
  const image = `${dir}/disk.img`;
  const tmp = `${dir}/tmp`;
  await Deno.mkdir(tmp);
  const original = randomBytes(size, 1 + result.rounds);
  await Deno.writeFile(image, original);
  const socket = `${dir}/sock`;
  const args = ["serve", "--filter=cow", "file", image];
  let server = await serveUnix(dir, socket, args, { env: { TMPDIR: tmp } });
  try {
    const client = await PipelinedClient.connect(socket);
    const block = randomBytes(64 * KiB, 99 + result.rounds);
    const writes: Promise<void>[] = [];
    let acknowledged = 0;
    const deadline = Date.now() + between(300, 1200);
    let n = 0;
    // At most 256 writes (16 MiB): enough to cover the disk several times over.
    while (Date.now() < deadline && n < 256) {
      const offset = between(0, size / (64 * KiB)) * 64 * KiB;
      const fua = n % 7 === 0;
      writes.push(
        client.write(block, offset, fua).then(() => {
          acknowledged += block.length;
        }),
      );
      if (n++ % 5 === 4) writes.push(client.flush());
      if (writes.length >= 16) await Promise.allSettled(writes.splice(0, 8));
    }
    await Promise.allSettled(writes);
    // The writes are visible through the overlay before the crash.
    const seen = await client.read(0, size);
    if (seen.every((b, i) => b === original[i])) {
      result.failures.push("the writes through cow were not visible before the crash");
    }
    result.overlayBytes += acknowledged;
    await server.kill();
    client.close();
    const after = await Deno.readFile(image);
    if (after.length !== original.length || after.some((b, i) => b !== original[i])) {
      result.failures.push("the layer below cow changed");
    }
    const left = [...Deno.readDirSync(tmp)].map((e) => e.name);
    if (left.length > 0) result.failures.push(`cow left ${left.join(", ")} in $TMPDIR`);
    server = await serveUnix(dir, socket, args, { env: { TMPDIR: tmp } });
    const fresh = await PipelinedClient.connect(socket);
    const shown = await fresh.read(0, size);
    await fresh.disconnect();
    if (shown.some((b, i) => b !== original[i])) {
      result.failures.push("after the restart cow did not show the layer below");
    }
  } finally {
    await server.kill();
  }
}

function judge(r: CrashResult): void {
  if (r.layer === "cow") {
    if (r.overlayBytes === 0) r.failures.push("nothing was written through cow");
    return;
  }
  const s = r.stats;
  if (s.lostFlushedBytes > 0) r.failures.push(`${s.lostFlushedBytes} flushed bytes lost`);
  if (s.foreign > 0) r.failures.push(`${s.foreign} blocks hold data nobody wrote there`);
  if (s.hangs > 0) r.failures.push(`${s.hangs} requests hung`);
  if (s.writes === 0 || s.flushes === 0) r.failures.push("no write or flush was acknowledged");
}

/** One layer's report. */
export function formatCrash(r: CrashResult): string {
  if (r.skipped) return `${r.layer}: SKIPPED (${r.skipped})`;
  const s = r.stats;
  const lines = r.layer === "cow"
    ? [
      `cow: ${r.rounds} SIGKILLs; ${(r.overlayBytes / MiB).toFixed(1)} MiB written through the ` +
      `overlay, all gone after the restart as documented; the layer below unchanged`,
    ]
    : [
      `${r.layer}: ${r.rounds} SIGKILLs; ${s.writes} writes and ${s.flushes} flushes acknowledged; ` +
      `${(s.bytesVerified / MiB).toFixed(1)} MiB verified after the restarts`,
      `  flushed bytes lost ${s.lostFlushedBytes}; unflushed bytes lost ${
        s.lostAckedBytes - s.lostFlushedBytes
      } (allowed); foreign ${s.foreign}; in-flight writes found landed ${s.failedWriteBlocks}, torn ${s.tornBlocks}` +
      (r.layer === "qcow2"
        ? `\n  qemu-img check: ${
          Object.entries(r.checks).map(([code, n]) => `exit ${code} x${n}`).join(", ")
        }`
        : ""),
    ];
  lines.push(`  ${r.failures.length ? `FAILED: ${r.failures.join("; ")}` : "ok"}`);
  // The problems list also names unflushed writes lost, which is allowed: only shown on failure.
  if (r.failures.length) {
    for (const p of r.stats.problems.slice(0, 5)) lines.push(`  problem: ${p}`);
  }
  return lines.join("\n");
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      rounds: { type: "string" },
      layers: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(
      `Usage: deno task crash [--rounds N] [--layers ${CRASH_LAYERS.join(",")}]\n\n` +
        "SIGKILLs the server N times per layer (default 4) in the middle of verified writes.",
    );
    return 0;
  }
  const rounds = values.rounds === undefined ? 4 : Number(values.rounds);
  if (!Number.isInteger(rounds) || rounds <= 0) {
    console.error(`crash: --rounds: expected a positive integer, got "${values.rounds}"`);
    return 2;
  }
  const layers = (values.layers ?? CRASH_LAYERS.join(",")).split(",").map((l) => l.trim());
  for (const l of layers) {
    if (!(CRASH_LAYERS as readonly string[]).includes(l)) {
      console.error(`crash: unknown layer "${l}" (${CRASH_LAYERS.join(", ")})`);
      return 2;
    }
  }
  let failed = false;
  for (const layer of layers as CrashLayer[]) {
    const r = await runCrash(layer, { rounds, log: (line) => console.log(line) });
    failed ||= r.failures.length > 0;
  }
  console.log(failed ? "crash: FAILED" : "crash: OK");
  return failed ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main());
