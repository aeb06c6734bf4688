/**
 * The qcow2 fuzzer: seed images made by qemu-img and qemu-io (versions 2
 * and 3, cluster sizes 512 B to 64 KiB, refcount widths 1 to 64 bits,
 * extended L2, zlib and zstd compression) are mutated (truncated headers,
 * L1/L2/refcount offsets past the end or on other metadata, absurd sizes,
 * reserved bits, compressed clusters that do not inflate, bit flips...)
 * and then:
 *
 * - opened and exercised in process (fast: most of the cases), in a
 *   worker watched for hangs;
 * - served through `nbd serve --filter=qcow2 file dir=...` and read,
 *   written and mapped by a client, with a good image on the same server
 *   checked byte for byte between batches;
 * - handed to `nbd info` and `nbd copy --source-format=qcow2`;
 * - chained to themselves, in a loop, outside their directory and deeper
 *   than the chain limit, with qcow2-follow-backing=true.
 *
 * Every case must end in a one-line error at open, an EIO on a request,
 * or success: never a crash, an unclean exit or a hang.
 *
 *   deno task fuzz --qcow2                        # 20,000 cases or 60 s
 *   deno task fuzz --qcow2 --cases 500000 --seconds 1800 --seed 7
 *
 * @module
 */

import { NbdClient } from "../client/client.ts";
import { NbdRequestError } from "../client/errors.ts";
import { CRASH_PATTERN } from "./fuzz.ts";
import { type CaseOutcome, caseRng, layoutOf, nextQcow2Case } from "./fuzz_qcow2_cases.ts";
import type { WorkerJob } from "./fuzz_qcow2_worker.ts";
import { hasCommand, ROOT, run, runOk, startNbdServe, tempDir } from "./helpers.ts";

/** A case that reports no result within this time counts as a hang. */
const HANG_MS = 30_000;
/** Case indexes handed to a worker at a time. */
const CHUNK = 100;

/** Options of a qcow2 fuzz run. */
export interface Qcow2FuzzOptions {
  /** In-process cases (default 20,000). */
  cases?: number;
  /** Time limit for the in-process cases (default 60 s). */
  seconds?: number;
  /** Random seed (default: time based). */
  seed?: number;
  /** Cases served through the filter (default 120). */
  served?: number;
  /** Cases given to `nbd info` and `nbd copy` (default 6). */
  cli?: number;
  /** Workers for the in-process cases (default 2). */
  workers?: number;
  /** Progress lines. */
  log?: (line: string) => void;
}

/** Figures of the served cases. */
export interface ServedReport {
  /** Mutated images served. */
  cases: number;
  /** Refused at open (GO failed), with a one-line message. */
  openErrors: number;
  /** Requests answered. */
  requests: number;
  /** Requests that failed with EIO. */
  ioErrors: number;
  /** Reads of the good image between batches, all byte-exact. */
  probes: number;
  /** Problems: wrong error kinds, multi-line messages, hangs, probe mismatches. */
  problems: string[];
  /** The server was still running at the end. */
  survived: boolean;
  /** Its exit status after SIGTERM. */
  exitCode: number | undefined;
  /** Server log lines that show an internal error. */
  internalErrors: string[];
}

/** The outcome of a qcow2 fuzz run. */
export interface Qcow2FuzzReport {
  /** The seed used. */
  seed: number;
  /** Seed images. */
  seeds: string[];
  /** In-process cases run. */
  cases: number;
  /** Seconds taken by the in-process cases. */
  seconds: number;
  /** Cases per main mutation class. */
  classes: Map<string, number>;
  /** Cases per outcome ("open error", "served", "served with EIO"). */
  outcomes: Map<string, number>;
  /** The most frequent open errors (numbers masked). */
  openErrors: Array<[string, number]>;
  /** Cases that threw something other than a format or I/O error. */
  crashes: string[];
  /** Cases that did not finish within the hang limit. */
  hangs: string[];
  /** The served cases. */
  served: ServedReport;
  /** Command-line cases (`nbd info`, `nbd copy`) run. */
  cliCases: number;
  /** Backing-chain cases run. */
  chainCases: number;
  /** Problems in the command-line and chain cases. */
  cliProblems: string[];
}

