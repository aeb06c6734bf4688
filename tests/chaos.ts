/**
 * Chaos under load: eight clients write and verify their own regions of an
 * export while the harness breaks things underneath them, one case at a
 * time:
 *
 * - `proxy-restart`: the upstream of `nbd proxy` is SIGKILLed and restarted;
 * - `retry-restart`: the same under `nbd serve --filter=retry nbd ...`,
 *   where the retry filter is expected to hide every restart;
 * - `tcp-cut`: a cutting proxy between clients and a TCP listener closes
 *   connections in the middle of requests;
 * - `enospc`: the file export's image lives on a small tmpfs that fills up
 *   and is freed again;
 * - `fsync-fail`: strace makes the file export's real fsync calls fail
 *   (EIO) while the server runs;
 * - `stall`: the upstream of `nbd proxy --request-timeout` is stopped
 *   (SIGSTOP) for longer or shorter than the timeout, then resumed;
 * - `delay`: that upstream is replaced in turn by one behind the delay
 *   filter, whose replies all come after the proxy's request timeout (every
 *   request must then fail with EIO, none succeed), and a prompt one.
 *
 * After each case the faults stop, every client flushes and reads its region
 * back, the servers stop, and file images are checked on disk. A case fails
 * when a client read data nobody wrote there, an acknowledged write was lost
 * (flushed or not: a killed process keeps the page cache, so nothing
 * acknowledged may go), a request or reconnection hung past the watchdog, an
 * error reply carried an errno the case does not allow, the server kept
 * connections after the clients left, or its RSS kept growing.
 *
 *   deno task chaos                         # every case, 5 s of faults each
 *   deno task chaos --duration 300 --cases tcp-cut,stall
 *
 * @module
 */

import { parseArgs } from "node:util";
import { hasCommand, INTEROP_REQUIRED, ROOT, run, tempDir, waitForSocket } from "./helpers.ts";
import { PipelinedClient } from "./pipelined_client.ts";
import {
  type ChaosStats,
  ChaosWorker,
  emptyChaosStats,
  errorReplies,
  mergeChaosStats,
  SLOW_FAILURE_MS,
} from "./chaos_worker.ts";
import { formatKiB, rssKiB } from "./proc_stats.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** Options of a chaos run. */
export interface ChaosOptions {
  /** Seconds of faults per case (default 5). */
  duration?: number;
  /** Cases to run (default all, in order). */
  cases?: string[];
  /** Clients (default 8). */
  clients?: number;
  /** Requests in flight per client (default 8). */
  inFlight?: number;
  /** Blocks of 4 KiB owned by each client (default 256). */
  regionBlocks?: number;
  /** Progress and report lines (default: none). */
  log?: (line: string) => void;
}

/** The outcome of one case. */
export interface CaseResult {
  /** Case name. */
  name: string;
  /** Why the case did not run (a missing tool or privilege), if it did not. */
  skipped?: string;
  /** Seconds of faults. */
  seconds: number;
  /** Faults injected (kills, cuts, fills, failed fsyncs, stalls). */
  faults: number;
  /** What the clients saw, the final read-back and the on-disk check included. */
  stats: ChaosStats;
  /** Server RSS in KiB once warmed up, at its peak and at the end. */
  rss: { warm?: number; peak?: number; end?: number };
  /** Socket descriptors of the server before the clients came and after they left. */
  sockets: { before: number; after: number };
  /** Why the case failed (empty when it passed). */
  failures: string[];
  /** Case-specific figures for the report. */
  notes: string[];
}

/** A case: starts its servers, injects faults until told to stop, checks what it owns. */
interface CaseContext {
  dir: string;
  log: (line: string) => void;
  exportSize: number;
}

interface CaseSetup {
  /** Socket the clients connect to. */
  socket: string;
  /** The process whose connections and memory are watched. */
  watched: () => number | undefined;
  /** Injects faults until `stopped()`; returns how many. */
  inject(
    stopped: () => boolean,
    progress: () => number,
    result: CaseResult,
    timedOut: () => number,
  ): Promise<number>;
  /** Brings everything back to working order after the faults. */
  heal(): Promise<void>;
  /** Error replies this case may produce. */
  allowedErrnos: string[];
  /** Whether clients may see errors at all (false: the case must hide its faults). */
  errorsAllowed: boolean;
  /** Whether some requests must have failed by a timeout (waited >= SLOW_FAILURE_MS). */
  timeoutsExpected?: boolean;
  /** Stops the servers; returns image bytes to check on disk, if any. */
  finish(): Promise<Uint8Array | undefined>;
  /** Kills everything (on failure paths). */
  cleanup(): Promise<void>;
}

