/**
 * qcow2 conversion benchmarks: `nbd copy` against `qemu-img convert` on the
 * same images in the same run, alternating, whole processes (start-up
 * included). Prints the median time of each, the rates and the ratio
 * (qemu-img's time / ours: above 1.0 means we are faster).
 *
 *   deno task bench:qcow2                      # 5 rounds, 1 GiB image
 *   deno task bench:qcow2 --short              # 1 round, 32 MiB (a smoke test)
 *   deno task bench:qcow2 --rounds 7 --size 512M --only compress
 *
 * The image holds a quarter random data, half compressible data and a
 * quarter zeroes, in 1 MiB pieces. Cases: qcow2 → raw, compressed qcow2 →
 * raw, raw → qcow2, raw → compressed qcow2 (zlib). Every run writes a new
 * file after `sync` (untimed), with the input in the page cache.
 *
 * Server cases (when nbdcopy and qemu-nbd are installed) compare
 * `nbd serve --filter=qcow2 file IMG` with `qemu-nbd -f qcow2 IMG`, each
 * started before the timed command: nbdcopy reading the plain and the
 * compressed image to `null:`, and `qemu-img bench -w` writing 4 KiB
 * blocks scattered over a new, empty image (a fresh image and server per
 * run, so every write allocates). Keys for `--only`: read, read-compressed,
 * write, compress, serve-read, serve-read-compressed, serve-write.
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  hasCommand,
  nbdExecutable,
  randomBytes,
  runOk,
  type ServerProcess,
  startServer,
} from "../tests/helpers.ts";
import { parseSize } from "../util/parse.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string" },
    size: { type: "string" },
    short: { type: "boolean", default: false },
    only: { type: "string" },
    dir: { type: "string" },
  },
});
const short = values.short ?? false;
const rounds = Number(values.rounds ?? (short ? "1" : "5"));
const size = parseSize(values.size ?? (short ? "32M" : "1G"));

if (!hasCommand("qemu-img")) {
  console.error("bench/qcow2: qemu-img is needed (apt-get install qemu-utils)");
  Deno.exit(1);
}

function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

async function timed(cmd: string, args: string[]): Promise<number> {
  const start = performance.now();
  await runOk(cmd, args);
  return (performance.now() - start) / 1000;
}

/** A raw image of `bytes`: random, compressible and zero pieces of 1 MiB. */
async function makeRaw(path: string, bytes: number): Promise<void> {
  using file = await Deno.open(path, { write: true, create: true, truncate: true });
  const piece = 1 << 20;
  const random = randomBytes(piece, 3);
  const text = new TextEncoder().encode(
    "block device images compress well when they hold text, logs and sparse tables; ",
  );
  for (let at = 0, i = 0; at < bytes; at += piece, i++) {
    const n = Math.min(piece, bytes - at);
    const kind = i % 4;
    if (kind === 3) continue; // zeroes: a hole
    const buf = new Uint8Array(n);
    if (kind === 0) buf.set(random.subarray(0, n));
    else {
      for (let j = 0; j < n; j++) buf[j] = text[(j + i) % text.length]! ^ (j >> 12 & 7);
    }
    await file.seek(at, Deno.SeekMode.Start);
    let done = 0;
    while (done < n) done += await file.write(buf.subarray(done));
  }
  await file.truncate(bytes);
}

interface Row {
  name: string;
  ours: number;
  theirs: number;
  peer: string;
}

const dir = values.dir ?? await Deno.makeTempDir({ prefix: "nbd-bench-qcow2" });
const nbd = await nbdExecutable();
const raw = `${dir}/src.raw`;
const plain = `${dir}/src.qcow2`;
const compressed = `${dir}/src-c.qcow2`;
const out = `${dir}/out`;
await makeRaw(raw, size);
await runOk("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, plain]);
await runOk("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", raw, compressed]);

const cases: { name: string; key: string; ours: string[]; theirs: string[] }[] = [
  {
    name: "qcow2 → raw",
    key: "read",
    ours: ["copy", "--source-format=qcow2", plain, out],
    theirs: ["convert", "-f", "qcow2", "-O", "raw", plain, out],
  },
  {
    name: "compressed qcow2 → raw",
    key: "read-compressed",
    ours: ["copy", "--source-format=qcow2", compressed, out],
    theirs: ["convert", "-f", "qcow2", "-O", "raw", compressed, out],
  },
  {
    name: "raw → qcow2",
    key: "write",
    ours: ["copy", "--destination-format=qcow2", raw, out],
    theirs: ["convert", "-f", "raw", "-O", "qcow2", raw, out],
  },
  {
    name: "raw → compressed qcow2",
    key: "compress",
    ours: ["copy", "--destination-format=qcow2", "--compress", raw, out],
    theirs: ["convert", "-c", "-f", "raw", "-O", "qcow2", raw, out],
  },
];

