/**
 * Copy benchmarks: `nbd copy` against nbdcopy on the same source in the
 * same run, alternating, whole processes (start-up included). Prints the
 * median time of each, the rates, the ratio of rates (ours/nbdcopy, above
 * 1.0 means we are faster) and the peak memory (RSS) of each.
 *
 *   deno task bench:copy                       # 5 rounds, 1 GiB, sparse 4 GiB
 *   deno task bench:copy --rounds 7 --size 512M --only null
 *   deno task bench:copy --portable            # Linux paths vs NBD_PORTABLE=1
 *
 * With `--portable` the comparison is `nbd copy` on the Linux fast paths
 * against `nbd copy` on the portable paths (NBD_PORTABLE=1, what macOS and
 * Windows run) instead of nbdcopy: ratio = portable rate / Linux rate.
 *
 * Cases: nbdkit memory (filled with random data) → null:, nbdkit memory →
 * a new file in the temporary directory, a file → nbdkit memory, nbdkit
 * memory → a second nbdkit memory, nbdkit sparse-random → a new file, a
 * file → a new file, `[ nbd serve file ]` (started by each copy) → a new
 * file, and nbdkit memory with TLS → null: over a Unix socket and over TCP
 * (with a client certificate, and with only the CA).
 * Runs that write a file start after `sync` (untimed), so that none pays
 * for the previous one's writeback; runs that read the input file start
 * with it in the page cache. The peak memory of `[ CMD ]` cases is the
 * largest process's, which may be the server's.
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  freePort,
  hasCommand,
  nbdExecutable,
  runOk,
  type ServerProcess,
  startServer,
} from "../tests/helpers.ts";
import { makeCertificates } from "../tests/certs.ts";
import { parseSize } from "../util/parse.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "5" },
    size: { type: "string", default: "1G" },
    "sparse-size": { type: "string", default: "4G" },
    only: { type: "string" },
    dir: { type: "string" },
    portable: { type: "boolean", default: false },
  },
});
const portable = values.portable!;
const rounds = Number(values.rounds);
const size = parseSize(values.size!);
const sparseSize = parseSize(values["sparse-size"]!);

for (const tool of ["nbdkit", "nbdcopy"]) {
  if (!hasCommand(tool)) {
    console.error(`bench/copy: ${tool} is needed (apt-get install nbdkit libnbd-bin)`);
    Deno.exit(1);
  }
}
/** GNU time gives the peak RSS of the measured process; without it only times are shown. */
const TIME = ["/usr/bin/time", "/bin/time"].find((path) => {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
});

function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

/** Runs a command; returns wall seconds and peak RSS in KiB (0 when unknown). */
async function measure(
  cmd: string,
  args: string[],
  env: Record<string, string> = {},
): Promise<{ seconds: number; peakKiB: number }> {
  const wrapped = TIME ? [TIME, "-f", "@@peak %M", cmd, ...args] : [cmd, ...args];
  const start = performance.now();
  const output = await new Deno.Command(wrapped[0]!, {
    args: wrapped.slice(1),
    env,
    stdout: "null",
    stderr: "piped",
  }).output();
  const seconds = (performance.now() - start) / 1000;
  const stderr = new TextDecoder().decode(output.stderr);
  if (!output.success) throw new Error(`${cmd} ${args.join(" ")} failed:\n${stderr}`);
  const peak = /@@peak (\d+)/.exec(stderr);
  return { seconds, peakKiB: peak ? Number(peak[1]) : 0 };
}

interface Row {
  name: string;
  bytes: number;
  ours: number;
  theirs: number;
  oursPeak: number;
  theirsPeak: number;
}

const rows: Row[] = [];
const nbd = await nbdExecutable();
/** What ours is compared with: nbdcopy, or with --portable our own copy on the portable paths. */
const other = (args: string[], env: Record<string, string>) =>
  portable
    ? measure(nbd, ["copy", ...args], { ...env, NBD_PORTABLE: "1" })
    : measure("nbdcopy", args, env);
const dir = values.dir ?? await Deno.makeTempDir({ prefix: "nbd-bench-copy" });

/** What else a case gives both tools: their environment, a source of several words. */
interface CaseOptions {
  env?: Record<string, string>;
  /** Replaces `source` on both command lines (e.g. `[ CMD ]`, after a `--` source). */
  source?: string[];
}

