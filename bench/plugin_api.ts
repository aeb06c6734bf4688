/**
 * Plugin API benchmark: `nbdcopy URI null:` reading a 1 GiB disk filled
 * with data from (a) the built-in memory plugin, (b) examples/ram_disk.ts,
 * the same disk written with the plugin API and loaded as a module, and
 * (c) the built-in memory plugin with --debug-layers (the checking layer's
 * cost). Same run, rounds alternating, medians; prints the ratios.
 *
 *   deno run -A bench/plugin_api.ts [--rounds 5] [--size 1G]
 *
 * @module
 */

import { parseArgs } from "node:util";
import { parseSize } from "../util/parse.ts";
import { hasCommand, ROOT, runOk, startNbdServe } from "../tests/helpers.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "5" },
    size: { type: "string", default: "1G" },
  },
});
const rounds = Number(values.rounds);
const size = parseSize(values.size!);
if (!hasCommand("nbdcopy")) {
  console.error("bench/plugin_api.ts: nbdcopy is not installed");
  Deno.exit(1);
}

const kinds = {
  "memory (built-in)": ["memory", String(size)],
  "ram_disk.ts (API)": [`${ROOT}/examples/ram_disk.ts`, String(size)],
  "memory --debug-layers": ["--debug-layers", "memory", String(size)],
  "ram_disk.ts --debug-layers": ["--debug-layers", `${ROOT}/examples/ram_disk.ts`, String(size)],
};
await using source = await startNbdServe(["-r", "pattern", String(size)]);
const servers = await Promise.all(
  Object.entries(kinds).map(async ([name, args]) => ({ name, server: await startNbdServe(args) })),
);
try {
  // Fill every disk with the same data, so reads move bytes, not holes.
  for (const { server } of servers) await runOk("nbdcopy", [source.uri, server.uri]);
  const times = new Map<string, number[]>(servers.map((s) => [s.name, []]));
  for (let round = 0; round < rounds; round++) {
    for (const { name, server } of servers) {
      const start = performance.now();
      await runOk("nbdcopy", [server.uri, "null:"]);
      times.get(name)!.push((performance.now() - start) / 1000);
    }
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const mib = size / (1024 * 1024);
  const rates = new Map([...times].map(([name, t]) => [name, mib / median(t)]));
  for (const [name, rate] of rates) {
    console.log(
      `${name.padEnd(28)} ${rate.toFixed(0).padStart(6)} MiB/s  (${
        times.get(name)!.map((t) => t.toFixed(2)).join(" ")
      } s)`,
    );
  }
  const r = (a: string, b: string) => (rates.get(a)! / rates.get(b)!).toFixed(2);
  console.log(
    `API plugin / built-in:              ${r("ram_disk.ts (API)", "memory (built-in)")}x`,
  );
  console.log(
    `built-in with / without checking:   ${r("memory --debug-layers", "memory (built-in)")}x`,
  );
  console.log(
    `API plugin with / without checking: ${r("ram_disk.ts --debug-layers", "ram_disk.ts (API)")}x`,
  );
} finally {
  for (const { server } of servers) await server[Symbol.asyncDispose]();
}