const CASES: Record<string, (ctx: CaseContext) => Promise<CaseSetup | string>> = {
  "proxy-restart": proxyRestart,
  "retry-restart": retryRestart,
  "tcp-cut": tcpCut,
  "enospc": enospc,
  "fsync-fail": fsyncFail,
  "stall": stall,
  "delay": delay,
};

/** Names of all cases, in the order they run. */
export const CASE_NAMES: readonly string[] = Object.keys(CASES);

// ---------------------------------------------------------------------------
// Server processes

/** How to start an `nbd` subprocess. */
export interface SpawnOptions {
  /** A command put in front (e.g. strace and its options). */
  prefix?: string[];
  /** Options for `deno run` (e.g. --v8-flags). */
  denoFlags?: string[];
  /** Extra environment variables. */
  env?: Record<string, string>;
}

/** An `nbd serve` or `nbd proxy` subprocess (possibly under strace). */
export class NbdProcess {
  readonly child: Deno.ChildProcess;
  readonly pid: number;
  readonly #stderr: Promise<string>;
  readonly #holder: { text: string };

  private constructor(
    child: Deno.ChildProcess,
    pid: number,
    stderr: Promise<string>,
    holder: { text: string },
  ) {
    this.child = child;
    this.pid = pid;
    this.#stderr = stderr;
    this.#holder = holder;
  }

  /** What the process wrote on stderr so far. */
  get stderr(): string {
    return this.#holder.text;
  }