/** Seed images: qemu-img's over the option matrix, with their raw contents. */
export async function makeSeeds(
  dir: string,
): Promise<Array<{ name: string; bytes: Uint8Array; raw: Uint8Array }>> {
  const writes = [
    "write -P 0x11 0 100k",
    "write -P 0x22 1000000 70000",
    "write -z 1100k 256k",
    "write -P 0x33 2M 16k",
    "discard 2M 8k",
    "write -P 0x44 3000000 1536",
  ];
  const specs: Array<{ name: string; create: string; compress?: string }> = [
    { name: "v3-64k", create: "" },
    { name: "v2-4k", create: "compat=0.10,cluster_size=4096" },
    { name: "v3-512-refcount1", create: "cluster_size=512,refcount_bits=1" },
    { name: "v3-extl2-32k", create: "extended_l2=on,cluster_size=32768" },
    { name: "v3-refcount64-16k", create: "refcount_bits=64,cluster_size=16384" },
    { name: "v3-zlib-64k", create: "", compress: "zlib" },
    { name: "v3-zstd-4k", create: "cluster_size=4096", compress: "zstd" },
    { name: "v2-zlib-8k", create: "compat=0.10,cluster_size=8192", compress: "zlib" },
  ];
  const seeds = [];
  for (const spec of specs) {
    const path = `${dir}/${spec.name}.qcow2`;
    if (spec.compress) {
      const raw = `${dir}/${spec.name}.src`;
      await runOk("qemu-img", ["create", "-q", "-f", "raw", raw, "4M"]);
      await runOk("qemu-io", ["-f", "raw", ...writes.flatMap((w) => ["-c", w]), raw]);
      const options = [spec.create, spec.compress === "zstd" ? "compression_type=zstd" : ""]
        .filter((o) => o).join(",");
      await runOk("qemu-img", [
        ...["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"],
        ...(options ? ["-o", options] : []),
        ...[raw, path],
      ]);
    } else {
      await runOk("qemu-img", [
        ...["create", "-q", "-f", "qcow2"],
        ...(spec.create ? ["-o", spec.create] : []),
        ...[path, "4M"],
      ]);
      await runOk("qemu-io", ["-f", "qcow2", ...writes.flatMap((w) => ["-c", w]), path]);
    }
    await runOk("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", path, `${path}.raw`]);
    seeds.push({
      name: spec.name,
      bytes: await Deno.readFile(path),
      raw: await Deno.readFile(`${path}.raw`),
    });
  }
  return seeds;
}

function mask(message: string): string {
  return message.replace(/\d+/g, "N").replace(/"[^"]*"/g, '"…"').slice(0, 110);
}

function bump(map: Map<string, number>, key: string): void {
  map.set(key, (map.get(key) ?? 0) + 1);
}

