/**
 * File plugin benchmarks: `nbd serve file` against `nbdkit file` on the same
 * file, the same client, in the same run, alternating round by round; the
 * table shows each median and the ratio (above 1.0 means we are faster).
 *
 *   deno task bench:file                  # 5 rounds, 1 GiB
 *   deno task bench:file --rounds 3 --size 512M --only write
 *
 * Rows: nbdcopy reading the file from the page cache; nbdcopy writing it
 * into a preallocated file and into a new sparse file (recreated before
 * each run, after an untimed `sync`); qemu-img bench 4 KiB random reads and
 * writes at depth 64; the same reads from a loop block device over the
 * file (needs root and losetup, else the row is skipped with a note); and
 * fio's nbd engine doing 70/30 random 4 KiB reads and writes over 4
 * connections with 32 requests in flight each (IOPS, needs fio), against
 * the file and against the memory plugin (`--only mixed`).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { hasCommand, run, runOk, startNbdServe, startServer } from "../tests/helpers.ts";
import { parseSize } from "../util/parse.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "5" },
    size: { type: "string", default: "1G" },
    "bench-count": { type: "string", default: "200000" },
    "fio-seconds": { type: "string", default: "5" },
    only: { type: "string" },
    dir: { type: "string" },
  },
});
const rounds = Number(values.rounds);
const size = parseSize(values.size!);
const only = values.only;

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

interface Row {
  name: string;
  unit: string;
  ours: number;
  theirs: number;
  /** true when a smaller figure is better (times). */
  lowerIsBetter: boolean;
}

const rows: Row[] = [];
const notes: string[] = [];

/** Whether the row named by `key` runs (all unless --only names another). */
function selected(key: string): boolean {
  return only === undefined || only.split(",").includes(key);
}

/**
 * Measures `measure(uri)` against both servers, alternating, `rounds` times;
 * `before` runs untimed before each measurement.
 */
async function compare(
  name: string,
  servers: [string, string],
  measure: (uri: string) => Promise<number>,
  options: { unit?: string; lowerIsBetter?: boolean; before?: () => Promise<void> } = {},
): Promise<void> {
  const a: number[] = [];
  const b: number[] = [];
  for (let i = 0; i < rounds; i++) {
    await options.before?.();
    a.push(await measure(servers[0]));
    await options.before?.();
    b.push(await measure(servers[1]));
  }
  rows.push({
    name,
    unit: options.unit ?? "s",
    ours: median(a),
    theirs: median(b),
    lowerIsBetter: options.lowerIsBetter ?? true,
  });
  const last = rows[rows.length - 1]!;
  console.error(`${name}: ours ${last.ours.toFixed(3)}, nbdkit ${last.theirs.toFixed(3)}`);
}

function serveBoth(args: string[]) {
  return Promise.all([
    startNbdServe(args),
    startServer("nbdkit", ["-f", "-U", "$SOCKET", ...args]),
  ]);
}

const qemuBench = (uri: string, write: boolean) =>
  timed("qemu-img", [
    "bench",
    ...(write ? ["-w"] : []),
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
  ]);

/** Requests in flight on each of fio's connections in the mixed rows. */
const FIO_DEPTH = 32;

/** fio's nbd engine, 70/30 random 4 KiB reads and writes, 4 connections: total IOPS. */
async function fioMixed(uri: string): Promise<number> {
  const out = await Deno.makeTempFile({ prefix: "nbd-bench-fio", suffix: ".json" });
  try {
    await runOk("fio", [
      "--name=mixed",
      "--ioengine=nbd",
      `--uri=${uri}`,
      "--rw=randrw",
      "--rwmixread=70",
      "--bs=4k",
      `--iodepth=${FIO_DEPTH}`,
      "--numjobs=4",
      `--size=${size}`,
      "--time_based",
      `--runtime=${values["fio-seconds"]}`,
      "--group_reporting",
      "--output-format=json",
      `--output=${out}`,
    ]);
    const report = JSON.parse(await Deno.readTextFile(out));
    const job = report.jobs[0];
    return job.read.iops + job.write.iops;
  } finally {
    await Deno.remove(out);
  }
}