  /**
   * Starts `nbd ARGS` (`prefix` goes in front, e.g. strace) with a pidfile,
   * and waits until `ready()` holds.
   */
  static async start(
    dir: string,
    args: string[],
    ready: () => Promise<void>,
    options: SpawnOptions = {},
  ): Promise<NbdProcess> {
    const { prefix = [], denoFlags = [] } = options;
    const pidfile = `${dir}/pid-${crypto.randomUUID()}`;
    const argv = [
      ...prefix,
      Deno.execPath(),
      "run",
      "-A",
      "--quiet",
      ...denoFlags,
      `${ROOT}/main.ts`,
      args[0]!,
      "-P",
      pidfile,
      ...args.slice(1),
    ];
    const child = new Deno.Command(argv[0]!, {
      args: argv.slice(1),
      // The servers run as users run them: without the checking layer (with it, the
      // retry-restart case has been seen to hang; see docs/security.md).
      env: { DENO_NO_UPDATE_CHECK: "1", NBD_DEBUG_LAYERS: "0", ...options.env },
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    let exited = false;
    child.status.then(() => exited = true);
    const holder = { text: "" };
    const stderr = (async () => {
      const decoder = new TextDecoder();
      for await (const chunk of child.stderr) {
        holder.text += decoder.decode(chunk, { stream: true });
        if (holder.text.length > 200_000) holder.text = holder.text.slice(-100_000);
      }
      return holder.text;
    })();
    try {
      await Promise.race([
        ready(),
        child.status.then((s) => {
          throw new Error(`exited with ${s.code}`);
        }),
      ]);
      let pid = 0;
      for (let i = 0; i < 250 && !pid; i++) {
        pid = Number((await Deno.readTextFile(pidfile).catch(() => "")).trim());
        if (!pid) await new Promise((r) => setTimeout(r, 20));
      }
      if (!pid || exited) throw new Error(`${pidfile} was not written`);
      return new NbdProcess(child, pid, stderr, holder);
    } catch (error) {
      try {
        child.kill("SIGKILL");
      } catch { /* gone */ }
      await child.status;
      await stderr;
      throw new Error(`nbd ${args.join(" ")}: ${(error as Error).message}\n${holder.text}`);
    }
  }

  /** Sends a signal to the server itself (not to strace). */
  signal(signal: Deno.Signal): void {
    try {
      Deno.kill(this.pid, signal);
    } catch { /* already gone */ }
  }

  /** SIGKILL, and waits for the process (and strace) to end. */
  async kill(): Promise<Deno.CommandStatus> {
    this.signal("SIGKILL");
    const status = await this.child.status;
    await this.#stderr;
    return status;
  }

  /** SIGTERM (the orderly stop), SIGKILL after 10 s; waits. */
  async stop(): Promise<Deno.CommandStatus> {
    this.signal("SIGCONT");
    this.signal("SIGTERM");
    const timer = setTimeout(() => this.signal("SIGKILL"), 10_000);
    const status = await this.child.status;
    clearTimeout(timer);
    await this.#stderr;
    return status;
  }
}

/** Starts `nbd serve|proxy ARGS` on the Unix socket `socket` (`prefix`, e.g. strace, in front). */
export async function serveUnix(
  dir: string,
  socket: string,
  args: string[],
  options: SpawnOptions = {},
): Promise<NbdProcess> {
  await Deno.remove(socket).catch(() => {});
  return await NbdProcess.start(
    dir,
    [args[0]!, "-U", socket, ...args.slice(1)],
    () => waitForSocket(socket, 30_000),
    options,
  );
}

async function waitForPort(port: number, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      return;
    } catch (error) {
      if (Date.now() > deadline) throw new Error(`port ${port} never opened: ${error}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

async function makeImage(path: string, size: number): Promise<void> {
  const f = await Deno.open(path, { create: true, write: true, truncate: true });
  await f.truncate(size);
  f.close();
}

/** Socket descriptors a process holds (listening, connected, or being closed). */
export function socketCount(pid: number): number {
  let n = 0;
  try {
    for (const entry of Deno.readDirSync(`/proc/${pid}/fd`)) {
      try {
        if (Deno.readLinkSync(`/proc/${pid}/fd/${entry.name}`).startsWith("socket:")) n++;
      } catch { /* closed meanwhile */ }
    }
  } catch {
    return -1;
  }
  return n;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Sleeps up to `ms`, waking early once `stopped()`. */
async function pause(ms: number, stopped: () => boolean): Promise<void> {
  const until = Date.now() + ms;
  while (!stopped() && Date.now() < until) await sleep(Math.min(50, until - Date.now()));
}

function between(min: number, max: number): number {
  return min + Math.random() * (max - min);
}

// ---------------------------------------------------------------------------
// The cases

/** How long the clients may go without a successful request after an upstream restart. */
const RECOVERY_LIMIT_MS = 15_000;

/**
 * Kills the upstream and restarts it on the same socket, again and again;
 * before each kill it waits until the clients got requests through again
 * (the recovery, bounded by RECOVERY_LIMIT_MS), so every kill hits a
 * working chain.
 */
function upstreamKiller(
  dir: string,
  socket: string,
  args: string[],
  holder: { upstream: NbdProcess },
) {
  return async (
    stopped: () => boolean,
    progress: () => number,
    result: CaseResult,
  ): Promise<number> => {
    let kills = 0;
    let recovered = 0;
    let slowest = 0;
    while (!stopped()) {
      await pause(between(200, 800), stopped);
      if (stopped()) break;
      await holder.upstream.kill();
      kills++;
      await sleep(between(50, 300));
      holder.upstream = await serveUnix(dir, socket, args);
      const restarted = Date.now();
      const before = progress();
      while (!stopped() && progress() < before + 50) {
        if (Date.now() - restarted > RECOVERY_LIMIT_MS) {
          result.failures.push(
            `no request got through within ${RECOVERY_LIMIT_MS} ms of an upstream restart`,
          );
          return kills;
        }
        await sleep(20);
      }
      if (stopped()) break;
      recovered++;
      slowest = Math.max(slowest, Date.now() - restarted);
    }
    // A restart the faults' end interrupted is checked by the final flush and read-back instead.
    result.notes.push(
      `requests got through again after ${recovered} of ${kills} upstream restarts before the ` +
        `faults ended (slowest ${slowest} ms)`,
    );
    return kills;
  };
}

async function proxyRestart(ctx: CaseContext): Promise<CaseSetup> {
  const image = `${ctx.dir}/disk.img`;
  await makeImage(image, ctx.exportSize);
  const upSocket = `${ctx.dir}/up.sock`;
  const upArgs = ["serve", "file", image];
  const holder = { upstream: await serveUnix(ctx.dir, upSocket, upArgs) };
  const proxy = await serveUnix(ctx.dir, `${ctx.dir}/proxy.sock`, [
    "proxy",
    "--timeout",
    "5",
    `nbd+unix:///?socket=${upSocket}`,
  ]);
  return {
    socket: `${ctx.dir}/proxy.sock`,
    watched: () => proxy.pid,
    inject: upstreamKiller(ctx.dir, upSocket, upArgs, holder),
    heal: () => Promise.resolve(),
    allowedErrnos: ["EIO"],
    errorsAllowed: true,
    async finish() {
      await proxy.stop();
      await holder.upstream.kill();
      return await Deno.readFile(image);
    },
    async cleanup() {
      await proxy.kill();
      await holder.upstream.kill();
    },
  };
}

async function retryRestart(ctx: CaseContext): Promise<CaseSetup> {
  const image = `${ctx.dir}/disk.img`;
  await makeImage(image, ctx.exportSize);
  const upSocket = `${ctx.dir}/up.sock`;
  const upArgs = ["serve", "file", image];
  const holder = { upstream: await serveUnix(ctx.dir, upSocket, upArgs) };
  const front = await serveUnix(ctx.dir, `${ctx.dir}/front.sock`, [
    "serve",
    "--filter=retry",
    "nbd",
    `uri=nbd+unix:///?socket=${upSocket}`,
    "timeout=5",
    // Fixed 100 ms waits for up to 12 s: an upstream restart fits well inside the clients' watchdog.
    "retries=120",
    "retry-delay=100ms",
    "retry-exponential=false",
  ]);
  return {
    socket: `${ctx.dir}/front.sock`,
    watched: () => front.pid,
    inject: upstreamKiller(ctx.dir, upSocket, upArgs, holder),
    heal: () => Promise.resolve(),
    allowedErrnos: [],
    errorsAllowed: false,
    async finish() {
      await front.stop();
      await holder.upstream.kill();
      return await Deno.readFile(image);
    },
    async cleanup() {
      await front.kill();
      await holder.upstream.kill();
    },
  };
}

/** A proxy from a Unix socket to a TCP port whose connections can be cut. */
class CuttingProxy {
  readonly #listener: Deno.Listener;
  readonly #pairs = new Set<[Deno.Conn, Deno.Conn]>();
  readonly #accepting: Promise<void>;

