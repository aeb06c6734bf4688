/**
 * Several threads: `nbd serve` on one thread and with `--workers N`, and
 * `nbdkit file`, each limited by `taskset` to the same processors, serve one
 * file while several clients (`nbdcopy -C 1` each, one process per client)
 * read it all at once. The servers alternate round by round; each row shows
 * the median throughput and the server's processor time per GiB served
 * (user + system of the process, all its threads), and the ratio against
 * nbdkit's throughput (above 1.0: faster).
 *
 *   deno task bench:workers                           # 8 clients, --workers 2, processors 0,1
 *   deno task bench:workers --clients 8 --workers 2 --cpus 0 --rounds 3 --size 256M
 *   deno task bench:workers --write --plugin memory --clients 1 --connections 4 --size 1G
 *
 * With `--write` the clients copy the file into the export instead (a
 * writable `file` export over a preallocated copy per server, or `memory`
 * with `--plugin memory`); `--connections` is each nbdcopy's `-C`.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { hasCommand, ROOT, runOk, type ServerProcess, startServer } from "../tests/helpers.ts";
import { parseSize } from "../util/parse.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "3" },
    size: { type: "string", default: "256M" },
    clients: { type: "string", default: "8" },
    workers: { type: "string", default: "2" },
    cpus: { type: "string", default: "0,1" },
    write: { type: "boolean", default: false },
    plugin: { type: "string", default: "file" },
    connections: { type: "string", default: "1" },
    dir: { type: "string" },
  },
});
const rounds = Number(values.rounds);
const size = parseSize(values.size!);
const clients = Number(values.clients);
const workers = Number(values.workers);
const connections = Number(values.connections);
const write = values.write!;
const plugin = values.plugin!;
if (plugin !== "file" && plugin !== "memory" || plugin === "memory" && !write) {
  console.error("bench: --plugin: file, or memory with --write");
  Deno.exit(2);
}
for (
  const [name, n] of [
    ["--rounds", rounds],
    ["--clients", clients],
    ["--workers", workers],
    ["--connections", connections],
  ]
) {
  if (!Number.isInteger(n) || (n as number) < 1) {
    console.error(`bench: ${name}: expected a positive integer`);
    Deno.exit(2);
  }
}
for (const tool of ["nbdkit", "nbdcopy", "taskset"]) {
  if (!hasCommand(tool)) {
    console.error(`bench: ${tool} is needed (apt-get install nbdkit libnbd-bin util-linux)`);
    Deno.exit(1);
  }
}

/** Processor time (user + system) of process `pid` so far, in seconds. */
function cpuSeconds(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

const dir = values.dir ?? await Deno.makeTempDir({ prefix: "nbd-bench-workers" });
const image = `${dir}/image`;
await runOk("nbdcopy", ["--", "[", "nbdkit", "pattern", String(size), "]", image]);

const taskset = ["-c", values.cpus!];
const readonly = write ? [] : ["-r"];
const ours = ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve", ...readonly, "-U", "$SOCKET"];
/** What server `i` serves: the image itself, a preallocated copy of its own, or memory. */
async function exportArgs(i: number): Promise<string[]> {
  if (plugin === "memory") return ["memory", String(size)];
  if (!write) return ["file", image];
  const target = `${dir}/target${i}`;
  await Deno.copyFile(image, target);
  return ["file", target];
}
const servers: Array<{ name: string; server: ServerProcess }> = [
  {
    name: "nbd serve",
    server: await startServer("taskset", [
      ...taskset,
      Deno.execPath(),
      ...ours,
      ...await exportArgs(0),
    ]),
  },
  {
    name: `nbd serve --workers ${workers}`,
    server: await startServer("taskset", [
      ...taskset,
      Deno.execPath(),
      ...ours,
      "--workers",
      String(workers),
      ...await exportArgs(1),
    ]),
  },
  {
    name: `nbdkit ${plugin}`,
    server: await startServer("taskset", [
      ...taskset,
      "nbdkit",
      "-f",
      ...readonly,
      "-U",
      "$SOCKET",
      ...await exportArgs(2),
    ]),
  },
];
const client = (uri: string) =>
  write ? ["-C", String(connections), image, uri] : ["-C", String(connections), uri, "null:"];

const gib = (clients * size) / 2 ** 30;
const rates = servers.map(() => [] as number[]);
const cpu = servers.map(() => [] as number[]);
try {
  // One untimed copy each: the file in the page cache, the servers (and memory pages) warm.
  for (const { server } of servers) await runOk("nbdcopy", client(server.uri));
  for (let round = 0; round < rounds; round++) {
    for (const [i, { server }] of servers.entries()) {
      const before = cpuSeconds(server.child.pid);
      const start = performance.now();
      await Promise.all(
        Array.from({ length: clients }, () => runOk("nbdcopy", client(server.uri))),
      );
      const seconds = (performance.now() - start) / 1000;
      rates[i]!.push(gib / seconds);
      cpu[i]!.push((cpuSeconds(server.child.pid) - before) / gib);
    }
  }
} finally {
  for (const { server } of servers) await server[Symbol.asyncDispose]();
  if (values.dir === undefined) await Deno.remove(dir, { recursive: true });
}

const load = Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
console.log(
  `\n${clients} clients (nbdcopy -C ${connections}) ${
    write ? "writing" : "reading"
  } a ${values.size} ${plugin} export at once, servers on processors ${values.cpus}; ${rounds} rounds, medians; load average ${load}\n`,
);
console.log("| server | GiB/s | processor s per GiB | ratio to nbdkit |");
console.log("|---|---|---|---|");
const theirs = median(rates[2]!);
for (const [i, { name }] of servers.entries()) {
  const rate = median(rates[i]!);
  console.log(
    `| ${name} | ${rate.toFixed(2)} | ${median(cpu[i]!).toFixed(3)} | ${
      (rate / theirs).toFixed(2)
    }x |`,
  );
}
