/**
 * What the live view costs the data path: the same clients against
 * `nbd serve memory SIZE` without `--view`, and with `--view` and the page
 * open in headless Chromium (painting every request), alternating in the
 * same run. Prints each median and the ratio with/without (1.0 = free; the
 * goal is at least 0.9).
 *
 *   deno task bench:view                 # 5 rounds, 1G
 *   deno task bench:view --rounds 3 --size 256M
 *   deno task bench:view --sources 3     # the page of nbd view over three servers
 *
 * With `--sources N` (N > 1) the viewed server also has `--view-control`
 * (the fault layer, switched off), and the page is `nbd view`'s combined
 * page over it and N - 1 other servers, relayed through `nbd view`.
 *
 * Without Chromium (or with --no-browser) a plain event-stream reader
 * stands in for the page, which costs the server the same work.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { hasCommand, runOk, type ServerProcess, startNbdServe } from "../tests/helpers.ts";
import { CHROMIUM, launchChromium } from "../tests/browser.ts";
import { serverViewUrl, startNbdView } from "../tests/view_helpers.ts";
import { parseSize } from "../util/parse.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "5" },
    size: { type: "string", default: "1G" },
    "bench-count": { type: "string", default: "200000" },
    "no-browser": { type: "boolean", default: false },
    sources: { type: "string", default: "1" },
  },
});
const rounds = Number(values.rounds);
const size = parseSize(values.size!);
const sources = Number(values.sources);

for (const tool of ["nbdcopy", "nbdkit"]) {
  if (!hasCommand(tool)) {
    console.error(`bench: ${tool} is needed (apt-get install libnbd-bin nbdkit)`);
    Deno.exit(1);
  }
}
const useBrowser = !values["no-browser"] && hasCommand(CHROMIUM);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

/** CPU seconds (user + system) a process has used so far. */
function cpuSeconds(pid: number): number {
  const fields = Deno.readTextFileSync(`/proc/${pid}/stat`).replace(/^.*\) /, "").split(" ");
  // utime and stime are fields 14 and 15 of the whole line, in clock ticks (100 a second).
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** Runs a client; returns its wall time and the CPU time the server spent meanwhile. */
async function timed(cmd: string, args: string[], serverPid: number): Promise<[number, number]> {
  const cpu = cpuSeconds(serverPid);
  const start = performance.now();
  await runOk(cmd, args);
  return [(performance.now() - start) / 1000, cpuSeconds(serverPid) - cpu];
}

await using plain = await startNbdServe(["memory", String(size)]);
await using viewed = await startNbdServe([
  "--view",
  "127.0.0.1:0",
  ...(sources > 1 ? ["--view-control"] : []),
  "memory",
  String(size),
]);
const url = await serverViewUrl(viewed);
// The other sources of a combined page, and nbd view showing them all.
const others: ServerProcess[] = [];
for (let i = 1; i < sources; i++) {
  others.push(
    await startNbdServe(["--view", "127.0.0.1:0", "--view-control", "memory", "256M"]),
  );
}
await using _others = {
  async [Symbol.asyncDispose]() {
    for (const o of others) await o[Symbol.asyncDispose]();
  },
};
await using combined = sources > 1
  ? await startNbdView([url, ...await Promise.all(others.map(serverViewUrl))])
  : undefined;
const pageUrl = combined?.url ?? url;
const eventsPath = combined ? "/s/0/events?export=&cells=500000" : "/events?export=&cells=500000";

// The page (or a stand-in) stays open on the viewed server for the whole run.
await using browser = useBrowser ? await launchChromium() : undefined;
const abort = new AbortController();
let framesSeen = 0;
if (browser) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(pageUrl);
  await page.waitForSelector("#status.live", { timeout: 15000 });
} else {
  const response = await fetch(new URL(eventsPath, pageUrl), {
    signal: abort.signal,
  });
  (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of response.body!) {
      framesSeen += decoder.decode(chunk).split("event: frame").length - 1;
    }
  })().catch(() => {});
}

// Same contents in both: a filled (non-sparse) disk, so reads move real data.
for (const server of [plain, viewed]) {
  await runOk("nbdcopy", ["--", "[", "nbdkit", "pattern", String(size), "]", server.uri]);
}

interface Row {
  name: string;
  without: number;
  with: number;
  cpuWithout: number;
  cpuWith: number;
}
const rows: Row[] = [];

async function compare(name: string, command: (uri: string) => [string, string[]]) {
  const a: number[] = [];
  const b: number[] = [];
  const cpuA: number[] = [];
  const cpuB: number[] = [];
  for (let i = 0; i < rounds; i++) {
    // Alternate which goes first, so neither always runs on a warmer machine.
    const order = i % 2 === 0 ? [plain, viewed] : [viewed, plain];
    for (const server of order) {
      const [cmd, args] = command(server.uri);
      const [wall, cpu] = await timed(cmd, args, server.child.pid);
      (server === plain ? a : b).push(wall);
      (server === plain ? cpuA : cpuB).push(cpu);
    }
  }
  rows.push({
    name,
    without: median(a),
    with: median(b),
    cpuWithout: median(cpuA),
    cpuWith: median(cpuB),
  });
}

await compare(`nbdcopy ${values.size} → null: (reads)`, (uri) => ["nbdcopy", [uri, "null:"]]);
await compare(`nbdcopy pattern ${values.size} → server (writes)`, (uri) => [
  "nbdcopy",
  ["--", "[", "nbdkit", "pattern", String(size), "]", uri],
]);
if (hasCommand("qemu-img")) {
  await compare(`qemu-img bench 4 KiB reads, depth 64, ${values["bench-count"]} ops`, (uri) => [
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
  ]);
}
abort.abort();

const statsUrl = new URL("/stats", url);
const stats = await (await fetch(statsUrl)).json();
console.log(
  `\nview benchmark: ${rounds} rounds, medians; the page ${
    useBrowser ? "open in headless Chromium" : "replaced by an event-stream reader"
  } on the --view server${
    sources > 1 ? ` (nbd view's combined page over it and ${sources - 1} more, --view-control)` : ""
  }\n`,
);
console.log(
  `| benchmark | without --view | with --view + page | throughput ratio | server CPU without / with |`,
);
console.log(`|---|---|---|---|---|`);
let worst = Infinity;
for (const row of rows) {
  const ratio = row.without / row.with;
  worst = Math.min(worst, ratio);
  console.log(
    `| ${row.name} | ${row.without.toFixed(3)} s | ${row.with.toFixed(3)} s | ${
      ratio.toFixed(2)
    }x | ${row.cpuWithout.toFixed(2)} s / ${row.cpuWith.toFixed(2)} s |`,
  );
}
console.log(
  `\nworst ratio ${worst.toFixed(2)}x (goal >= 0.90); the viewed server counted ${
    stats.exports[0].requests.completed
  } requests${useBrowser ? "" : `, the reader got ${framesSeen} frames`}`,
);