  constructor(path: string, port: number) {
    this.#listener = Deno.listen({ transport: "unix", path });
    this.#accepting = this.#accept(port);
  }

  async #accept(port: number): Promise<void> {
    for await (const client of this.#listener) {
      let server: Deno.Conn;
      try {
        server = await Deno.connect({ hostname: "127.0.0.1", port });
      } catch {
        client.close();
        continue;
      }
      const pair: [Deno.Conn, Deno.Conn] = [client, server];
      this.#pairs.add(pair);
      const close = () => {
        if (!this.#pairs.delete(pair)) return;
        for (const c of pair) {
          try {
            c.close();
          } catch { /* closed */ }
        }
      };
      pump(client, server).finally(close);
      pump(server, client).finally(close);
    }
  }

  /** Cuts one connection (both sides) chosen at random; false when none is open. */
  cutOne(): boolean {
    const pairs = [...this.#pairs];
    if (pairs.length === 0) return false;
    const pair = pairs[Math.floor(Math.random() * pairs.length)]!;
    this.#pairs.delete(pair);
    for (const c of pair) {
      try {
        c.close();
      } catch { /* closed */ }
    }
    return true;
  }

  async close(): Promise<void> {
    this.#listener.close();
    await this.#accepting.catch(() => {});
    while (this.cutOne()) { /* all */ }
  }
}

async function pump(from: Deno.Conn, to: Deno.Conn): Promise<void> {
  const buf = new Uint8Array(256 * KiB);
  try {
    while (true) {
      const n = await from.read(buf);
      if (n === null) return;
      let done = 0;
      while (done < n) done += await to.write(buf.subarray(done, n));
    }
  } catch { /* cut */ }
}

async function tcpCut(ctx: CaseContext): Promise<CaseSetup> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  const server = await NbdProcess.start(ctx.dir, [
    "serve",
    "-i",
    "127.0.0.1",
    "-p",
    String(port),
    "memory",
    String(ctx.exportSize),
  ], () => waitForPort(port));
  const socket = `${ctx.dir}/cut.sock`;
  const cutter = new CuttingProxy(socket, port);
  return {
    socket,
    watched: () => server.pid,
    async inject(stopped) {
      let cuts = 0;
      while (!stopped()) {
        await pause(between(100, 400), stopped);
        if (!stopped() && cutter.cutOne()) cuts++;
      }
      return cuts;
    },
    heal: () => Promise.resolve(),
    allowedErrnos: [],
    errorsAllowed: true,
    async finish() {
      await cutter.close();
      await server.stop();
      return undefined;
    },
    async cleanup() {
      await cutter.close();
      await server.kill();
    },
  };
}

async function enospc(ctx: CaseContext): Promise<CaseSetup | string> {
  const mountpoint = `${ctx.dir}/tmpfs`;
  await Deno.mkdir(mountpoint);
  // Room for half the export: writes to blocks not yet allocated fail once it is full.
  const size = Math.max(ctx.exportSize / 2, 2 * MiB);
  const mounted = await run("mount", ["-t", "tmpfs", "-o", `size=${size}`, "tmpfs", mountpoint]);
  if (mounted.code !== 0) {
    const why = `mounting a tmpfs failed: ${mounted.stderr.trim()}`;
    if (INTEROP_REQUIRED) throw new Error(why);
    return why;
  }
  const image = `${mountpoint}/disk.img`;
  await makeImage(image, ctx.exportSize);
  const filler = `${mountpoint}/filler`;
  let server: NbdProcess;
  try {
    server = await serveUnix(ctx.dir, `${ctx.dir}/file.sock`, ["serve", "file", image]);
  } catch (error) {
    await run("umount", [mountpoint]);
    throw error;
  }
  /** Fills the filesystem with a filler file (until ENOSPC). */
  const fill = async () => {
    const f = await Deno.open(filler, { create: true, write: true, append: true });
    const chunk = new Uint8Array(256 * KiB).fill(0x5a);
    try {
      while (true) await f.write(chunk);
    } catch {
      /* full */
    } finally {
      f.close();
    }
  };
  return {
    socket: `${ctx.dir}/file.sock`,
    watched: () => server.pid,
    async inject(stopped) {
      // Full for a while, then space is freed, then full again: writes fail and recover.
      let fills = 0;
      while (!stopped()) {
        await pause(between(300, 800), stopped);
        if (stopped()) break;
        await fill();
        fills++;
        await pause(between(500, 1200), stopped);
        await Deno.remove(filler).catch(() => {});
      }
      return fills;
    },
    heal: () => Deno.remove(filler).catch(() => {}),
    allowedErrnos: ["ENOSPC"],
    errorsAllowed: true,
    async finish() {
      await server.kill();
      const bytes = await Deno.readFile(image);
      await run("umount", [mountpoint]);
      return bytes;
    },
    async cleanup() {
      await server.kill();
      await run("umount", [mountpoint]);
    },
  };
}

async function fsyncFail(ctx: CaseContext): Promise<CaseSetup | string> {
  if (!hasCommand("strace")) {
    if (INTEROP_REQUIRED) throw new Error("strace is missing");
    return "strace is missing";
  }
  const image = `${ctx.dir}/disk.img`;
  await makeImage(image, ctx.exportSize);
  const trace = `${ctx.dir}/fsync.trace`;
  // Every second fsync (or fdatasync) the server makes fails with EIO without being performed.
  const server = await serveUnix(ctx.dir, `${ctx.dir}/file.sock`, ["serve", "file", image], {
    prefix: [
      "strace",
      "-f",
      "-qq",
      "--seccomp-bpf",
      "-o",
      trace,
      "-e",
      "trace=fsync,fdatasync",
      "-e",
      "inject=fsync,fdatasync:error=EIO:when=2+2",
    ],
  });
  const injected = async () =>
    ((await Deno.readTextFile(trace).catch(() => "")).match(/\(INJECTED\)/g) ?? []).length;
  return {
    socket: `${ctx.dir}/file.sock`,
    watched: () => server.pid,
    async inject(stopped) {
      while (!stopped()) await sleep(50);
      return await injected();
    },
    heal: () => Promise.resolve(),
    allowedErrnos: ["EIO"],
    errorsAllowed: true,
    async finish() {
      await server.kill();
      return await Deno.readFile(image);
    },
    async cleanup() {
      await server.kill();
    },
  };
}

async function stall(ctx: CaseContext): Promise<CaseSetup> {
  const image = `${ctx.dir}/disk.img`;
  await makeImage(image, ctx.exportSize);
  const upSocket = `${ctx.dir}/up.sock`;
  const upstream = await serveUnix(ctx.dir, upSocket, ["serve", "file", image]);
  const proxy = await serveUnix(ctx.dir, `${ctx.dir}/proxy.sock`, [
    "proxy",
    "--timeout",
    "1",
    "--request-timeout",
    "500ms",
    `nbd+unix:///?socket=${upSocket}`,
  ]);
  return {
    socket: `${ctx.dir}/proxy.sock`,
    watched: () => proxy.pid,
    async inject(stopped) {
      // Stalls shorter and longer than the proxy's 500 ms request timeout.
      let stalls = 0;
      while (!stopped()) {
        await pause(between(300, 900), stopped);
        if (stopped()) break;
        upstream.signal("SIGSTOP");
        stalls++;
        await sleep(between(150, 1500));
        upstream.signal("SIGCONT");
      }
      return stalls;
    },
    heal: () => Promise.resolve(upstream.signal("SIGCONT")),
    allowedErrnos: ["EIO"],
    errorsAllowed: true,
    async finish() {
      await proxy.stop();
      await upstream.kill();
      return await Deno.readFile(image);
    },
    async cleanup() {
      await proxy.kill();
      await upstream.kill();
    },
  };
}

async function delay(ctx: CaseContext): Promise<CaseSetup> {
  const image = `${ctx.dir}/disk.img`;
  await makeImage(image, ctx.exportSize);
  const upSocket = `${ctx.dir}/up.sock`;
  const prompt = ["serve", "file", image];
  // Every reply 2.5 s late, well past the proxy's 1 s request timeout (checked every 250 ms).
  const slow = [
    "serve",
    "--filter=delay",
    "file",
    image,
    "rdelay=2500ms",
    "wdelay=2500ms",
    "delay-flush=2500ms",
  ];
  const holder = { upstream: await serveUnix(ctx.dir, upSocket, prompt), slow: false };
  const proxy = await serveUnix(ctx.dir, `${ctx.dir}/proxy.sock`, [
    "proxy",
    "--timeout",
    "2",
    "--request-timeout",
    "1",
    `nbd+unix:///?socket=${upSocket}`,
  ]);
  const swap = async (toSlow: boolean) => {
    await holder.upstream.kill();
    holder.upstream = await serveUnix(ctx.dir, upSocket, toSlow ? slow : prompt);
    holder.slow = toSlow;
  };
  return {
    socket: `${ctx.dir}/proxy.sock`,
    watched: () => proxy.pid,
    async inject(stopped, progress, result, timedOut) {
      // The upstream is replaced in turn by a slow one (the delay filter) and a prompt one.
      // While it is slow every request must fail (EIO from the proxy's timeout): none may
      // succeed, since every reply comes after the timeout.
      let spells = 0;
      let late = 0;
      while (!stopped()) {
        await pause(between(300, 800), stopped);
        if (stopped()) break;
        await swap(true);
        spells++;
        const before = progress();
        const timeoutsBefore = timedOut();
        // At least 3 s, and until requests timed out (the proxy reconnects after a back-off
        // of up to 5 s); not cut short when the faults end.
        const spell = Date.now();
        while (
          Date.now() - spell < 3000 ||
          (timedOut() === timeoutsBefore && Date.now() - spell < 15_000)
        ) {
          await sleep(50);
        }
        late += progress() - before;
        await swap(false);
      }
      result.notes.push(`${spells} spells of an upstream answering 2.5 s late`);
      if (late > 0) {
        result.failures.push(`${late} requests succeeded although answered past the timeout`);
      }
      return spells;
    },
    heal: async () => {
      if (holder.slow) await swap(false);
    },
    allowedErrnos: ["EIO"],
    timeoutsExpected: true,
    errorsAllowed: true,
    async finish() {
      await proxy.stop();
      await holder.upstream.kill();
      return await Deno.readFile(image);
    },
    async cleanup() {
      await proxy.kill();
      await holder.upstream.kill();
    },
  };
}

// ---------------------------------------------------------------------------
// Running

/** Runs one case. */
export async function runCase(name: string, options: ChaosOptions = {}): Promise<CaseResult> {
  const make = CASES[name];
  if (!make) throw new Error(`unknown case "${name}" (${CASE_NAMES.join(", ")})`);
  const clients = options.clients ?? 8;
  const inFlight = options.inFlight ?? 8;
  const regionBlocks = options.regionBlocks ?? 256;
  const blockSize = 4 * KiB;
  const duration = options.duration ?? 5;
  const log = options.log ?? (() => {});
  await using dir = await tempDir(`nbd-chaos-${name}`);
  const result: CaseResult = {
    name,
    seconds: 0,
    faults: 0,
    stats: emptyChaosStats(),
    rss: {},
    sockets: { before: 0, after: 0 },
    failures: [],
    notes: [],
  };
  const setup = await make({ dir: dir.path, log, exportSize: clients * regionBlocks * blockSize });
  if (typeof setup === "string") {
    result.skipped = setup;
    log(`chaos: ${name}: SKIPPED: ${setup}`);
    return result;
  }
  let finished = false;
  try {
    const watchedPid = setup.watched()!;
    result.sockets.before = socketCount(watchedPid);
    const workers = Array.from({ length: clients }, (_, i) =>
      new ChaosWorker({
        id: i,
        connect: () => PipelinedClient.connect(setup.socket),
        regionStart: i * regionBlocks * blockSize,
        regionBlocks,
        blockSize,
        inFlight,
        watchdogMs: 20_000,
      }));
    let stop = false;
    const stopped = () => stop;
    const started = performance.now();
    // RSS: sampled all along; "warm" is the first sample a fifth of the way into the faults.
    let faultsStarted = Infinity;
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        const kib = rssKiB(watchedPid);
        if (kib !== undefined) {
          result.rss.peak = Math.max(result.rss.peak ?? 0, kib);
          if (result.rss.warm === undefined && performance.now() - faultsStarted > duration * 200) {
            result.rss.warm = kib;
          }
          result.rss.end = kib;
        }
        await sleep(200);
      }
    })();
    const running = workers.map((w) => w.run(stopped));
    const progress = () => workers.reduce((n, w) => n + w.stats.reads + w.stats.writes, 0);
    // The faults start once every client got requests through (a loaded machine starts slowly).
    const warm = Date.now() + 30_000;
    while (workers.some((w) => w.stats.reads + w.stats.writes < 10) && Date.now() < warm) {
      await sleep(20);
    }
    faultsStarted = performance.now();
    const timedOut = () => workers.reduce((n, w) => n + w.stats.slowFailures, 0);
    const faults = setup.inject(stopped, progress, result, timedOut);
    await sleep(duration * 1000);
    stop = true;
    result.faults = await faults;
    await Promise.all(running);
    result.seconds = (performance.now() - started) / 1000;
    await setup.heal();
    // Everything acknowledged is flushed, then read back through the server.
    await Promise.all(workers.map((w) => w.settle()));
    for (const w of workers) await w.sweep();
    await Promise.all(workers.map((w) => w.close()));
    // The server lets go of every connection once the clients are gone.
    const deadline = Date.now() + 10_000;
    while (socketCount(watchedPid) > result.sockets.before && Date.now() < deadline) {
      await sleep(50);
    }
    result.sockets.after = socketCount(watchedPid);
    sampling = false;
    await sampler;
    result.rss.end = rssKiB(watchedPid) ?? result.rss.end;
    finished = true;
    const image = await setup.finish();
    if (image) { for (const w of workers) w.checkImage(image, "on disk"); }
    for (const w of workers) mergeChaosStats(result.stats, w.stats);
  } finally {
    if (!finished) await setup.cleanup().catch(() => {});
  }
  judge(result, setup);
  log(formatCase(result));
  return result;
}

