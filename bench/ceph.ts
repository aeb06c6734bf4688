/**
 * Ceph RBD and S3 benchmarks against peers on one throwaway cluster
 * (tests/ceph_cluster.ts), same image, same run, alternating, whole
 * processes. Prints the median time of each side and the ratio of rates
 * (ours / the peer's: above 1.0 means we are faster).
 *
 *   deno task bench:ceph                       # 3 rounds, 256 MiB
 *   deno task bench:ceph --rounds 5 --size 512M --only s3
 *
 * Cases:
 * - nbdcopy reading `nbd serve rbd` vs nbdcopy reading `qemu-nbd` serving
 *   the same image through qemu's rbd driver (both to null:);
 * - `nbd copy rbd:IMAGE out.img` vs `qemu-img convert -f raw rbd:IMAGE out.img`;
 * - `nbd copy FILE s3://B/K` vs `curl --aws-sigv4 -T FILE` (one PUT), by
 *   parts (the default) and in one streamed PUT (NBD_S3_SINGLE_PUT_MAX), and
 *   `nbd copy s3://B/K out.img` vs `curl -o out.img`;
 * - 4 KiB writes at queue depth 64 (`qemu-img bench -w`) through
 *   `nbd serve rbd` vs through `qemu-nbd`.
 *
 * The data is random, so nothing is a hole: every byte moves. Deleted S3
 * objects are purged from radosgw's garbage list between runs (untimed),
 * so the in-memory OSD does not fill up.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { hasCommand, nbdExecutable, runOk, startServer } from "../tests/helpers.ts";
import { missingCephCommands, startCephCluster } from "../tests/ceph_cluster.ts";
import { parseSize } from "../util/parse.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "3" },
    size: { type: "string", default: "256M" },
    writes: { type: "string", default: "20000" },
    only: { type: "string" },
  },
});
const rounds = Number(values.rounds);
const size = parseSize(values.size!);
const writes = Number(values.writes);

const missing = [
  ...missingCephCommands(true),
  ...["nbdcopy", "qemu-nbd", "qemu-img", "curl"].filter((c) => !hasCommand(c)),
];
if (missing.length > 0) {
  console.error(`bench/ceph: missing ${missing.join(", ")}`);
  Deno.exit(1);
}

function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

/** Runs a command to completion; returns its wall time in seconds. */
async function timed(cmd: string, args: string[], env: Record<string, string> = {}) {
  const start = performance.now();
  const output = await new Deno.Command(cmd, { args, env, stdout: "null", stderr: "piped" })
    .output();
  const seconds = (performance.now() - start) / 1000;
  if (!output.success) {
    throw new Error(`${cmd} ${args.join(" ")} failed:\n${new TextDecoder().decode(output.stderr)}`);
  }
  return seconds;
}

interface Row {
  name: string;
  bytes: number;
  ours: number;
  theirs: number;
  peer: string;
}
const rows: Row[] = [];

/** Alternates `ours` and `theirs` (one untimed run each first); `prepare` runs untimed before each. */
async function compare(
  name: string,
  peer: string,
  bytes: number,
  ours: () => Promise<number>,
  theirs: () => Promise<number>,
  prepare: () => Promise<void> = () => Promise.resolve(),
): Promise<void> {
  if (values.only && !name.includes(values.only)) return;
  const a: number[] = [];
  const b: number[] = [];
  await prepare();
  await ours();
  await prepare();
  await theirs();
  for (let i = 0; i < rounds; i++) {
    await prepare();
    a.push(await ours());
    await prepare();
    b.push(await theirs());
  }
  rows.push({ name, peer, bytes, ours: median(a), theirs: median(b) });
  console.error(
    `${name}: ours ${a.map((x) => x.toFixed(2))}  ${peer} ${b.map((x) => x.toFixed(2))}`,
  );
}

