/**
 * Client benchmark: reading an nbdkit memory export (1 GiB, filled with
 * data) with `NbdClient` — one connection, 64 requests of 256 KiB in flight
 * — against `nbdcopy --connections=1 URI null:` on the same server, in the
 * same run, alternating. Prints each median and the ratio ours/nbdcopy
 * (above 1.0 means we are faster). Our time includes connecting; nbdcopy's
 * includes its process start-up too.
 *
 *   deno run -A bench/client_read.ts [--rounds 5] [--size 1G] [--requests 64] [--request-size 256K]
 *
 * @module
 */

import { parseArgs } from "node:util";
import { NbdClient } from "../client/client.ts";
import { parseSize } from "../util/parse.ts";
import { hasCommand, runOk, startServer } from "../tests/helpers.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "5" },
    size: { type: "string", default: "1G" },
    requests: { type: "string", default: "64" },
    "request-size": { type: "string", default: "256K" },
  },
});
const rounds = Number(values.rounds);
const size = parseSize(values.size!);
const requests = Number(values.requests);
const requestSize = parseSize(values["request-size"]!);

for (const tool of ["nbdkit", "nbdcopy"]) {
  if (!hasCommand(tool)) {
    console.error(`client_read: ${tool} is needed (apt-get install nbdkit libnbd-bin)`);
    Deno.exit(1);
  }
}

function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

/** Fills the export with non-zero data, so every read moves real bytes (no holes). */
async function fill(uri: string): Promise<void> {
  await using client = await NbdClient.connect(uri);
  const chunk = new Uint8Array(4 << 20);
  for (let i = 0; i < chunk.length; i++) chunk[i] = ((i * 131) & 0xff) | 1;
  const pending: Promise<void>[] = [];
  for (let offset = 0; offset < size; offset += chunk.length) {
    pending.push(client.pwrite(chunk.subarray(0, Math.min(chunk.length, size - offset)), offset));
    if (pending.length >= 8) await pending.shift();
  }
  await Promise.all(pending);
}

/** Reads the whole export with `requests` reads always in flight; returns seconds. */
async function readAll(uri: string): Promise<number> {
  const buffers = Array.from({ length: requests }, () => new Uint8Array(requestSize));
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
      checksum = (checksum + view[view.length - 1]!) | 0;
    }
  };
  await Promise.all(buffers.map(worker));
  await client.close();
  const seconds = (performance.now() - start) / 1000;
  if (checksum === 0) throw new Error("the export read back as zeroes: fill failed");
  return seconds;
}

async function nbdcopy(uri: string): Promise<number> {
  const start = performance.now();
  await runOk("nbdcopy", ["--connections=1", uri, "null:"]);
  return (performance.now() - start) / 1000;
}

await using server = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "memory", String(size)]);
await fill(server.uri);
const ours: number[] = [];
const theirs: number[] = [];
for (let round = 0; round < rounds; round++) {
  theirs.push(await nbdcopy(server.uri));
  ours.push(await readAll(server.uri));
}
const [o, t] = [median(ours), median(theirs)];
const rate = (seconds: number) => `${(size / seconds / 1e6).toFixed(0)} MB/s`;
console.log(
  `client_read: ${size} bytes from nbdkit memory, ${requests} x ${requestSize} in flight, ` +
    `median of ${rounds}`,
);
console.log(`  nbdcopy --connections=1 URI null:  ${t.toFixed(3)} s  ${rate(t)}`);
console.log(`  NbdClient.pread                    ${o.toFixed(3)} s  ${rate(o)}`);
console.log(`  ratio ours/nbdcopy: ${(t / o).toFixed(2)}x`);