function judge(r: CaseResult, setup: CaseSetup): void {
  const s = r.stats;
  const f = r.failures;
  if (s.foreign > 0) f.push(`${s.foreign} blocks held data nobody wrote there`);
  if (s.lostAckedBytes > 0) {
    f.push(`${s.lostAckedBytes} acknowledged bytes lost (${s.lostFlushedBytes} flushed)`);
  }
  if (s.hangs > 0) f.push(`${s.hangs} requests or reconnections hung`);
  if (!setup.errorsAllowed && errorReplies(s) + s.connectionLosses > 0) {
    f.push(
      `the faults should be hidden, yet ${errorReplies(s)} requests failed and ` +
        `${s.connectionLosses} connections were lost`,
    );
  }
  const unexpected = Object.keys(s.errnos).filter((e) => !setup.allowedErrnos.includes(e));
  if (unexpected.length > 0) f.push(`unexpected errors: ${unexpected.join(", ")}`);
  if (s.writes === 0 || s.reads === 0) f.push("no successful writes or reads");
  if (r.faults === 0) f.push("no fault was injected");
  if (setup.timeoutsExpected && s.slowFailures === 0) {
    f.push("no request failed by a timeout while the upstream was slow");
  }
  if (r.sockets.after > r.sockets.before) {
    f.push(`the server holds ${r.sockets.after - r.sockets.before} sockets after the clients left`);
  }
  // Reconnection churn must not accumulate memory: the end may exceed the
  // warmed-up figure only by a margin that a leak per fault would exceed.
  if (
    r.rss.warm !== undefined && r.rss.end !== undefined && r.rss.end > r.rss.warm * 1.5 + 32 * KiB
  ) {
    f.push(`server RSS grew from ${formatKiB(r.rss.warm)} to ${formatKiB(r.rss.end)}`);
  }
}

