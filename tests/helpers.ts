/**
 * Shared helpers for tests: finding real peers (with a loud skip, or a
 * failure under NBD_INTEROP=require), temporary directories, running
 * commands, and starting our own server in-process or as a subprocess.
 *
 * @module
 */

import { fileURLToPath } from "node:url";
import { NbdClient } from "../client/client.ts";
import { platform } from "../io/platform.ts";
import { assertEquals, assertOk } from "./assert.ts";

/** Absolute path of the repository root. */
export const ROOT: string = fileURLToPath(new URL("../", import.meta.url)).replace(/\/$/, "");

const found = new Map<string, boolean>();

/** Whether an executable is on PATH (or is an absolute path that exists). */
export function hasCommand(name: string): boolean {
  if (found.has(name)) return found.get(name)!;
  let ok = false;
  try {
    const result = new Deno.Command("sh", {
      args: ["-c", `command -v "$0"`, name],
      stdout: "null",
      stderr: "null",
    })
      .outputSync();
    ok = result.success;
  } catch {
    ok = false;
  }
  found.set(name, ok);
  return ok;
}

/** Whether interop peers are mandatory (CI sets NBD_INTEROP=require). */
export const INTEROP_REQUIRED: boolean = Deno.env.get("NBD_INTEROP") === "require";

/**
 * Options for a test that needs real peers. When a peer is missing the test
 * is skipped with a loud message, unless NBD_INTEROP=require, in which case
 * the test runs and fails (so CI can never silently skip interop).
 */
export function peers(...names: string[]): { ignore: boolean } {
  const missing = names.filter((n) => !hasCommand(n));
  if (missing.length === 0) return { ignore: false };
  if (INTEROP_REQUIRED) return { ignore: false };
  console.error(
    `\n*** SKIPPING interop test: missing ${
      missing.join(", ")
    } (set NBD_INTEROP=require to fail) ***\n`,
  );
  return { ignore: true };
}

/** Whether this process (and the nbd it starts) takes the Linux fast paths (io/platform.ts). */
export const LINUX_PATHS: boolean = platform().linuxFast;

/**
 * Options for a test of a Linux-only path ([ CMD ] socket activation, pipe
 * sizes, system calls traced): skipped loudly on the portable paths
 * (NBD_PORTABLE=1, --deny-ffi), whatever NBD_INTEROP says; otherwise `base`.
 */
export function linuxPaths(what: string, base: { ignore: boolean } = { ignore: false }): {
  ignore: boolean;
} {
  if (LINUX_PATHS) return base;
  console.error(`\n*** SKIPPING on the portable paths (${platform().why}): ${what} ***\n`);
  return { ignore: true };
}

/** A TCP port nothing listens on right now. */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** A temporary directory removed on dispose. */
export async function tempDir(prefix = "nbd-test"): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix });
  return {
    path,
    async [Symbol.asyncDispose]() {
      await Deno.remove(path, { recursive: true }).catch(() => {});
    },
  };
}

/** Result of running a command. */
export interface RunResult {
  /** Exit code. */
  code: number;
  /** Standard output as text. */
  stdout: string;
  /** Standard error as text. */
  stderr: string;
}

