/**
 * `[ CMD ARGS ... ]` endpoints: an NBD server started for the copy by
 * systemd-style socket activation, then stopped afterwards. We create the
 * listening Unix socket in a private directory and hand it to the command
 * as file descriptor 3 with LISTEN_FDS=1 and LISTEN_PID set to its pid,
 * which nbdkit, qemu-nbd and `nbd serve` all understand. The socket is
 * listening before the server starts, so there is nothing to poll for.
 *
 * The server runs in its own session, so a Ctrl-C aimed at the copy does
 * not kill it under our feet: the copy stops cleanly, then stops it.
 *
 * @module
 */

import { type ChildProcess, spawn } from "node:child_process";
import { closeFd, listenUnixFd } from "../io/libc.ts";
import { linuxOnly } from "../io/platform.ts";
import { selfCommand } from "../util/self_command.ts";
import { registerCleanup } from "./cleanup.ts";
import type { NbdTimeouts, Role } from "./endpoint.ts";
import { NbdEndpoint } from "./nbd.ts";

/** Sets the activation variables in the shell that then execs the server, keeping its pid. */
const ACTIVATE = 'LISTEN_PID=$$; LISTEN_FDS=1; export LISTEN_PID LISTEN_FDS; exec "$@"';

/** How long a server that dropped the connection gets to report its own exit status. */
const EXIT_WAIT_MS = 1000;

/** How long a server gets to exit after SIGTERM before SIGKILL. */
const STOP_GRACE_MS = 5000;

/** A running server process with its socket. */
export interface ActivatedServer {
  /** URI of the server's socket. */
  uri: string;
  /** Resolves with a description of how the process ended. */
  exited: Promise<string>;
  /** Whether `stop()` was called (so an exit is ours, not the server's own). */
  readonly stopping: boolean;
  /** Stops the server (SIGTERM, then SIGKILL) and removes its directory. */
  stop(): Promise<void>;
}

/** Whether an executable `name` is on PATH. */
function onPath(name: string): boolean {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      const info = Deno.statSync(`${dir || "."}/${name}`);
      if (info.isFile && ((info.mode ?? 0o111) & 0o111) !== 0) return true;
    } catch {
      // not there
    }
  }
  return false;
}

/**
 * `[ nbd ... ]` runs the `nbd` on PATH, or this same program when there is
 * none (run from a checkout without a wrapper), so the example commands
 * work however `nbd` was started.
 */
function resolveServerCommand(argv: string[]): string[] {
  if (argv[0] !== "nbd" || onPath("nbd")) return argv;
  const [command, args] = selfCommand(argv.slice(1));
  return [command, ...args];
}

function describeExit(code: number | null, signal: string | null): string {
  return signal ? `was killed by ${signal}` : `exited with status ${code}`;
}

/** Starts `argv` with a listening socket on fd 3. */
export async function startActivatedServer(argv: string[]): Promise<ActivatedServer> {
  if (argv.length === 0) throw new Error("the server command between [ and ] is empty");
  // Handing a listening socket to a child needs its descriptor, which only libc gives.
  const refusal = linuxOnly(
    "[ CMD ] (a server started by socket activation)",
    "start the server yourself and give its URI instead",
  );
  if (refusal) throw new Error(refusal);
  const dir = await Deno.makeTempDir({ prefix: "nbd-copy-" });
  const socket = `${dir}/sock`;
  let fd: number;
  try {
    fd = listenUnixFd(socket);
  } catch (error) {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    throw new Error(`Cannot start [ ${argv.join(" ")} ]: ${(error as Error).message}`);
  }
  let child: ChildProcess;
  try {
    // The server's output goes to our stderr: our stdout may be the copy's destination.
    child = spawn("sh", ["-c", ACTIVATE, "sh", ...resolveServerCommand(argv)], {
      stdio: ["ignore", 2, "inherit", fd],
      detached: true,
    });
  } finally {
    // The child has its own copy; ours would keep the socket open after it exits.
    closeFd(fd);
  }
  // If we are killed before the orderly stop, the server must not outlive us.
  const unregister = registerCleanup(() => {
    child.kill("SIGTERM");
    Deno.removeSync(dir, { recursive: true });
  });
  const exited = new Promise<string>((resolve) => {
    child.on("exit", (code, signal) => resolve(describeExit(code, signal)));
    child.on("error", (error) => resolve(`could not be started: ${error.message}`));
  });
  let stopped: Promise<void> | undefined;
  const stop = () =>
    stopped ??= (async () => {
      server.stopping = true;
      if (child.exitCode === null && child.signalCode === null) {
        try {
          child.kill("SIGTERM");
        } catch { /* already gone */ }
        const timer = setTimeout(() => {
          try {
            child.kill("SIGKILL");
          } catch { /* already gone */ }
        }, STOP_GRACE_MS);
        await exited;
        clearTimeout(timer);
      }
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      unregister();
    })();
  const server = { uri: `nbd+unix:///?socket=${socket}`, exited, stop, stopping: false };
  return server;
}

/** Starts the server and connects to it; the endpoint stops the server when closed. */
export async function openCommandEndpoint(
  argv: string[],
  role: Role,
  options: { connections?: number; signal?: AbortSignal; timeouts?: NbdTimeouts },
): Promise<NbdEndpoint> {
  const server = await startActivatedServer(argv);
  // Interrupted while connecting: stopping the server makes the connection attempt fail.
  const onAbort = () => void server.stop();
  options.signal?.addEventListener("abort", onAbort);
  const name = `[ ${argv.join(" ")} ]`;
  const opening = NbdEndpoint.open(name, server.uri, role, {
    connections: options.connections,
    cleanup: server.stop,
    timeouts: options.timeouts,
    signal: options.signal,
  });
  const died = server.exited.then((how): Promise<never> => {
    // Stopped by us (e.g. closing a read-only destination): the other side explains why.
    if (server.stopping) return new Promise<never>(() => {});
    throw new Error(`the server command ${name} ${how} before serving the copy`);
  });
  try {
    return await Promise.race([opening, died]);
  } catch (error) {
    // Whichever lost the race must not leak a connection or a process.
    opening.then((endpoint) => endpoint.close(), () => {});
    died.catch(() => {});
    // A server that is exiting by itself (bad arguments, missing file) closes the
    // socket first: how it exited explains the failure better than the lost connection.
    let how: string | undefined;
    if (!server.stopping) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      how = await Promise.race([
        server.exited,
        new Promise<undefined>((resolve) =>
          timer = setTimeout(() => resolve(undefined), EXIT_WAIT_MS)
        ),
      ]);
      clearTimeout(timer);
      // Stopped by us meanwhile (an interrupt): the exit says nothing about the failure.
      if (server.stopping) how = undefined;
    }
    await server.stop();
    if (how !== undefined) {
      throw new Error(`the server command ${name} ${how} before serving the copy`);
    }
    throw error;
  } finally {
    options.signal?.removeEventListener("abort", onAbort);
  }
}
