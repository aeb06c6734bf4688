/**
 * Checksum benchmark: `nbd checksum` of a sparse image (default 4 GiB with
 * 10% data in 4 MiB islands) against `sha256sum` of the same file, in the
 * same run, alternating; then blkhash with one and two workers, and with
 * and without the file's holes (`--no-extents` reads and hashes every
 * byte). Prints medians of elapsed and CPU (user + system) seconds and the
 * ratios of rates (1.0 = as fast; above 1.0 the first is faster).
 *
 *   deno run -A bench/checksum.ts [--rounds 5] [--size 4G] [--data 10]
 *
 * @module
 */

import { parseArgs } from "node:util";
import { parseSize } from "../util/parse.ts";
import { hasCommand, nbdExecutable, randomBytes, tempDir } from "../tests/helpers.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "5" },
    size: { type: "string", default: "4G" },
    data: { type: "string", default: "10" },
  },
});
const rounds = Number(values.rounds);
const total = parseSize(values.size!);
const dataPercent = Number(values.data);

for (const tool of ["sha256sum", "/usr/bin/time"]) {
  if (!hasCommand(tool)) {
    console.error(`checksum: ${tool} is needed (apt-get install coreutils time)`);
    Deno.exit(1);
  }
}

function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

const ISLAND = 4 << 20;

/** A sparse file of `total` bytes, `dataPercent`% of it random data in 4 MiB islands. */
async function makeImage(path: string): Promise<void> {
  const islands = Math.max(1, Math.round(total * dataPercent / 100 / ISLAND));
  const stride = Math.floor(total / islands / ISLAND) * ISLAND;
  const chunk = randomBytes(ISLAND, 5);
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  await file.truncate(total);
  for (let i = 0; i < islands; i++) {
    chunk[0] = i & 0xff;
    await file.seek(i * stride + stride / 2, Deno.SeekMode.Start);
    await file.write(chunk);
  }
  file.close();
}

/** Runs a command under /usr/bin/time: [elapsed, user + system] seconds, and its stdout. */
async function timed(cmd: string, args: string[]): Promise<[number, number, string]> {
  const output = await new Deno.Command("/usr/bin/time", {
    args: ["-f", "%e %U %S", cmd, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(output.stderr).trim().split("\n");
  if (output.code !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${stderr.join("\n")}`);
  const [elapsed, user, system] = stderr[stderr.length - 1]!.split(" ").map(Number);
  return [elapsed!, user! + system!, new TextDecoder().decode(output.stdout)];
}

/** Alternates the commands for `rounds` rounds; checks their digests agree per group. */
async function compare(
  title: string,
  commands: Array<{ name: string; cmd: string; args: string[]; digest?: string }>,
): Promise<void> {
  const elapsed = commands.map((): number[] => []);
  const cpu = commands.map((): number[] => []);
  for (let r = 0; r < rounds; r++) {
    for (const [i, { cmd, args, digest }] of commands.entries()) {
      const [e, c, out] = await timed(cmd, args);
      if (digest && !out.startsWith(digest)) throw new Error(`${cmd}: digest ${out} != ${digest}`);
      elapsed[i]!.push(e);
      cpu[i]!.push(c);
    }
  }
  console.log(title);
  const base = median(elapsed[0]!);
  const baseCpu = median(cpu[0]!);
  for (const [i, { name }] of commands.entries()) {
    const e = median(elapsed[i]!);
    const c = median(cpu[i]!);
    console.log(
      `  ${name.padEnd(42)} ${e.toFixed(2).padStart(6)} s  ${
        (total / e / 2 ** 20).toFixed(0)
      } MiB/s` +
        `  CPU ${c.toFixed(2)} s` +
        (i === 0 ? "" : `  ratio ${(base / e).toFixed(2)}, CPU ratio ${(baseCpu / c).toFixed(2)}`),
    );
  }
}

await using dir = await tempDir("nbd-bench");
const image = `${dir.path}/disk.img`;
await makeImage(image);
const nbd = await nbdExecutable();
const sha = (await timed("sha256sum", [image]))[2].split(" ")[0]!;
const blk = (await timed(nbd, ["checksum", "-a", "blkhash", image]))[2].split(" ")[0]!;
console.log(`${values.size} image, ${dataPercent}% data; ${rounds} rounds, medians`);
await compare("sha256 (ratios: sha256sum's time / ours)", [
  { name: "sha256sum FILE", cmd: "sha256sum", args: [image], digest: sha },
  { name: "nbd checksum FILE", cmd: nbd, args: ["checksum", image], digest: sha },
]);
await compare("blkhash (ratios: the first line's time / this line's)", [
  {
    name: "nbd checksum -a blkhash --no-extents",
    cmd: nbd,
    args: ["checksum", "-a", "blkhash", "-T", "1", "--no-extents", image],
    digest: blk,
  },
  {
    name: "nbd checksum -a blkhash -T 1",
    cmd: nbd,
    args: ["checksum", "-a", "blkhash", "-T", "1", image],
    digest: blk,
  },
  {
    name: "nbd checksum -a blkhash -T 2",
    cmd: nbd,
    args: ["checksum", "-a", "blkhash", "-T", "2", image],
    digest: blk,
  },
  {
    name: "nbd checksum -a blkhash -T 2 --no-extents",
    cmd: nbd,
    args: ["checksum", "-a", "blkhash", "-T", "2", "--no-extents", image],
    digest: blk,
  },
]);