/**
 * Alternates ours and nbdcopy `rounds` times. `prepare` runs before each
 * run, untimed (e.g. removing the previous output).
 */
async function compare(
  name: string,
  bytes: number,
  source: string,
  destination: string,
  prepare: () => Promise<void> = () => Promise.resolve(),
  options: CaseOptions = {},
): Promise<void> {
  if (values.only && !name.includes(values.only)) return;
  const args = [source, ...options.source ?? [], destination];
  const env = options.env ?? {};
  const ours = (): Promise<{ seconds: number; peakKiB: number }> =>
    measure(nbd, ["copy", ...args], { ...env, NBD_PORTABLE: "0" });
  const oursTimes: number[] = [];
  const theirTimes: number[] = [];
  let oursPeak = 0;
  let theirsPeak = 0;
  // One untimed run each first: page cache, server memory, code caches.
  await prepare();
  await ours();
  await prepare();
  await other(args, env);
  for (let i = 0; i < rounds; i++) {
    await prepare();
    const a = await ours();
    oursTimes.push(a.seconds);
    oursPeak = Math.max(oursPeak, a.peakKiB);
    await prepare();
    const b = await other(args, env);
    theirTimes.push(b.seconds);
    theirsPeak = Math.max(theirsPeak, b.peakKiB);
  }
  rows.push({
    name,
    bytes,
    ours: median(oursTimes),
    theirs: median(theirTimes),
    oursPeak,
    theirsPeak,
  });
}

try {
  // Random data, so nothing is a hole or all-zero: every byte is read and written.
  const input = `${dir}/input.img`;
  await runOk("sh", ["-c", `head -c ${size} /dev/urandom > "$0"`, input]);
  // The new input's dirty pages would otherwise be written back during the first case.
  await runOk("sync", []);
  const output = `${dir}/output.img`;
  // Before each run that writes a file: remove the last output and wait for the disk to
  // take the dirty data, so no run pays for the writeback of the one before it (which
  // slows everything on the machine, start-up included, by a varying amount).
  const removeOutput = async () => {
    await Deno.remove(output).catch(() => {});
    await runOk("sync", []);
  };
  // nbdcopy drops from the page cache what it read of a source file that was not cached
  // before: each run starts by reading the input back in (untimed), so both find it cached.
  const warmInput = () => runOk("sh", ["-c", 'cat "$0" > /dev/null', input]).then(() => {});
  /** Servers start only for the cases that run, and stop after them. */
  const selected = (name: string) => !values.only || name.includes(values.only);
  /** nbdkit memory filled with the input; `uri` says how to reach it (with TLS, say). */
  const filledMemory = async (args: string[] = [], uri = (server: ServerProcess) => server.uri) => {
    const server = await startServer("nbdkit", [
      "-f",
      "-U",
      "$SOCKET",
      ...args,
      "memory",
      `${size}`,
    ]);
    await runOk("nbdcopy", [input, uri(server)]);
    return server;
  };

  const memoryToNull = `nbdkit memory ${values.size} → null:`;
  const memoryToFile = `nbdkit memory ${values.size} → file`;
  const fileToMemory = `file ${values.size} → nbdkit memory`;
  const memoryToMemory = `nbdkit memory ${values.size} → nbdkit memory`;
  if ([memoryToNull, memoryToFile, fileToMemory, memoryToMemory].some(selected)) {
    await using memory = await filledMemory();
    await compare(memoryToNull, size, memory.uri, "null:");
    await compare(memoryToFile, size, memory.uri, output, removeOutput);
    await compare(fileToMemory, size, input, memory.uri, warmInput);
    if (selected(memoryToMemory)) {
      await using target = await startServer("nbdkit", [
        "-f",
        "-U",
        "$SOCKET",
        "memory",
        `${size}`,
      ]);
      await compare(memoryToMemory, size, memory.uri, target.uri);
    }
  }
  const sparseToFile = `nbdkit sparse-random ${values["sparse-size"]} → file`;
  if (selected(sparseToFile)) {
    await using sparse = await startServer("nbdkit", [
      ...["-f", "-U", "$SOCKET", "sparse-random", String(sparseSize), "seed=1"],
    ]);
    await compare(sparseToFile, sparseSize, sparse.uri, output, removeOutput);
  }
  await compare(`file ${values.size} → file`, size, input, output, async () => {
    await removeOutput();
    await warmInput();
  });
  // The same program serving the input, started by each copy on a socket of its own.
  const serveToFile = `[ nbd serve file ] ${values.size} → file`;
  if (selected(serveToFile)) {
    const path = `${Deno.env.get("PATH") ?? ""}`;
    const env = { PATH: `${nbd.replace(/\/[^/]*$/, "")}:${path}` };
    await compare(serveToFile, size, "--", output, async () => {
      await removeOutput();
      await warmInput();
    }, { env, source: ["[", "nbd", "serve", "-r", "file", input, "]"] });
  }
  const tlsUnix = `TLS nbdkit memory ${values.size} → null: (Unix socket)`;
  // With a client certificate in the directory both tools present it; with only the CA
  // (a server that does not check clients) our copy can use the runtime's own TLS.
  const tlsTcp = `TLS nbdkit memory ${values.size} → null: (TCP, client certificate)`;
  const tlsTcpCaOnly = `TLS nbdkit memory ${values.size} → null: (TCP, CA only)`;
  if ([tlsUnix, tlsTcp, tlsTcpCaOnly].some(selected)) {
    const certificates = `${dir}/pki`;
    await Deno.mkdir(certificates);
    await makeCertificates(certificates);
    const caOnly = `${dir}/ca`;
    await Deno.mkdir(caOnly);
    await Deno.copyFile(`${certificates}/ca-cert.pem`, `${caOnly}/ca-cert.pem`);
    const tls = ["--tls=require", `--tls-certificates=${certificates}`];
    if (selected(tlsUnix)) {
      const tlsUri = (server: ServerProcess) =>
        `nbds+unix:///?socket=${server.socket}&tls-certificates=${certificates}`;
      await using memory = await filledMemory(tls, tlsUri);
      await compare(tlsUnix, size, tlsUri(memory), "null:");
    }
    if (selected(tlsTcp) || selected(tlsTcpCaOnly)) {
      const port = freePort();
      await using _memory = await startTcpServer(port, [...tls, "memory", `${size}`]);
      const uri = (pki: string) => `nbds://localhost:${port}/?tls-certificates=${pki}`;
      await runOk("nbdcopy", [input, uri(certificates)]);
      await compare(tlsTcp, size, uri(certificates), "null:");
      await compare(tlsTcpCaOnly, size, uri(caOnly), "null:");
    }
  }
  await removeOutput();
} finally {
  if (!values.dir) await Deno.remove(dir, { recursive: true }).catch(() => {});
}