const dir = values.dir ?? await Deno.makeTempDir({ prefix: "nbd-bench-file" });
try {
  const image = `${dir}/image.raw`;
  await runOk("nbdcopy", ["--", "[", "nbdkit", "pattern", String(size), "]", image]);

  if (selected("read")) {
    // Read-only servers over a file in the page cache (just written, and read once first).
    const [ours, nbdkit] = await serveBoth(["-r", "file", image]);
    await using _ours = ours;
    await using _nbdkit = nbdkit;
    await runOk("nbdcopy", [ours.uri, "null:"]);
    await compare(
      `nbdcopy ${values.size} → null: (file in the page cache)`,
      [ours.uri, nbdkit.uri],
      (uri) => timed("nbdcopy", [uri, "null:"]),
    );
  }

  if (selected("write")) {
    const target = `${dir}/target.raw`;
    await runOk("fallocate", ["-l", String(size), target]);
    const [ours, nbdkit] = await serveBoth(["file", target]);
    await using _ours = ours;
    await using _nbdkit = nbdkit;
    const sync = async () => {
      await runOk("sync", []);
    };
    await compare(
      `nbdcopy file ${values.size} → preallocated file`,
      [ours.uri, nbdkit.uri],
      (uri) => timed("nbdcopy", [image, uri]),
      { before: sync },
    );
    // A new sparse file before each run: both servers open the file per connection.
    await compare(
      `nbdcopy file ${values.size} → new sparse file`,
      [ours.uri, nbdkit.uri],
      (uri) => timed("nbdcopy", [image, uri]),
      {
        async before() {
          await Deno.remove(target);
          await Deno.writeFile(target, new Uint8Array());
          await Deno.truncate(target, size);
          await sync();
        },
      },
    );
    await Deno.remove(target);
  }

  if (selected("random")) {
    const [ours, nbdkit] = await serveBoth(["file", image]);
    await using _ours = ours;
    await using _nbdkit = nbdkit;
    await compare(
      `qemu-img bench 4 KiB random reads, depth 64, ${values["bench-count"]} ops`,
      [ours.uri, nbdkit.uri],
      (uri) => qemuBench(uri, false),
    );
    await compare(
      `qemu-img bench -w 4 KiB random writes, depth 64, ${values["bench-count"]} ops`,
      [ours.uri, nbdkit.uri],
      (uri) => qemuBench(uri, true),
    );
  }

  if (selected("device")) {
    const attached = await run("losetup", ["-f", "--show", image]);
    if (attached.code !== 0) {
      notes.push(`loop device row skipped: losetup failed: ${attached.stderr.trim()}`);
    } else {
      const device = attached.stdout.trim();
      try {
        const [ours, nbdkit] = await serveBoth(["file", device]);
        await using _ours = ours;
        await using _nbdkit = nbdkit;
        await compare(
          `loop device: qemu-img bench 4 KiB random reads, depth 64`,
          [ours.uri, nbdkit.uri],
          (uri) => qemuBench(uri, false),
        );
      } finally {
        await runOk("losetup", ["-d", device]);
      }
    }
  }

  if (selected("mixed")) {
    if (!hasCommand("fio")) {
      notes.push("mixed row skipped: fio is needed (apt-get install fio)");
    } else {
      {
        const [ours, nbdkit] = await serveBoth(["file", image]);
        await using _ours = ours;
        await using _nbdkit = nbdkit;
        await compare(
          `fio 70/30 random 4 KiB reads/writes, 4 connections × depth ${FIO_DEPTH}`,
          [ours.uri, nbdkit.uri],
          fioMixed,
          { unit: "IOPS", lowerIsBetter: false },
        );
      }
      // The same load against the memory plugins, filled with the same data first.
      const [ours, nbdkit] = await serveBoth(["memory", String(size)]);
      await using _ours = ours;
      await using _nbdkit = nbdkit;
      for (const uri of [ours.uri, nbdkit.uri]) await runOk("nbdcopy", [image, uri]);
      await compare(
        `memory plugin: fio 70/30 random 4 KiB, 4 connections × depth ${FIO_DEPTH}`,
        [ours.uri, nbdkit.uri],
        fioMixed,
        { unit: "IOPS", lowerIsBetter: false },
      );
    }
  }
} finally {
  if (values.dir === undefined) await Deno.remove(dir, { recursive: true });
}

console.log(
  `\nfile plugin benchmark: ${rounds} rounds, medians; ratio > 1.0: nbd serve is faster\n`,
);
console.log(`| benchmark | nbd serve | nbdkit | ratio ours/nbdkit |`);
console.log(`|---|---|---|---|`);
for (const row of rows) {
  const ratio = row.lowerIsBetter ? row.theirs / row.ours : row.ours / row.theirs;
  const digits = row.unit === "IOPS" ? 0 : 3;
  console.log(
    `| ${row.name} | ${row.ours.toFixed(digits)} ${row.unit} | ${
      row.theirs.toFixed(digits)
    } ${row.unit} | ${ratio.toFixed(2)}x |`,
  );
}
for (const note of notes) console.log(`\n${note}`);
