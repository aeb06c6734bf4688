/**
 * HTTP import benchmark: `nbd copy` of an image behind a 302 redirect,
 * against `curl -L -o` of the same URL (one stream) and against nbdcopy
 * over `nbdkit curl`, whole processes, alternating, medians of wall time.
 *
 *   deno task bench:http                          # 3 rounds, 256 MiB
 *   deno task bench:http --rounds 5 --size 512M --window 1M --only "round trip"
 *
 * Two servers (tests/http_server.ts, each in its own process, the image in
 * memory) redirect `/redirect/disk.img` to a signed URL of the image:
 * - "low latency": answers at once;
 * - "round trip": waits `--rtt` ms (20) before each answer, and sends each body
 *   as one TCP stream would over that round trip with a `--window` (4 MiB)
 *   window: one window per round trip. A single stream then moves at most
 *   window / rtt, and requests in parallel add up, as over a long link.
 *
 * Per case: `nbd copy URL` (the http source) against `curl -L -o` (one
 * stream) and against nbdcopy over `nbdkit --filter=readahead curl URL`;
 * and nbdcopy over `nbd serve --filter=readahead http URL` (the http
 * plugin) against the same over nbdkit. Each output is compared with the
 * image once per case, in the untimed first round.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { hasCommand, nbdExecutable, runOk } from "../tests/helpers.ts";
import { parseSize } from "../util/parse.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "3" },
    size: { type: "string", default: "256M" },
    rtt: { type: "string", default: "20" },
    window: { type: "string", default: "4M" },
    only: { type: "string" },
  },
});
const rounds = Number(values.rounds);
const size = parseSize(values.size!);
const rtt = Number(values.rtt);
const window = parseSize(values.window!);

for (const tool of ["nbdkit", "nbdcopy", "curl"]) {
  if (!hasCommand(tool)) {
    console.error(`bench/http: ${tool} is needed (apt-get install nbdkit libnbd-bin curl)`);
    Deno.exit(1);
  }
}

function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

/** Runs a command to completion; returns its wall time in seconds. */
async function timed(argv: string[]): Promise<number> {
  const start = performance.now();
  const output = await new Deno.Command(argv[0]!, {
    args: argv.slice(1),
    stdout: "null",
    stderr: "piped",
  }).output();
  const seconds = (performance.now() - start) / 1000;
  if (!output.success) {
    throw new Error(`${argv.join(" ")} failed:\n${new TextDecoder().decode(output.stderr)}`);
  }
  return seconds;
}

/** Starts tests/http_server.ts on `image` in its own process; resolves once it listens. */
async function startImageServer(image: string, flags: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", new URL("../tests/http_server.ts", import.meta.url).pathname]
      .concat(image, flags),
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let seen = "";
  let port: number | undefined;
  while (port === undefined) {
    const { value, done } = await lines.read();
    if (done) throw new Error(`the image server did not start: ${seen}`);
    seen += value;
    port = Number(/port (\d+)/.exec(seen)?.[1]) || undefined;
  }
  lines.releaseLock();
  void child.stdout.cancel().catch(() => {});
  return {
    url: `http://127.0.0.1:${port}/redirect/disk.img`,
    async [Symbol.asyncDispose]() {
      child.kill("SIGTERM");
      await child.status;
    },
  };
}

/** Median times of one case, in seconds. */
interface Row {
  name: string;
  ours: number;
  curl: number;
  nbdkit: number;
  server: number;
}

const cell = (seconds: number) =>
  `${seconds.toFixed(2)} s (${(size / seconds / 1e6).toFixed(0)} MB/s)`;
const ratio = (theirs: number, ours: number) => `${(theirs / ours).toFixed(2)}x`;
console.log(
  `\nhttp import benchmark: ${values.size} behind a 302 redirect, ${rounds} rounds, alternating, ` +
    `medians of whole-process wall time; ratios are the other's time / ours (> 1.0: we are faster)\n`,
);
console.log(
  "| case | nbd copy URL | curl -L -o | ratio | nbdcopy over nbdkit curl | ratio " +
    "| nbdcopy over nbd serve http | ratio vs nbdkit curl |",
);
console.log("|---|---|---|---|---|---|---|---|");

/** Prints one case's row. */
function print(row: Row): void {
  console.log(
    `| ${row.name} | ${cell(row.ours)} | ${cell(row.curl)} | ${ratio(row.curl, row.ours)} | ` +
      `${cell(row.nbdkit)} | ${ratio(row.nbdkit, row.ours)} | ${cell(row.server)} | ` +
      `${ratio(row.nbdkit, row.server)} |`,
  );
}

const nbd = await nbdExecutable();
const dir = await Deno.makeTempDir({ prefix: "nbd-bench-http" });
try {
  const image = `${dir}/image.img`;
  await runOk("sh", ["-c", `head -c ${size} /dev/urandom > "$0"`, image]);
  const output = `${dir}/output.img`;
  const cases = [
    { name: "low latency", flags: [] },
    {
      name: `${rtt} ms round trip, ${values.window} window`,
      flags: [`--rtt=${rtt}`, `--window=${window}`],
    },
  ];
  for (const { name, flags } of cases) {
    if (values.only && !name.includes(values.only)) continue;
    await using server = await startImageServer(image, flags);
    const contenders = {
      ours: [nbd, "copy", server.url, output],
      curl: ["curl", "-sS", "-f", "-L", "-o", output, server.url],
      nbdkit: [
        "nbdcopy",
        "--",
        "[",
        "nbdkit",
        "--filter=readahead",
        "curl",
        server.url,
        "]",
        output,
      ],
      server: [
        "nbdcopy",
        "--",
        "[",
        nbd,
        "serve",
        "--filter=readahead",
        "http",
        server.url,
        "]",
        output,
      ],
    };
    const keys = Object.keys(contenders) as Array<keyof typeof contenders>;
    const times = Object.fromEntries(keys.map((k) => [k, [] as number[]]));
    // One untimed run each (code caches, the server's first answers), checked byte for byte.
    for (const key of keys) {
      await Deno.remove(output).catch(() => {});
      await timed(contenders[key]);
      await runOk("cmp", [image, output]);
    }
    for (let round = 0; round < rounds; round++) {
      for (const key of keys) {
        await Deno.remove(output).catch(() => {});
        times[key]!.push(await timed(contenders[key]));
      }
    }
    print({
      name,
      ours: median(times.ours!),
      curl: median(times.curl!),
      nbdkit: median(times.nbdkit!),
      server: median(times.server!),
    });
  }
} finally {
  await Deno.remove(dir, { recursive: true }).catch(() => {});
}
