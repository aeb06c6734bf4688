/**
 * Generated-disk benchmark: reading a whole `iso` and a whole
 * `partitioning` export to `null:` with nbdcopy, against a plain `file`
 * export of the same bytes (the generated image copied out first), in the
 * same run, alternating. Prints the medians and the ratio of rates
 * (generated / file; 1.0 = as fast), and the same for the CPU time the
 * server spent per copy, which a busy machine disturbs less than the
 * elapsed time.
 *
 * The source files and the copied images go through the page cache the
 * same way (dropped for these files, then read once), because how a file
 * was written changes how fast the page cache gives it back.
 *
 *   deno run -A bench/generated.ts [--rounds 7] [--size 1G]
 *
 * @module
 */

import { parseArgs } from "node:util";
import { parseSize } from "../util/parse.ts";
import { hasCommand, randomBytes, runOk, startNbdServe, tempDir } from "../tests/helpers.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "7" },
    size: { type: "string", default: "1G" },
  },
});
const rounds = Number(values.rounds);
const total = parseSize(values.size!);

for (const tool of ["nbdcopy", "dd"]) {
  if (!hasCommand(tool)) {
    console.error(`generated: ${tool} is needed (apt-get install libnbd-bin coreutils)`);
    Deno.exit(1);
  }
}

function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

/** Four files of random data making up `total` bytes, written in 4 MiB pieces. */
async function makeFiles(dir: string): Promise<string[]> {
  const chunk = randomBytes(4 << 20, 11);
  const paths: string[] = [];
  for (let i = 0; i < 4; i++) {
    const path = `${dir}/part${i}.bin`;
    const file = await Deno.open(path, { write: true, create: true, truncate: true });
    for (let done = 0; done < total / 4; done += chunk.length) {
      chunk[0] = done & 0xff;
      await file.write(chunk.subarray(0, Math.min(chunk.length, total / 4 - done)));
    }
    file.close();
    paths.push(path);
  }
  return paths;
}

/** Drops the files from the page cache, then reads them once, the same way for all. */
async function recache(paths: string[]): Promise<void> {
  for (const path of paths) {
    await runOk("dd", [`if=${path}`, "iflag=nocache", "count=0", "status=none"]);
  }
  for (const path of paths) {
    await runOk("dd", [`if=${path}`, "of=/dev/null", "bs=4M", "status=none"]);
  }
}

/** User plus system CPU seconds of process `pid` so far. */
function cpuSeconds(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks
}

/** One copy to null: elapsed seconds, and the server's CPU seconds. */
async function timeCopy(uri: string, pid: number): Promise<[number, number]> {
  const cpu = cpuSeconds(pid);
  const start = performance.now();
  await runOk("nbdcopy", [uri, "null:"]);
  return [(performance.now() - start) / 1000, cpuSeconds(pid) - cpu];
}

async function compare(name: string, args: string[], sources: string[], dir: string) {
  const image = `${dir}/${name}.img`;
  {
    await using server = await startNbdServe(["-r", ...args]);
    await runOk("nbdcopy", [server.uri, image]);
  }
  await recache([...sources, image]);
  await using generated = await startNbdServe(["-r", ...args]);
  await using plain = await startNbdServe(["-r", "file", image]);
  const a: number[] = [];
  const b: number[] = [];
  const aCpu: number[] = [];
  const bCpu: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const [t, c] = await timeCopy(generated.uri, generated.child.pid);
    a.push(t);
    aCpu.push(c);
    const [u, d] = await timeCopy(plain.uri, plain.child.pid);
    b.push(u);
    bCpu.push(d);
  }
  const size = (await Deno.stat(image)).size;
  const mib = (s: number) => (size / s / 2 ** 20).toFixed(0);
  console.log(
    `${name.padEnd(13)} ${mib(median(a))} MiB/s   file ${mib(median(b))} MiB/s   ` +
      `ratio ${(median(b) / median(a)).toFixed(2)}   server CPU ${median(aCpu).toFixed(2)} s` +
      ` vs ${median(bCpu).toFixed(2)} s, ratio ${(median(bCpu) / median(aCpu)).toFixed(2)}`,
  );
  await Deno.remove(image);
}

await using dir = await tempDir("nbd-bench");
const src = `${dir.path}/src`;
await Deno.mkdir(src);
const files = await makeFiles(src);
console.log(`nbdcopy to null:, ${rounds} rounds, medians; ${values.size} of data`);
await compare("iso", ["iso", src], files, dir.path);
await compare("partitioning", ["partitioning", ...files], files, dir.path);
