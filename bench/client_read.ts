/**
 * Benchmark: reading a 1 GiB nbdkit memory export with `NbdClient` (64
 * requests of 256 KiB in flight on one connection) against
 * `nbdcopy --connections=1 URI null:` on the same server in the same run.
 * Prints both rates and their ratio (ours / nbdcopy).
 *
 *   deno run -A bench/client_read.ts [--size 1G] [--runs 3] [--requests 64] [--request-size 256K]
 *
 * @module
 */

import { parseArgs } from "node:util";
import { NbdClient } from "../client/client.ts";
import { parseSize } from "../server/params.ts";

const args = parseArgs({
  args: Deno.args,
  options: {
    size: { type: "string", default: "1G" },
    runs: { type: "string", default: "3" },
    requests: { type: "string", default: "64" },
    "request-size": { type: "string", default: "256K" },
  },
});
const size = parseSize(args.values.size!);
const runs = Number(args.values.runs);
const requests = Number(args.values.requests);
const requestSize = parseSize(args.values["request-size"]!);

function have(command: string): boolean {
  try {
    return new Deno.Command("sh", { args: ["-c", `command -v ${command}`], stdout: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

if (!have("nbdkit") || !have("nbdcopy")) {
  console.error("client_read: nbdkit and nbdcopy are needed for this benchmark; skipped");
  Deno.exit(0);
}

const dir = await Deno.makeTempDir({ prefix: "nbd-bench" });
const socket = `${dir}/sock`;
const server = new Deno.Command("nbdkit", {
  args: ["-f", "-U", socket, "memory", String(size)],
  stdout: "null",
  stderr: "inherit",
}).spawn();

async function waitForSocket(): Promise<void> {
  for (let i = 0; i < 200; i++) {
    try {
      // Only look for the socket: connecting and hanging up makes nbdkit log an error.
      if ((await Deno.stat(socket)).isSocket) return;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error("nbdkit did not start");
}

/** Fills the export with non-zero data so every read moves real bytes. */
async function fill(uri: string): Promise<void> {
  await using client = await NbdClient.connect(uri);
  const chunk = new Uint8Array(4 << 20);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131 + 7) & 0xff || 1;
  const pending: Promise<void>[] = [];
  for (let offset = 0; offset < size; offset += chunk.length) {
    pending.push(client.pwrite(chunk.subarray(0, Math.min(chunk.length, size - offset)), offset));
    if (pending.length >= 8) await pending.shift();
  }
  await Promise.all(pending);
}

/** Reads the whole export with a sliding window of `requests` reads. */
async function readAll(uri: string): Promise<number> {
  const buffers = Array.from({ length: requests }, () => new Uint8Array(requestSize));
  // The clock includes connecting, as nbdcopy's time includes its handshake (and start-up).
  const start = performance.now();
  const client = await NbdClient.connect(uri);
  let next = 0;
  let checksum = 0;
  const worker = async (buf: Uint8Array) => {
    while (next < size) {
      const offset = next;
      next += requestSize;
      const view = buf.subarray(0, Math.min(requestSize, size - offset));
      await client.pread(view, offset);
      checksum ^= view[0]!;
    }
  };
  await Promise.all(buffers.map(worker));
  const seconds = (performance.now() - start) / 1000;
  await client.close();
  if (checksum === -1) console.log(checksum); // keep the reads observable
  return seconds;
}

async function nbdcopy(uri: string): Promise<number> {
  const start = performance.now();
  const out = await new Deno.Command("nbdcopy", {
    args: ["--connections=1", uri, "null:"],
    stdout: "null",
    stderr: "inherit",
  }).output();
  if (!out.success) throw new Error("nbdcopy failed");
  return (performance.now() - start) / 1000;
}

try {
  await waitForSocket();
  const uri = `nbd+unix:///?socket=${socket}`;
  await fill(uri);
  const theirs: number[] = [];
  const ours: number[] = [];
  for (let run = 0; run < runs; run++) {
    theirs.push(await nbdcopy(uri));
    ours.push(await readAll(uri));
  }
  const best = (times: number[]) => Math.min(...times);
  const rate = (seconds: number) => (size / seconds / 1e6).toFixed(0);
  const [t, o] = [best(theirs), best(ours)];
  console.log(
    `client_read: ${size} bytes, ${requests} x ${requestSize} in flight, best of ${runs}`,
  );
  console.log(`  nbdcopy --connections=1 null:  ${t.toFixed(3)} s  ${rate(t)} MB/s`);
  console.log(`  NbdClient                      ${o.toFixed(3)} s  ${rate(o)} MB/s`);
  console.log(`  ratio (ours / nbdcopy): ${(t / o).toFixed(2)}x`);
} finally {
  server.kill("SIGTERM");
  await server.status;
  await Deno.remove(dir, { recursive: true });
}