/** One case's report. */
export function formatCase(r: CaseResult): string {
  if (r.skipped) return `${r.name}: SKIPPED (${r.skipped})`;
  const s = r.stats;
  const errnos = Object.entries(s.errnos).map(([k, v]) => `${k} ${v}`).join(", ") || "none";
  const lines = [
    `${r.name}: ${r.faults} faults in ${r.seconds.toFixed(1)} s; ${s.requests} requests ` +
    `(${s.reads} reads, ${s.writes} writes, ${s.flushes} flushes)`,
    `  error replies: ${errnos}; connections lost ${s.connectionLosses}, reopened ${s.reconnects}; ` +
    `failed after waiting >= ${SLOW_FAILURE_MS / 1000} s ${s.slowFailures}; hangs ${s.hangs}`,
    `  verified ${
      (s.bytesVerified / MiB).toFixed(1)
    } MiB; failed writes seen ${s.failedWriteBlocks}, ` +
    `torn ${s.tornBlocks}; foreign ${s.foreign}; lost ${s.lostAckedBytes} bytes (${s.lostFlushedBytes} flushed)`,
    `  server sockets ${r.sockets.before} -> ${r.sockets.after}; RSS warm ${
      formatKiB(r.rss.warm)
    }, ` +
    `peak ${formatKiB(r.rss.peak)}, end ${formatKiB(r.rss.end)}`,
    ...r.notes.map((n) => `  ${n}`),
    `  ${r.failures.length ? `FAILED: ${r.failures.join("; ")}` : "ok"}`,
  ];
  for (const p of s.problems.slice(0, 6)) lines.push(`  problem: ${p}`);
  return lines.join("\n");
}

