/**
 * Helpers for the mount and attach tests: running `nbd` with a private
 * session directory, starting `nbd mount` and waiting for its ready line,
 * and making sure nothing stays mounted or attached afterwards (checked,
 * and cleaned up even when a test fails).
 *
 * @module
 */

import { assertEquals } from "./assert.ts";
import { nbdExecutable, run, type RunResult } from "./helpers.ts";

/** Whether this process may mount (root or CAP_SYS_ADMIN). */
export function canMount(): boolean {
  try {
    const hex = /^CapEff:\s*([0-9a-f]+)/m.exec(Deno.readTextFileSync("/proc/self/status"))?.[1];
    return hex !== undefined && (BigInt(`0x${hex}`) & (1n << 21n)) !== 0n;
  } catch {
    return false;
  }
}

/**
 * Test options for tests that mount: skipped loudly without root or
 * /dev/fuse (and failed instead under NBD_INTEROP=require).
 */
export function mountable(): { ignore: boolean } {
  let fuse = false;
  try {
    fuse = Deno.statSync("/dev/fuse").isCharDevice === true;
  } catch { /* missing */ }
  const ok = fuse && canMount();
  if (ok || Deno.env.get("NBD_INTEROP") === "require") return { ignore: false };
  console.error(
    `\n*** SKIPPING mount test: ${
      fuse ? "needs root (CAP_SYS_ADMIN)" : "no /dev/fuse"
    } (set NBD_INTEROP=require to fail) ***\n`,
  );
  return { ignore: true };
}

/** A scratch area for one test: a directory and a private session directory. */
export interface MountScratch extends AsyncDisposable {
  /** Scratch directory (files). */
  dir: string;
  /** An empty directory to mount on. */
  mnt: string;
  /** The NBD_RUN_DIR the commands use. */
  runDir: string;
  /** Runs `nbd ARGS` with this scratch's session directory. */
  nbd(args: string[], stdin?: string): Promise<RunResult>;
  /** Environment for `nbd` processes started directly. */
  env: Record<string, string>;
}

/** Lines of `losetup -a` whose backing file lies under one of `roots`. */
export async function loopsUnder(roots: string[]): Promise<string[]> {
  const out = await run("losetup", ["-a"]);
  return out.stdout.split("\n").filter((line) => roots.some((r) => line.includes(r)));
}

/** Mountpoints under one of `roots` (this mount namespace). */
export function mountsUnder(roots: string[]): string[] {
  const mounts: string[] = [];
  for (const line of Deno.readTextFileSync("/proc/self/mountinfo").split("\n")) {
    const point = line.split(" ")[4];
    if (point && roots.some((r) => point.startsWith(r))) mounts.push(point);
  }
  return mounts;
}

/** Session directories left in a run directory. */
export function sessionsIn(runDir: string): string[] {
  try {
    return [...Deno.readDirSync(runDir)].map((e) => e.name);
  } catch {
    return [];
  }
}

/**
 * Creates a scratch area. Disposing it checks that nothing is left mounted
 * or attached under it (failing the test if so) after cleaning up anyway.
 */
export async function mountScratch(): Promise<MountScratch> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-mount-test" });
  const runDir = `${dir}/run`;
  await Deno.mkdir(runDir);
  const mnt = `${dir}/mnt`;
  await Deno.mkdir(mnt);
  const env = { NBD_RUN_DIR: runDir };
  const nbdPath = await nbdExecutable();
  const nbd = (args: string[], stdin?: string) => run(nbdPath, args, { env, stdin });
  return {
    dir,
    mnt,
    runDir,
    env,
    nbd,
    async [Symbol.asyncDispose]() {
      const roots = [dir];
      const leftMounts = mountsUnder(roots);
      const leftLoops = await loopsUnder(roots);
      const leftSessions = sessionsIn(runDir);
      await cleanUp(roots, runDir, nbd);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      assertEquals(leftMounts, [], "mounts left behind");
      assertEquals(leftLoops, [], "loop devices left behind");
      assertEquals(leftSessions, [], "session records left behind");
    },
  };
}

/** Tears down whatever a failed test left: file systems, attachments, mounts, processes. */
async function cleanUp(
  roots: string[],
  runDir: string,
  nbd: (args: string[]) => Promise<RunResult>,
): Promise<void> {
  // File systems a test mounted on a loop device come off first.
  for (const point of mountsUnder(roots).reverse()) {
    const type = mountType(point);
    if (type && !type.startsWith("fuse")) await run("umount", ["-l", point]);
  }
  for (const name of sessionsIn(runDir)) {
    try {
      const record = JSON.parse(Deno.readTextFileSync(`${runDir}/${name}/state.json`));
      if (record.kind === "attach") await nbd(["detach", "--hard", record.device]);
      else await run("umount", ["-l", record.mountpoint]);
      try {
        Deno.kill(record.pid, "SIGTERM");
      } catch { /* gone */ }
    } catch { /* no record */ }
  }
  for (const line of await loopsUnder(roots)) {
    await run("losetup", ["-d", line.split(":")[0]!]);
  }
  for (const point of mountsUnder(roots).reverse()) await run("umount", ["-l", point]);
}

function mountType(point: string): string | undefined {
  let type: string | undefined;
  for (const line of Deno.readTextFileSync("/proc/self/mountinfo").split("\n")) {
    const fields = line.split(" ");
    if (fields[4] === point) type = fields[fields.indexOf("-") + 1];
  }
  return type;
}

/** A running `nbd mount`. */
export interface MountProcess extends AsyncDisposable {
  /** The ready line. */
  line: string;
  /** Path of the served file. */
  file: string;
  /** The process. */
  child: Deno.ChildProcess;
  /** Its stderr so far. */
  stderr(): string;
  /** Waits for the process to exit; resolves to its exit code. */
  exited(): Promise<number>;
}

/**
 * Starts `nbd mount ARGS` and waits for its ready line. If it exits
 * first, throws with its stderr. Disposing stops it with SIGTERM.
 */
export async function startMount(scratch: MountScratch, args: string[]): Promise<MountProcess> {
  const child = new Deno.Command(await nbdExecutable(), {
    args: ["mount", ...args],
    env: scratch.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const decoder = new TextDecoder();
  let stderr = "";
  const stderrDone = (async () => {
    for await (const chunk of child.stderr) stderr += decoder.decode(chunk, { stream: true });
  })();
  let stdout = "";
  const reader = child.stdout.getReader();
  while (!stdout.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    stdout += decoder.decode(value, { stream: true });
  }
  const stdoutDone = (async () => {
    while (!(await reader.read()).done) { /* drain */ }
  })();
  let status: Promise<Deno.CommandStatus> | undefined;
  const exited = async () => {
    status ??= child.status;
    const s = await status;
    await stderrDone;
    await stdoutDone;
    return s.code;
  };
  if (!stdout.includes("\n")) {
    await exited();
    throw new Error(`nbd mount exited before it was ready:\n${stderr}`);
  }
  const line = stdout.slice(0, stdout.indexOf("\n"));
  const file = / on (.+) \(\d+ bytes/.exec(line)?.[1] ?? "";
  return {
    line,
    file,
    child,
    stderr: () => stderr,
    exited,
    async [Symbol.asyncDispose]() {
      try {
        child.kill("SIGTERM");
      } catch { /* exited */ }
      await exited();
    },
  };
}