/** Runs the in-process cases in workers, restarting a worker after a hang. */
async function inProcess(
  seeds: Array<{ name: string; bytes: Uint8Array }>,
  seed: number,
  maxCases: number,
  seconds: number,
  workers: number,
  report: Qcow2FuzzReport,
  log: (line: string) => void,
): Promise<void> {
  const spawn = () => {
    const worker = new Worker(new URL("./fuzz_qcow2_worker.ts", import.meta.url), {
      type: "module",
    });
    const ready = new Promise<Worker>((resolve, reject) => {
      worker.onmessage = (event) => {
        if (event.data?.type === "ready") resolve(worker);
      };
      worker.onerror = (event) => {
        event.preventDefault();
        reject(new Error(`the fuzz worker failed to start: ${event.message}`));
      };
    });
    return ready;
  };
  // The clock starts once the workers have loaded.
  const warm = await Promise.all(Array.from({ length: workers }, spawn));
  const started = performance.now();
  const deadline = started + seconds * 1000;
  let next = 0;
  const openErrors = new Map<string, number>();
  const claim = (): [number, number] | undefined => {
    if (next >= maxCases || performance.now() >= deadline) return undefined;
    const first = next;
    next = Math.min(maxCases, next + CHUNK);
    return [first, next];
  };
  let lastLog = performance.now();
  const runWorker = async (firstWorker: Worker) => {
    let range = claim();
    // One worker runs chunk after chunk; it is replaced only after a hang or a crash.
    let live: Worker | undefined = firstWorker;
    while (range) {
      const [first, end] = range;
      const worker: Worker = live ?? await spawn();
      live = worker;
      const retire = () => {
        worker.terminate();
        live = undefined;
      };
      let current: { index: number; classes: string[]; seed: string; at: number } | undefined;
      const resumeAt = await new Promise<number | undefined>((resolve) => {
        const watchdog = setInterval(() => {
          if (current && performance.now() - current.at > HANG_MS) {
            report.hangs.push(
              `case ${current.index} (${current.seed}: ${current.classes.join(", ")}) ` +
                `gave no result in ${HANG_MS / 1000} s; replay with --seed ${seed}`,
            );
            clearInterval(watchdog);
            retire();
            resolve(current.index + 1);
          }
        }, 1000);
        worker.onerror = (event) => {
          event.preventDefault();
          report.crashes.push(
            `case ${current?.index}: the worker died: ${event.message}`.slice(0, 400),
          );
          clearInterval(watchdog);
          retire();
          resolve(current ? current.index + 1 : end);
        };
        worker.onmessage = (event) => {
          const m = event.data;
          if (m.type === "start") {
            current = { index: m.index, classes: m.classes, seed: m.seed, at: performance.now() };
          } else if (m.type === "result") {
            const outcome = m.outcome as CaseOutcome;
            report.cases++;
            bump(report.classes, current!.classes[0]!);
            if (outcome.kind === "crash") {
              report.crashes.push(
                `case ${m.index} (${current!.seed}: ${
                  current!.classes.join(", ")
                }): ${outcome.message}`,
              );
              bump(report.outcomes, "crash");
            } else if (outcome.kind === "open error") {
              bump(report.outcomes, "open error");
              bump(openErrors, mask(outcome.message));
            } else {
              bump(report.outcomes, outcome.ioErrors > 0 ? "served with EIO" : "served");
            }
            current = undefined;
            if (performance.now() - lastLog > 5000) {
              lastLog = performance.now();
              log(`fuzz --qcow2: ${report.cases} cases, ${report.crashes.length} crashes`);
            }
            // Stop early at the deadline; the rest of the chunk is not run.
            if (performance.now() >= deadline) {
              clearInterval(watchdog);
              retire();
              resolve(undefined);
            }
          } else if (m.type === "done") {
            clearInterval(watchdog);
            resolve(undefined);
          }
        };
        const job: WorkerJob = { seeds, seed, first, end };
        worker.postMessage(job);
      });
      range = resumeAt !== undefined && resumeAt < end ? [resumeAt, end] : claim();
    }
    live?.terminate();
  };
  await Promise.all(warm.map(runWorker));
  report.seconds = (performance.now() - started) / 1000;
  report.openErrors = [...openErrors].sort((a, b) => b[1] - a[1]).slice(0, 15);
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout>;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`HANG: ${what} took over ${ms / 1000} s`)), ms);
    }),
  ]);
}