const rows: Row[] = [];
try {
  for (const c of cases) {
    if (values.only && !c.key.includes(values.only)) continue;
    const ours: number[] = [];
    const theirs: number[] = [];
    for (let round = 0; round < rounds; round++) {
      // Alternate which goes first, so neither always runs on a warmer machine.
      const order = round % 2 === 0 ? ["ours", "theirs"] : ["theirs", "ours"];
      for (const who of order) {
        await Deno.remove(out).catch(() => {});
        await runOk("sync", []);
        if (who === "ours") ours.push(await timed(nbd, c.ours));
        else theirs.push(await timed("qemu-img", c.theirs));
      }
    }
    // The last output of ours must be what qemu-img reads as the source.
    const format = c.key.startsWith("read") ? "raw" : "qcow2";
    await Deno.remove(out).catch(() => {});
    await runOk(nbd, c.ours);
    await runOk("qemu-img", ["compare", "-f", format, "-F", "raw", out, raw]);
    rows.push({ name: c.name, ours: median(ours), theirs: median(theirs), peer: "qemu-img" });
  }
  if (hasCommand("qemu-nbd") && hasCommand("nbdcopy")) await serverCases();
  else console.error("bench/qcow2: server cases skipped (qemu-nbd and nbdcopy are needed)");
} finally {
  if (!values.dir) await Deno.remove(dir, { recursive: true }).catch(() => {});
}

/** Starts our server or qemu-nbd on `image` (read-only unless `writable`). */
function serve(who: "ours" | "theirs", image: string, writable: boolean): Promise<ServerProcess> {
  const ro = writable ? [] : ["-r"];
  return who === "ours"
    ? startServer(nbd, ["serve", ...ro, "-U", "$SOCKET", "--filter=qcow2", "file", image])
    : startServer("qemu-nbd", [...ro, "-t", "-k", "$SOCKET", "-f", "qcow2", image]);
}

/** The timed command against a running server, and whether each run needs a new image. */
interface ServerCase {
  name: string;
  key: string;
  image: string;
  fresh: boolean;
  command: (uri: string) => [string, string[]];
}

async function serverCases(): Promise<void> {
  const writes = Math.max(1024, Math.min(20000, size / 65536));
  const scattered = `${dir}/scattered.qcow2`;
  const list: ServerCase[] = [
    {
      name: "nbdcopy ← server, qcow2",
      key: "serve-read",
      image: plain,
      fresh: false,
      command: (uri) => ["nbdcopy", [uri, "null:"]],
    },
    {
      name: "nbdcopy ← server, compressed qcow2",
      key: "serve-read-compressed",
      image: compressed,
      fresh: false,
      command: (uri) => ["nbdcopy", [uri, "null:"]],
    },
    {
      name: `qemu-img bench -w, ${writes} × 4 KiB scattered`,
      key: "serve-write",
      image: scattered,
      fresh: true,
      // 4 KiB writes 17 × 64 KiB + 4 KiB apart: nearly every one allocates a new cluster.
      command: (
        uri,
      ) => [
        "qemu-img",
        [
          "bench",
          "-w",
          "-f",
          "raw",
          "-d",
          "16",
          "-c",
          `${writes}`,
          "-s",
          "4k",
          "-S",
          "1118208",
          uri,
        ],
      ],
    },
  ];
  for (const c of list) {
    if (values.only && values.only !== c.key && !c.key.startsWith(`${values.only}`)) continue;
    const ours: number[] = [];
    const theirs: number[] = [];
    for (let round = 0; round < rounds; round++) {
      const order: ("ours" | "theirs")[] = round % 2 === 0
        ? ["ours", "theirs"]
        : ["theirs", "ours"];
      for (const who of order) {
        if (c.fresh) {
          await Deno.remove(c.image).catch(() => {});
          await runOk("qemu-img", ["create", "-q", "-f", "qcow2", c.image, `${size}`]);
        }
        await using server = await serve(who, c.image, c.fresh);
        const [cmd, args] = c.command(server.uri);
        (who === "ours" ? ours : theirs).push(await timed(cmd, args));
      }
    }
    if (c.fresh) await runOk("qemu-img", ["check", c.image]);
    rows.push({ name: c.name, ours: median(ours), theirs: median(theirs), peer: "qemu-nbd" });
  }
}

const mib = size / (1 << 20);
console.log(
  `\nqcow2 benchmark: ${mib} MiB image, ${rounds} round(s) each, alternating, medians of ` +
    `whole-process wall time; ratio = peer's time / ours (above 1.0: we are faster)\n`,
);
console.log("| case | nbd | peer | peer's time | ratio |");
console.log("| --- | --- | --- | --- | --- |");
for (const r of rows) {
  const rate = (s: number) =>
    r.peer === "qemu-nbd" && r.name.startsWith("qemu-img bench")
      ? `${s.toFixed(2)} s`
      : `${s.toFixed(2)} s (${(mib / s).toFixed(0)} MiB/s)`;
  console.log(
    `| ${r.name} | ${rate(r.ours)} | ${r.peer} | ${rate(r.theirs)} | ${
      (r.theirs / r.ours).toFixed(2)
    } |`,
  );
}