const nbd = await nbdExecutable();
await using cluster = await startCephCluster({ rgw: true });
const dir = await Deno.makeTempDir({ prefix: "nbd-bench-ceph" });
try {
  const env = cluster.env;
  const conf = cluster.conf;
  const qemuImage = (image: string) => `rbd:rbd/${image}:conf=${conf}`;
  const input = `${dir}/input.img`;
  await runOk("sh", ["-c", `head -c ${size} /dev/urandom > "$0"`, input]);
  await cluster.rbd("import", input, "rbd/bench");
  const output = `${dir}/output.img`;
  const removeOutput = () => Deno.remove(output).catch(() => {});

  // ---- reading an image served over NBD ----
  {
    await using ours = await startServer(nbd, [
      "serve",
      "-U",
      "$SOCKET",
      "-r",
      "rbd",
      "rbd/bench",
      `conf=${conf}`,
    ]);
    await using qemu = await startServer("qemu-nbd", [
      "-t",
      "-r",
      "-f",
      "raw",
      "-k",
      "$SOCKET",
      qemuImage("bench"),
    ], { env });
    await compare(
      `nbdcopy ← NBD serving rbd ${values.size} → null:`,
      "qemu-nbd",
      size,
      () => timed("nbdcopy", [ours.uri, "null:"]),
      () => timed("nbdcopy", [qemu.uri, "null:"]),
    );
  }

  // ---- copying an image out of RBD ----
  await compare(
    `rbd:${values.size} → file`,
    "qemu-img convert",
    size,
    () => timed(nbd, ["copy", qemuImage("bench"), output], env),
    () => timed("qemu-img", ["convert", "-f", "raw", "-O", "raw", qemuImage("bench"), output], env),
    removeOutput,
  );

  // ---- S3 through radosgw ----
  const s3 = cluster.s3!;
  const awsEnv = {
    AWS_ACCESS_KEY_ID: s3.accessKey,
    AWS_SECRET_ACCESS_KEY: s3.secretKey,
    AWS_ENDPOINT_URL: s3.endpoint,
    AWS_SHARED_CREDENTIALS_FILE: `${dir}/no-credentials`,
  };
  const curl = (...args: string[]) =>
    timed("curl", [
      "-sSf",
      "--aws-sigv4",
      `aws:amz:${s3.region}:s3`,
      "--user",
      `${s3.accessKey}:${s3.secretKey}`,
      ...args,
    ]);
  const UNSIGNED = "x-amz-content-sha256: UNSIGNED-PAYLOAD";
  await curl("-X", "PUT", "-H", UNSIGNED, `${s3.endpoint}/bench`);
  const purge = async () => {
    await curl("-X", "DELETE", "-H", UNSIGNED, `${s3.endpoint}/bench/object`).catch(() => 0);
    await runOk("radosgw-admin", ["gc", "process", "--include-all"], { env });
  };
  await compare(
    `file ${values.size} → s3://`,
    "curl --aws-sigv4 (one PUT)",
    size,
    () => timed(nbd, ["copy", input, "s3://bench/object"], awsEnv),
    () => curl("-H", UNSIGNED, "-T", input, `${s3.endpoint}/bench/object`),
    purge,
  );
  await compare(
    `file ${values.size} → s3:// (one streamed PUT, NBD_S3_SINGLE_PUT_MAX)`,
    "curl --aws-sigv4 (one PUT)",
    size,
    () =>
      timed(nbd, ["copy", input, "s3://bench/object"], {
        ...awsEnv,
        NBD_S3_SINGLE_PUT_MAX: String(5 * 2 ** 30),
      }),
    () => curl("-H", UNSIGNED, "-T", input, `${s3.endpoint}/bench/object`),
    purge,
  );
  await timed(nbd, ["copy", input, "s3://bench/object"], awsEnv);
  await compare(
    `s3:// ${values.size} → file`,
    "curl --aws-sigv4",
    size,
    () => timed(nbd, ["copy", "s3://bench/object", output], awsEnv),
    () => curl("-H", UNSIGNED, "-o", output, `${s3.endpoint}/bench/object`),
    removeOutput,
  );
  await purge();

  // ---- 4 KiB writes through an NBD server over RBD ----
  {
    await cluster.rbd("create", "--size", "1G", "rbd/writes");
    await using ours = await startServer(nbd, [
      "serve",
      "-U",
      "$SOCKET",
      "rbd",
      "rbd/writes",
      `conf=${conf}`,
    ]);
    await using qemu = await startServer("qemu-nbd", [
      "-t",
      "-f",
      "raw",
      "-k",
      "$SOCKET",
      qemuImage("writes"),
    ], { env });
    const bench = (uri: string) =>
      timed("qemu-img", [
        "bench",
        "-w",
        "-f",
        "raw",
        "-c",
        String(writes),
        "-d",
        "64",
        "-s",
        "4096",
        "-S",
        "1048576",
        "-t",
        "none",
        uri,
      ]);
    await compare(
      `${writes} 4 KiB writes, depth 64`,
      "qemu-nbd",
      writes * 4096,
      () => bench(ours.uri),
      () => bench(qemu.uri),
    );
  }
} finally {
  await Deno.remove(dir, { recursive: true }).catch(() => {});
}

const rate = (bytes: number, seconds: number) => `${(bytes / seconds / 1e6).toFixed(0)} MB/s`;
console.log(
  `\nceph benchmark: ${rounds} rounds each, alternating, medians of whole-process wall time; ` +
    `ratio = our rate / the peer's (> 1.0: we are faster)\n`,
);
console.log(`| case | ours | peer | peer's | ratio |`);
console.log(`|---|---|---|---|---|`);
for (const row of rows) {
  console.log(
    `| ${row.name} | ${row.ours.toFixed(3)} s (${rate(row.bytes, row.ours)}) | ${row.peer} | ${
      row.theirs.toFixed(3)
    } s (${rate(row.bytes, row.theirs)}) | ${(row.theirs / row.ours).toFixed(2)} |`,
  );
}