/** Serves mutated images through the filter and drives them with a client. */
async function servedCases(
  dir: string,
  seeds: Array<{ name: string; bytes: Uint8Array; raw: Uint8Array }>,
  seed: number,
  count: number,
  report: ServedReport,
): Promise<void> {
  const images = `${dir}/served`;
  await Deno.mkdir(images);
  const layouts = seeds.map((s) => layoutOf(s.name, s.bytes));
  const good = seeds[0]!;
  await Deno.writeFile(`${images}/good.qcow2`, good.bytes);
  for (let i = 0; i < count; i++) {
    const c = nextQcow2Case(layouts, caseRng(seed + 1, i));
    await Deno.writeFile(`${images}/case-${i}.qcow2`, c.bytes);
  }
  const server = await startNbdServe(["--filter=qcow2", "file", `dir=${images}`]);
  const uri = (name: string) => `nbd+unix:///${name}?socket=${server.socket}`;
  const probe = async () => {
    report.probes++;
    const client = await withTimeout(NbdClient.connect(uri("good.qcow2")), 20_000, "probe");
    try {
      const buf = new Uint8Array(good.raw.length);
      await withTimeout(client.pread(buf, 0), 20_000, "probe read");
      const at = buf.findIndex((b, i) => b !== good.raw[i]);
      if (at >= 0) report.problems.push(`the good image read back differently at ${at}`);
    } finally {
      await client.close().catch(() => {});
    }
  };
  try {
    for (let i = 0; i < count; i++) {
      if (i % 20 === 0) await probe().catch((e) => report.problems.push(`probe: ${e.message}`));
      report.cases++;
      const rng = caseRng(seed + 2, i);
      let client: NbdClient;
      try {
        client = await withTimeout(NbdClient.connect(uri(`case-${i}.qcow2`)), 20_000, "connect");
      } catch (error) {
        const message = (error as Error).message;
        if (message.startsWith("HANG") || message.includes("\n") || !/qcow2: /.test(message)) {
          report.problems.push(`case ${i}: open: ${message.slice(0, 300)}`);
        }
        report.openErrors++;
        continue;
      }
      try {
        const size = client.size();
        const ops: Array<[string, () => Promise<unknown>]> = [];
        if (size > 0) {
          const front = Math.min(size, 512 * 1024);
          ops.push(["read", () => client.pread(new Uint8Array(front), 0)]);
          for (let k = 0; k < 3; k++) {
            const length = Math.min(size, 1 + rng.int(65536));
            const offset = rng.int(size - length + 1);
            ops.push(["read", () => client.pread(new Uint8Array(length), offset)]);
            ops.push(["block status", () => client.extents(offset, length)]);
          }
          if (!client.readOnly) {
            const length = Math.min(size, 1 + rng.int(65536));
            const offset = rng.int(size - length + 1);
            ops.push(["write", () => client.pwrite(new Uint8Array(length).fill(0x77), offset)]);
            ops.push(["flush", () => client.flush()]);
          }
        }
        for (const [what, op] of ops) {
          report.requests++;
          try {
            await withTimeout(op(), 20_000, what);
          } catch (error) {
            const e = error as Error;
            if (e instanceof NbdRequestError && e.errno === "EIO" && !e.message.includes("\n")) {
              report.ioErrors++;
            } else {
              report.problems.push(`case ${i}: ${what}: ${e.message.slice(0, 300)}`);
              break;
            }
          }
        }
      } finally {
        await withTimeout(client.close(), 20_000, "close").catch((e) =>
          report.problems.push(`case ${i}: close: ${e.message}`)
        );
      }
    }
    await probe().catch((e) => report.problems.push(`probe: ${e.message}`));
  } finally {
    const exited = await Promise.race([
      server.child.status.then(() => true),
      new Promise<boolean>((r) => setTimeout(() => r(false), 0)),
    ]);
    await server[Symbol.asyncDispose]();
    report.survived = !exited;
    report.exitCode = (await server.child.status).code;
    report.internalErrors = server.stderr().split("\n").filter((l) => CRASH_PATTERN.test(l))
      .slice(0, 20);
  }
}

function nbdArgs(...args: string[]): string[] {
  return ["run", "-A", "--quiet", `${ROOT}/main.ts`, ...args];
}

/**
 * Checks a command's failure: exit 0, or non-zero with one line on stderr
 * (for `nbd info`, which describes what it finds: or one `format-error:`
 * line in its report) and no stack trace.
 */
function judgeCommand(
  what: string,
  result: { code: number; stdout: string; stderr: string },
  problems: string[],
): void {
  const lines = result.stderr.split("\n").filter((l) => l.trim() !== "");
  const reported = result.stdout.split("\n").filter((l) => /^\s*format-error: \S/.test(l));
  if (lines.some((l) => CRASH_PATTERN.test(l))) {
    problems.push(`${what}: internal error: ${lines.join(" | ").slice(0, 300)}`);
  } else if (result.code !== 0 && lines.length === 0 && reported.length === 1) {
    return;
  } else if (result.code !== 0 && lines.length !== 1) {
    problems.push(`${what}: exit ${result.code} with ${lines.length} lines on stderr`);
  } else if (result.code > 2 || result.code < 0) {
    problems.push(`${what}: exit ${result.code}`);
  }
}