/** Runs a command to completion and captures its output. */
export async function run(
  cmd: string,
  args: string[],
  options: { env?: Record<string, string>; stdin?: Uint8Array | string; cwd?: string } = {},
): Promise<RunResult> {
  const child = new Deno.Command(cmd, {
    args,
    env: options.env,
    cwd: options.cwd,
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (options.stdin !== undefined) {
    const writer = child.stdin.getWriter();
    await writer.write(
      typeof options.stdin === "string" ? new TextEncoder().encode(options.stdin) : options.stdin,
    );
    await writer.close();
  }
  const out = await child.output();
  return {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
}

/** Runs a command and throws (with its stderr) unless it exits 0. */
export async function runOk(
  cmd: string,
  args: string[],
  options: { env?: Record<string, string>; stdin?: Uint8Array | string; cwd?: string } = {},
): Promise<RunResult> {
  const result = await run(cmd, args, options);
  if (result.code !== 0) {
    throw new Error(
      `${cmd} ${args.join(" ")} exited ${result.code}\n${result.stderr}${result.stdout}`,
    );
  }
  return result;
}

/** Environment for running nbdsh (its Python module lives in the system python). */
export const NBDSH_ENV: Record<string, string> = { PATH: `/usr/bin:${Deno.env.get("PATH") ?? ""}` };

let wrapperPath: string | undefined;

/**
 * Path of an `nbd` executable wrapper for this checkout (so peers such as
 * `nbdinfo -- [ nbd serve ... ]` can start it). It execs Deno, keeping the
 * pid, which socket activation relies on. Like the compiled executable, it
 * does not look for a newer runtime (`deno run` otherwise does so in the
 * background half a second in: a DNS lookup and the parsing of the system's
 * certificates, in the middle of a benchmark).
 */
export async function nbdExecutable(): Promise<string> {
  if (wrapperPath) return wrapperPath;
  const dir = await Deno.makeTempDir({ prefix: "nbd-bin" });
  const path = `${dir}/nbd`;
  await Deno.writeTextFile(
    path,
    `#!/bin/sh\nDENO_NO_UPDATE_CHECK=1 exec '${Deno.execPath()}' run -A --quiet '${ROOT}/main.ts' "$@"\n`,
  );
  await Deno.chmod(path, 0o755);
  wrapperPath = path;
  return path;
}

/** A server process started for a test; kill and wait on dispose. */
export interface ServerProcess extends AsyncDisposable {
  /** URI to connect to. */
  uri: string;
  /** Unix socket path, when listening on one. */
  socket?: string;
  /** The child process. */
  child: Deno.ChildProcess;
  /** Everything the server wrote to stderr so far (after dispose: all of it). */
  stderr(): string;
}

/** Waits until a Unix socket accepts connections. */
export async function waitForSocket(
  path: string,
  timeoutMs = 15000,
  gaveUp?: () => boolean,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    if (gaveUp?.()) throw new Error(`the server exited before listening on ${path}`);
    try {
      const conn = await Deno.connect({ transport: "unix", path });
      conn.close();
      return;
    } catch (error) {
      if (Date.now() > deadline) throw new Error(`server socket ${path} never came up: ${error}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/**
 * Starts a server listening on a fresh Unix socket: `cmd` gets the socket
 * path substituted for the string "$SOCKET" in its arguments.
 */
export async function startServer(
  cmd: string,
  args: string[],
  options: { exportName?: string; env?: Record<string, string> } = {},
): Promise<ServerProcess> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-srv" });
  const socket = `${dir}/sock`;
  const child = new Deno.Command(cmd, {
    args: args.map((a) => a.replaceAll("$SOCKET", socket)),
    env: options.env,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let stderrText = "";
  const stderrDone = (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of child.stderr) stderrText += decoder.decode(chunk, { stream: true });
  })();
  try {
    // Stop waiting as soon as the server exits (a bad command line, say).
    let exited = false;
    child.status.then(() => exited = true);
    await waitForSocket(socket, 15000, () => exited);
  } catch (error) {
    try {
      child.kill("SIGKILL");
    } catch { /* gone */ }
    await child.status;
    await stderrDone;
    throw new Error(`${error}\n${stderrText}`);
  }
  const exportName = options.exportName ?? "";
  return {
    uri: `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socket}`,
    socket,
    child,
    stderr: () => stderrText,
    async [Symbol.asyncDispose]() {
      try {
        child.kill("SIGTERM");
      } catch { /* already exited */ }
      const timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch { /* gone */ }
      }, 5000);
      await child.status;
      clearTimeout(timer);
      await stderrDone;
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

/** Starts `nbd serve ARGS -U $SOCKET` as a subprocess. */
export async function startNbdServe(
  args: string[],
  options: { exportName?: string; env?: Record<string, string> } = {},
): Promise<ServerProcess> {
  return await startServer(
    Deno.execPath(),
    ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve", "-U", "$SOCKET", ...args],
    options,
  );
}

/** Fills a buffer with reproducible pseudo-random bytes. */
export function randomBytes(length: number, seed = 1): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** Whether two byte arrays are equal; on mismatch, the first differing offset. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/** Polls `condition` until it holds or `timeoutMs` passes; returns whether it held. */
export async function eventually(condition: () => boolean, timeoutMs = 5000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 20));
  }
  return true;
}

/** Reads a whole export. */
export async function readExport(uri: string): Promise<Uint8Array> {
  await using client = await NbdClient.connect(uri);
  const out = new Uint8Array(client.size());
  await client.pread(out, 0);
  return out;
}

/** A child's stderr, gathered as it arrives. */
export interface StderrWatch {
  /** What arrived so far. */
  readonly text: string;
  /**
   * Resolves once `predicate` holds for what arrived, or the stream ended;
   * rejects after `timeoutMs` (default 30 s) rather than wait for ever.
   */
  until(predicate: (text: string) => boolean, timeoutMs?: number): Promise<void>;
  /** Resolves with everything once the stream ends. */
  readonly ended: Promise<string>;
}

/** Starts gathering `child.stderr` (which must be piped). */
export function watchStderr(child: Deno.ChildProcess): StderrWatch {
  let text = "";
  let done = false;
  let waiters: Array<() => void> = [];
  const wake = () => {
    const woken = waiters;
    waiters = [];
    for (const waiter of woken) waiter();
  };
  const ended = (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of child.stderr) {
      text += decoder.decode(chunk, { stream: true });
      wake();
    }
    done = true;
    wake();
    return text;
  })();
  return {
    get text() {
      return text;
    },
    async until(predicate, timeoutMs = 30_000) {
      const deadline = Date.now() + timeoutMs;
      while (!done && !predicate(text)) {
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`stderr did not show what was awaited:\n${text}`);
        let timer: ReturnType<typeof setTimeout> | undefined;
        await new Promise<void>((resolve) => {
          waiters.push(resolve);
          timer = setTimeout(resolve, left);
        });
        clearTimeout(timer);
      }
    },
    ended,
  };
}

/**
 * Runs `fn` with a tmpfs of `size` (e.g. "40M") mounted on a new directory
 * in `parent`, unmounted afterwards; a full filesystem for ENOSPC tests.
 * Mounting needs root: without it the test step is reported ignored,
 * unless NBD_INTEROP=require makes that a failure.
 */
export async function withTmpfs(
  t: Deno.TestContext,
  parent: string,
  size: string,
  fn: (mountpoint: string) => Promise<void>,
): Promise<void> {
  const mountpoint = `${parent}/tmpfs`;
  await Deno.mkdir(mountpoint);
  const mounted = await run("mount", ["-t", "tmpfs", "-o", `size=${size}`, "tmpfs", mountpoint]);
  if (mounted.code !== 0) {
    if (INTEROP_REQUIRED) throw new Error(`mount failed: ${mounted.stderr.trim()}`);
    console.error(`\n*** SKIPPING: mount of a tmpfs failed: ${mounted.stderr.trim()} ***\n`);
    await t.step({ name: "tmpfs unavailable", ignore: true, fn() {} });
    return;
  }
  try {
    await fn(mountpoint);
  } finally {
    await run("umount", [mountpoint]);
  }
}

/**
 * Runs `fn` with a loop device backed by the file `backing` (read-only with
 * `readOnly`), detached afterwards. Loop devices need root and the loop
 * driver: without them the test step is reported ignored, unless
 * NBD_INTEROP=require makes that a failure.
 */
export async function withLoopDevice(
  t: Deno.TestContext,
  backing: string,
  fn: (device: string) => Promise<void>,
  options: { readOnly?: boolean } = {},
): Promise<void> {
  const attached = await run("losetup", [
    ...(options.readOnly ? ["-r"] : []),
    "-f",
    "--show",
    backing,
  ]);
  if (attached.code !== 0) {
    if (INTEROP_REQUIRED) throw new Error(`losetup failed: ${attached.stderr.trim()}`);
    console.error(`\n*** SKIPPING: losetup failed: ${attached.stderr.trim()} ***\n`);
    await t.step({ name: "loop device unavailable", ignore: true, fn() {} });
    return;
  }
  const device = attached.stdout.trim();
  try {
    await fn(device);
  } finally {
    await runOk("losetup", ["-d", device]);
  }
}

/**
 * Asserts how `nbd copy` ended on a full filesystem: status 1, one line
 * naming the destination `out`, the write offset and ENOSPC, and nothing
 * left in `dir` (the mount point), not even the temporary file.
 */
export function assertCopyFailedFull(result: RunResult, out: string, dir: string): void {
  assertEquals(result.code, 1, result.stderr);
  const lines = result.stderr.trim().split("\n");
  assertEquals(lines.length, 1, result.stderr);
  const pattern = new RegExp(
    `^nbd: copy failed: destination ${out}: write at offset (\\d+) failed: ` +
      `ENOSPC \\(no space left on device\\); ${out} was not created$`,
  );
  assertOk(pattern.exec(lines[0]!), lines[0]);
  assertEquals([...Deno.readDirSync(dir)], [], "not even a temporary file");
}

/**
 * Runs `nbd ARGS` as the unprivileged user nobody (uid 65534) through
 * setpriv, so that file permissions apply. `dir` must be a directory
 * nobody may enter: Deno's cache and a copy of the runtime go there.
 */
export async function runNbdAsNobody(dir: string, args: string[]): Promise<RunResult> {
  await Deno.chmod(dir, 0o755);
  const denoDir = `${dir}/deno-dir`;
  await Deno.mkdir(denoDir, { recursive: true });
  await Deno.chmod(denoDir, 0o777);
  const deno = `${dir}/deno`;
  await Deno.copyFile(Deno.execPath(), deno);
  await Deno.chmod(deno, 0o755);
  return await run("setpriv", [
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "env",
    `DENO_DIR=${denoDir}`,
    `HOME=${denoDir}`,
    deno,
    "run",
    "-A",
    "--quiet",
    `${ROOT}/main.ts`,
    ...args,
  ]);
}

/** The sendfile calls a server made while `body` ran: [start, end) of the file for each. */
export async function sendfileRanges(
  server: ServerProcess,
  body: () => Promise<void>,
): Promise<Array<[number, number]>> {
  await using dir = await tempDir("nbd-strace");
  const log = `${dir.path}/strace.log`;
  const strace = new Deno.Command("strace", {
    args: ["-f", "-e", "trace=sendfile", "-o", log, "-p", String(server.child.pid)],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const reader = strace.stderr.getReader();
  let said = "";
  while (!said.includes("attached")) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`strace failed: ${said}`);
    said += new TextDecoder().decode(value);
  }
  try {
    await body();
  } finally {
    strace.kill("SIGINT");
    reader.releaseLock();
    await strace.stderr.cancel().catch(() => {});
    await strace.status;
  }
  const ranges: Array<[number, number]> = [];
  for (const match of (await Deno.readTextFile(log)).matchAll(/\[(\d+)\] => \[(\d+)\]/g)) {
    ranges.push([Number(match[1]), Number(match[2])]);
  }
  return ranges;
}