/** Runs the cases in turn. */
export async function runChaos(options: ChaosOptions = {}): Promise<CaseResult[]> {
  const results: CaseResult[] = [];
  for (const name of options.cases ?? CASE_NAMES) results.push(await runCase(name, options));
  return results;
}

/** The totals line: cases, faults injected, bytes verified, bytes lost. */
export function formatTotals(results: CaseResult[]): string {
  const ran = results.filter((r) => !r.skipped);
  const faults = ran.reduce((a, r) => a + r.faults, 0);
  const verified = ran.reduce((a, r) => a + r.stats.bytesVerified, 0);
  const lost = ran.reduce((a, r) => a + r.stats.lostAckedBytes, 0);
  const failed = ran.filter((r) => r.failures.length > 0).length;
  return `chaos: ${ran.length} cases (${results.length - ran.length} skipped, ${failed} failed), ` +
    `${faults} faults injected, ${(verified / MiB).toFixed(1)} MiB verified, ${lost} bytes lost`;
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      duration: { type: "string", short: "d" },
      cases: { type: "string" },
      clients: { type: "string" },
      "in-flight": { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(
      `Usage: deno task chaos [--duration SECONDS] [--cases NAME,...] [--clients N] [--in-flight N]

Cases: ${CASE_NAMES.join(", ")}. --duration is seconds of faults per case (default 5).`,
    );
    return 0;
  }
  const number = (text: string | undefined, name: string, fallback: number) => {
    if (text === undefined) return fallback;
    const n = Number(text);
    if (!(n > 0)) throw new Error(`${name}: expected a positive number, got "${text}"`);
    return n;
  };
  const cases = values.cases?.split(",").map((c) => c.trim());
  for (const c of cases ?? []) {
    if (!CASE_NAMES.includes(c)) {
      console.error(`chaos: unknown case "${c}" (${CASE_NAMES.join(", ")})`);
      return 2;
    }
  }
  const results = await runChaos({
    duration: number(values.duration, "--duration", 5),
    cases,
    clients: number(values.clients, "--clients", 8),
    inFlight: number(values["in-flight"], "--in-flight", 8),
    log: (line) => console.log(line),
  });
  console.log(formatTotals(results));
  return results.some((r) => r.failures.length > 0) ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main());
