/**
 * Mount benchmark: sequential read and write through the file of
 * `nbd mount`, beside nbdfuse mounting the same export (an nbdkit memory
 * disk, filled with random data) in the same run. Each round times dd on
 * our file and on nbdfuse's, alternating; the table shows the medians and
 * the ratio (above 1.0 means we are faster). Needs root, nbdkit, nbdfuse
 * and nbdcopy.
 *
 *   deno task bench:mount [--rounds 5] [--size 1G] [--block 1M]
 *
 * @module
 */

import { parseArgs } from "node:util";
import { parseSize } from "../util/parse.ts";
import { hasCommand, nbdExecutable, runOk, startServer } from "../tests/helpers.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "5" },
    size: { type: "string", default: "1G" },
    block: { type: "string", default: "1M" },
  },
});
const rounds = Number(values.rounds);
const size = parseSize(values.size!);
const block = parseSize(values.block!);

for (const tool of ["nbdkit", "nbdfuse", "nbdcopy", "dd"]) {
  if (!hasCommand(tool)) {
    console.error(`bench/mount: ${tool} is needed (apt-get install nbdkit libnbd-bin)`);
    Deno.exit(1);
  }
}
if (Deno.uid() !== 0) {
  console.error("bench/mount: mounting FUSE needs root");
  Deno.exit(1);
}

function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

async function timed(args: string[]): Promise<number> {
  const start = performance.now();
  await runOk("dd", args);
  return (performance.now() - start) / 1000;
}

/** Waits until `path` is a regular file of the export's size (the mount is up). */
async function waitForFile(path: string, child: Deno.ChildProcess): Promise<void> {
  let exited = false;
  child.status.then(() => exited = true);
  for (let i = 0; i < 300 && !exited; i++) {
    try {
      const info = await Deno.stat(path);
      if (info.isFile && info.size === size) return;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${path} never appeared`);
}

async function stop(child: Deno.ChildProcess, mountpoint: string): Promise<void> {
  await new Deno.Command("umount", { args: [mountpoint], stderr: "null" }).output();
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch { /* gone */ }
  }, 10000);
  await child.status;
  clearTimeout(timer);
}

const work = await Deno.makeTempDir({ prefix: "nbd-bench-mount" });
const oursDir = `${work}/ours`;
const theirsDir = `${work}/nbdfuse`;
await Deno.mkdir(oursDir);
await Deno.mkdir(theirsDir);
// The write source lives in RAM so the disk under /tmp does not limit it.
const source = `/dev/shm/nbd-bench-mount-${Deno.pid}`;
let ours: Deno.ChildProcess | undefined;
let theirs: Deno.ChildProcess | undefined;
try {
  await runOk("dd", [
    "if=/dev/urandom",
    `of=${source}`,
    `bs=${1 << 20}`,
    `count=${Math.ceil(size / (1 << 20))}`,
    "status=none",
  ]);
  await using server = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "memory", String(size)]);
  await runOk("nbdcopy", [source, server.uri]);
  try {
    const nbd = await nbdExecutable();
    ours = new Deno.Command(nbd, {
      args: ["mount", server.uri, oursDir],
      stdout: "null",
      stderr: "inherit",
    }).spawn();
    theirs = new Deno.Command("nbdfuse", {
      args: [theirsDir, server.uri],
      stdout: "null",
      stderr: "inherit",
    }).spawn();
    const oursFile = `${oursDir}/disk`;
    const theirsFile = `${theirsDir}/nbd`;
    await waitForFile(oursFile, ours);
    await waitForFile(theirsFile, theirs);

    const count = Math.floor(size / block);
    const cases = [
      {
        name: `sequential read, dd bs=${values.block}, ${values.size}`,
        args: (file: string) => [`if=${file}`, "of=/dev/null", `bs=${block}`, "status=none"],
      },
      {
        name: `sequential write, dd bs=${values.block} conv=fsync, ${values.size}`,
        args: (file: string) => [
          `if=${source}`,
          `of=${file}`,
          `bs=${block}`,
          `count=${count}`,
          "conv=notrunc,fsync",
          "status=none",
        ],
      },
    ];
    const rows: string[] = [];
    for (const c of cases) {
      const a: number[] = [];
      const b: number[] = [];
      for (let i = 0; i < rounds; i++) {
        // Alternate who goes first, so neither always meets a warmer machine.
        if (i % 2 === 0) {
          a.push(await timed(c.args(oursFile)));
          b.push(await timed(c.args(theirsFile)));
        } else {
          b.push(await timed(c.args(theirsFile)));
          a.push(await timed(c.args(oursFile)));
        }
      }
      const mine = median(a);
      const peer = median(b);
      const mib = size / (1 << 20);
      rows.push(
        `| ${c.name} | ${mine.toFixed(3)} s (${(mib / mine).toFixed(0)} MiB/s) | ${
          peer.toFixed(3)
        } s (${(mib / peer).toFixed(0)} MiB/s) | ${(peer / mine).toFixed(2)}x |`,
      );
    }
    console.log(
      `\nmount benchmark: nbdkit memory ${values.size} over a Unix socket, ${rounds} rounds, medians;` +
        ` ratio = nbdfuse time / our time (> 1.0: we are faster)\n`,
    );
    console.log("| benchmark | nbd mount | nbdfuse | ratio |");
    console.log("|---|---|---|---|");
    for (const row of rows) console.log(row);
  } finally {
    // Before the server goes away, so the final flushes reach it.
    if (ours) await stop(ours, oursDir);
    if (theirs) await stop(theirs, theirsDir);
  }
} finally {
  await Deno.remove(source).catch(() => {});
  await Deno.remove(work, { recursive: true }).catch(() => {});
}
