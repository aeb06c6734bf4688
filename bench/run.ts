/**
 * Server benchmarks: the same client reads (or writes) the same data from
 * `nbd serve` and from nbdkit in the same run, alternating, and the table
 * shows each median and the ratio ours/nbdkit (above 1.0 means we are
 * faster): memory plugin reads and writes, file plugin reads, TLS.
 *
 *   deno task bench            # 5 rounds each
 *   deno task bench --rounds 3 --size 256M
 *   deno task bench --portable # nbd serve on the Linux paths vs NBD_PORTABLE=1
 *
 * With `--portable` the other server is `nbd serve` on the portable paths
 * (NBD_PORTABLE=1, what macOS and Windows run) instead of nbdkit, and the
 * ratio is the portable paths' rate / the Linux paths' rate (below 1.0: the
 * portable paths are slower).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { hasCommand, ROOT, runOk, startNbdServe, startServer } from "../tests/helpers.ts";
import { makeCertificates } from "../tests/certs.ts";
import { parseSize } from "../util/parse.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "5" },
    size: { type: "string", default: "1G" },
    "bench-count": { type: "string", default: "200000" },
    portable: { type: "boolean", default: false },
  },
});
const portable = values.portable!;
/** The server ours is compared with: nbdkit, or with --portable nbd serve on the portable paths. */
const otherName = portable ? "nbd serve (portable)" : "nbdkit";
function startOther(args: string[]) {
  if (!portable) return startServer("nbdkit", ["-f", "-U", "$SOCKET", ...args]);
  return startServer(
    Deno.execPath(),
    ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve", "-U", "$SOCKET", ...args],
    { env: { NBD_PORTABLE: "1" } },
  );
}
const rounds = Number(values.rounds);
const size = parseSize(values.size!);

for (const tool of ["nbdkit", "nbdcopy", "qemu-img"]) {
  if (!hasCommand(tool)) {
    console.error(`bench: ${tool} is needed (apt-get install nbdkit libnbd-bin qemu-utils)`);
    Deno.exit(1);
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function timed(cmd: string, args: string[]): Promise<number> {
  const start = performance.now();
  await runOk(cmd, args);
  return (performance.now() - start) / 1000;
}

function peakRss(pid: number): string {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    const kib = Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? 0);
    return `${Math.round(kib / 1024)} MiB`;
  } catch {
    return "?";
  }
}

interface Row {
  name: string;
  unit: string;
  ours: number;
  theirs: number;
  /** true when a smaller figure is better (times). */
  lowerIsBetter: boolean;
}

await using ours = await startNbdServe(["memory", String(size)]);
await using nbdkit = await startOther(["memory", String(size)]);

// The same contents in both: a filled (non-sparse) disk.
for (const server of [ours, nbdkit]) {
  await runOk("nbdcopy", ["--", "[", "nbdkit", "pattern", String(size), "]", server.uri]);
}

const rows: Row[] = [];
async function compare(
  name: string,
  args: (uri: string) => [string, string[]],
  uris: [string, string] = [ours.uri, nbdkit.uri],
): Promise<void> {
  const a: number[] = [];
  const b: number[] = [];
  for (let i = 0; i < rounds; i++) {
    const [cmdA, argsA] = args(uris[0]);
    a.push(await timed(cmdA, argsA));
    const [cmdB, argsB] = args(uris[1]);
    b.push(await timed(cmdB, argsB));
  }
  rows.push({ name, unit: "s", ours: median(a), theirs: median(b), lowerIsBetter: true });
}

await compare(
  `nbdcopy ${values.size} → null: (default connections)`,
  (uri) => ["nbdcopy", [uri, "null:"]],
);
await compare(`nbdcopy ${values.size} → null: (--connections=1)`, (uri) => [
  "nbdcopy",
  ["--connections=1", uri, "null:"],
]);
await compare(
  `qemu-img bench 4 KiB random reads, depth 64, ${values["bench-count"]} ops`,
  (uri) => [
    "qemu-img",
    [
      "bench",
      "-f",
      "raw",
      "-c",
      values["bench-count"]!,
      "-d",
      "64",
      "-s",
      "4096",
      "-t",
      "none",
      uri,
    ],
  ],
);

// Writes: the same file into both memory servers (whose pages exist by now, so neither
// pays for fresh memory), read from the page cache.
const dataDir = await Deno.makeTempDir({ prefix: "nbd-bench-data" });
try {
  const image = `${dataDir}/image.raw`;
  await runOk("nbdcopy", ["--", "[", "nbdkit", "pattern", String(size), "]", image]);
  await compare(
    `nbdcopy file ${values.size} → server (writes)`,
    (uri) => ["nbdcopy", [image, uri]],
  );
  // Reads through the file plugin, of a file in the page cache.
  await using oursFile = await startNbdServe(["file", image]);
  await using nbdkitFile = await startOther(["file", image]);
  await compare(
    `file plugin: nbdcopy ${values.size} → null:`,
    (uri) => ["nbdcopy", [uri, "null:"]],
    [oursFile.uri, nbdkitFile.uri],
  );
} finally {
  await Deno.remove(dataDir, { recursive: true });
}

// TLS: the same read through --tls=require on both servers.
const pki = await Deno.makeTempDir({ prefix: "nbd-bench-pki" });
try {
  await makeCertificates(pki);
  await using oursTls = await startNbdServe([
    "--tls=require",
    `--tls-certificates=${pki}`,
    "memory",
    String(size),
  ]);
  await using nbdkitTls = await startOther([
    "--tls=require",
    `--tls-certificates=${pki}`,
    "memory",
    String(size),
  ]);
  const tlsUri = (socket: string) => `nbds+unix:///?socket=${socket}&tls-certificates=${pki}`;
  const uris: [string, string] = [tlsUri(oursTls.socket!), tlsUri(nbdkitTls.socket!)];
  for (const uri of uris) {
    await runOk("nbdcopy", ["--", "[", "nbdkit", "pattern", String(size), "]", uri]);
  }
  await compare(
    `TLS: nbdcopy ${values.size} → null: (--tls=require)`,
    (uri) => ["nbdcopy", [uri, "null:"]],
    uris,
  );
} finally {
  await Deno.remove(pki, { recursive: true });
}

console.log(
  portable
    ? `\nserver benchmark: ${rounds} rounds, medians; ratio = portable rate / Linux rate (1.0: as fast)\n`
    : `\nserver benchmark: ${rounds} rounds, medians; ratio = nbdkit time / our time (> 1.0: we are faster)\n`,
);
console.log(
  `| benchmark | nbd serve | ${otherName} | ${
    portable ? "ratio portable/Linux" : "ratio ours/nbdkit"
  } |`,
);
console.log(`|---|---|---|---|`);
for (const row of rows) {
  let ratio = row.lowerIsBetter ? row.theirs / row.ours : row.ours / row.theirs;
  if (portable) ratio = 1 / ratio;
  console.log(
    `| ${row.name} | ${row.ours.toFixed(3)} ${row.unit} | ${row.theirs.toFixed(3)} ${row.unit} | ${
      ratio.toFixed(2)
    }x |`,
  );
}
console.log(
  `\npeak RSS: nbd serve ${peakRss(ours.child.pid)}, ${otherName} ${peakRss(nbdkit.child.pid)}`,
);