/** `nbd info` and `nbd copy --source-format=qcow2` on mutated images. */
async function cliCases(
  dir: string,
  seeds: Array<{ name: string; bytes: Uint8Array }>,
  seed: number,
  count: number,
  report: Qcow2FuzzReport,
): Promise<void> {
  const layouts = seeds.map((s) => layoutOf(s.name, s.bytes));
  for (let i = 0; i < count; i++) {
    const c = nextQcow2Case(layouts, caseRng(seed + 3, i));
    const path = `${dir}/cli-${i}.qcow2`;
    await Deno.writeFile(path, c.bytes);
    const label = `case ${i} (${c.seed}: ${c.classes.join(", ")})`;
    const info = await withTimeout(
      run(Deno.execPath(), nbdArgs("info", path)),
      60_000,
      "nbd info",
    );
    judgeCommand(`nbd info ${label}`, info, report.cliProblems);
    const copy = await withTimeout(
      run(Deno.execPath(), nbdArgs("copy", "--source-format=qcow2", path, `${path}.raw`)),
      60_000,
      "nbd copy",
    );
    judgeCommand(`nbd copy ${label}`, copy, report.cliProblems);
    report.cliCases += 2;
  }
}

/** Backing chains that loop, escape or go too deep, with qcow2-follow-backing=true. */
async function chainCases(dir: string, report: Qcow2FuzzReport): Promise<void> {
  const chains = `${dir}/chains`;
  await Deno.mkdir(`${chains}/inner`, { recursive: true });
  const create = (path: string, backing?: string) =>
    runOk("qemu-img", [
      ...["create", "-q", "-f", "qcow2", "-u"],
      ...(backing ? ["-b", backing, "-F", "qcow2"] : []),
      ...[path, "1M"],
    ]);
  await create(`${chains}/inner/self.qcow2`, "self.qcow2");
  await create(`${chains}/inner/a.qcow2`, "b.qcow2");
  await create(`${chains}/inner/b.qcow2`, "a.qcow2");
  await create(`${chains}/outside.qcow2`);
  await create(`${chains}/inner/escape.qcow2`, "../outside.qcow2");
  for (let i = 0; i < 40; i++) {
    await create(`${chains}/inner/deep-${i}.qcow2`, i < 39 ? `deep-${i + 1}.qcow2` : undefined);
  }
  const cases: Array<[string, RegExp]> = [
    ["self.qcow2", /loops back/],
    ["a.qcow2", /loops back/],
    ["escape.qcow2", /outside/],
    ["deep-0.qcow2", /deeper than/],
  ];
  for (const [name, expect] of cases) {
    report.chainCases++;
    await using server = await startNbdServe([
      "--filter=qcow2",
      "file",
      `${chains}/inner/${name}`,
      "qcow2-follow-backing=true",
    ]);
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const client = await withTimeout(NbdClient.connect(server.uri), 20_000, "connect");
        await client.close();
        report.cliProblems.push(`chain ${name}: opened`);
      } catch (error) {
        const message = (error as Error).message;
        if (!expect.test(message) || message.includes("\n")) {
          report.cliProblems.push(`chain ${name}: ${message.slice(0, 300)}`);
        }
      }
    }
    const crashed = server.stderr().split("\n").filter((l) => CRASH_PATTERN.test(l));
    if (crashed.length > 0) report.cliProblems.push(`chain ${name}: ${crashed[0]}`);
  }
}