/** Starts nbdkit on 127.0.0.1:`port` with `args`; stops it on dispose. */
async function startTcpServer(port: number, args: string[]): Promise<AsyncDisposable> {
  const child = new Deno.Command("nbdkit", {
    args: ["-f", "-p", String(port), "-i", "127.0.0.1", ...args],
    stdin: "null",
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  const stop = {
    async [Symbol.asyncDispose]() {
      child.kill("SIGTERM");
      await child.status;
    },
  };
  for (let i = 0;; i++) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      return stop;
    } catch (error) {
      if (i >= 300) {
        await stop[Symbol.asyncDispose]();
        throw error;
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

const rate = (bytes: number, seconds: number) => `${(bytes / seconds / 1e6).toFixed(0)} MB/s`;
const mib = (kib: number) => kib ? `${(kib / 1024).toFixed(0)} MiB` : "?";
const them = portable ? "nbd copy (portable)" : "nbdcopy";
console.log(
  `\ncopy benchmark: ${rounds} rounds each, alternating, medians of whole-process wall time; ` +
    (portable
      ? `ratio = the portable paths' rate / the Linux paths' rate (1.0: as fast)\n`
      : `ratio = our rate / nbdcopy's rate (> 1.0: we are faster)\n`),
);
console.log(`| case | nbd copy | ${them} | ratio | peak RSS nbd copy | peak RSS ${them} |`);
console.log(`|---|---|---|---|---|---|`);
for (const row of rows) {
  console.log(
    `| ${row.name} | ${row.ours.toFixed(3)} s (${rate(row.bytes, row.ours)}) | ${
      row.theirs.toFixed(3)
    } s (${rate(row.bytes, row.theirs)}) | ${
      (portable ? row.ours / row.theirs : row.theirs / row.ours).toFixed(2)
    }x | ${mib(row.oursPeak)} | ${mib(row.theirsPeak)} |`,
  );
}