/** Runs the qcow2 fuzzer and returns its report. */
export async function runQcow2Fuzz(options: Qcow2FuzzOptions = {}): Promise<Qcow2FuzzReport> {
  const seed = options.seed ?? (Date.now() % 1_000_000);
  const log = options.log ?? (() => {});
  for (const peer of ["qemu-img", "qemu-io"]) {
    if (!hasCommand(peer)) {
      throw new Error(`the qcow2 fuzzer needs ${peer} to make its seed images`);
    }
  }
  await using dir = await tempDir("nbd-fuzz-qcow2");
  const seeds = await makeSeeds(dir.path);
  const report: Qcow2FuzzReport = {
    seed,
    seeds: seeds.map((s) => s.name),
    cases: 0,
    seconds: 0,
    classes: new Map(),
    outcomes: new Map(),
    openErrors: [],
    crashes: [],
    hangs: [],
    served: {
      cases: 0,
      openErrors: 0,
      requests: 0,
      ioErrors: 0,
      probes: 0,
      problems: [],
      survived: false,
      exitCode: undefined,
      internalErrors: [],
    },
    cliCases: 0,
    chainCases: 0,
    cliProblems: [],
  };
  log(`fuzz --qcow2: seed ${seed}, seeds ${report.seeds.join(", ")}`);
  await inProcess(
    seeds.map(({ name, bytes }) => ({ name, bytes })),
    seed,
    options.cases ?? 20_000,
    options.seconds ?? 60,
    options.workers ?? 2,
    report,
    log,
  );
  log(`fuzz --qcow2: ${report.cases} in-process cases done; serving ${options.served ?? 120}`);
  await servedCases(dir.path, seeds, seed, options.served ?? 120, report.served);
  await cliCases(dir.path, seeds, seed, options.cli ?? 6, report);
  await chainCases(dir.path, report);
  return report;
}

/** Whether a qcow2 fuzz report shows a clean run. */
export function qcow2FuzzPassed(r: Qcow2FuzzReport): boolean {
  const s = r.served;
  return r.crashes.length === 0 && r.hangs.length === 0 && s.problems.length === 0 &&
    s.survived && s.exitCode === 0 && s.internalErrors.length === 0 &&
    r.cliProblems.length === 0;
}

/** A human-readable report. */
export function formatQcow2FuzzReport(r: Qcow2FuzzReport): string {
  const lines: string[] = [];
  lines.push(
    `fuzz --qcow2: seed ${r.seed}: ${r.cases} in-process cases in ${r.seconds.toFixed(1)} s (${
      Math.round(r.cases / Math.max(r.seconds, 0.001))
    } cases/s) from ${r.seeds.length} seed images`,
  );
  lines.push("outcomes:");
  for (const [k, n] of [...r.outcomes].sort((a, b) => b[1] - a[1])) {
    lines.push(`  ${String(n).padStart(8)}  ${k}`);
  }
  lines.push(`mutation classes: ${r.classes.size}`);
  for (const [k, n] of [...r.classes].sort((a, b) => a[0].localeCompare(b[0]))) {
    lines.push(`  ${String(n).padStart(8)}  ${k}`);
  }
  lines.push("most frequent open errors:");
  for (const [k, n] of r.openErrors) lines.push(`  ${String(n).padStart(8)}  ${k}`);
  lines.push(`crashes: ${r.crashes.length}`);
  for (const c of r.crashes.slice(0, 10)) lines.push(`  ${c}`);
  lines.push(`hangs: ${r.hangs.length}`);
  for (const h of r.hangs.slice(0, 10)) lines.push(`  ${h}`);
  const s = r.served;
  lines.push(
    `served through --filter=qcow2: ${s.cases} images, ${s.openErrors} refused at open, ` +
      `${s.requests} requests (${s.ioErrors} EIO), ${s.probes} byte-exact reads of a good image; ` +
      `server ${
        s.survived ? "survived" : "DIED"
      }, exit ${s.exitCode}, internal errors ${s.internalErrors.length}`,
  );
  for (const p of [...s.problems, ...s.internalErrors].slice(0, 10)) lines.push(`  ${p}`);
  lines.push(
    `nbd info / nbd copy: ${r.cliCases} runs; backing chains: ${r.chainCases}; problems ${r.cliProblems.length}`,
  );
  for (const p of r.cliProblems.slice(0, 10)) lines.push(`  ${p}`);
  lines.push(qcow2FuzzPassed(r) ? "fuzz --qcow2: OK" : "fuzz --qcow2: FAILED");
  return lines.join("\n");
}
