/**
 * `nbd mount [OPTIONS] URI MOUNTPOINT`: an export as a regular file over
 * FUSE (like nbdfuse), served in the foreground until SIGINT/SIGTERM or
 * `nbd umount MOUNTPOINT`. Also the option parsing `nbd attach` shares.
 *
 * @module
 */

import { linuxOnly } from "../io/platform.ts";
import { formatSize } from "../util/parse.ts";
import { UsageError } from "../util/usage_error.ts";
import { DEFAULT_TIMEOUT_MS } from "../mount/export_file.ts";
import { MountSession, requireMountPrivilege } from "../mount/session.ts";
import * as sys from "../io/libc.ts";
import { type Command, formatOptions, parseOptions } from "./command.ts";
import { writeStdout } from "./output.ts";
import { TLS_OPTIONS, TLS_USAGE, type TlsFlags, withTlsFlags } from "./tls_options.ts";
import { CLIENT_OPTIONS, clientTimeouts } from "./client_options.ts";
import { Interrupted, terminationSignal, whenAborted } from "../util/signals.ts";

/** Options `nbd mount` and `nbd attach` share. */
export const MOUNT_OPTIONS = {
  readonly: {
    type: "boolean",
    short: "r",
    help: "read-only (also when the server only allows reading)",
  },
  connections: {
    type: "string",
    short: "C",
    value: "N",
    help: "NBD connections when the server allows multi-conn (default 4)",
  },
  timeout: CLIENT_OPTIONS.timeout,
  "request-timeout": {
    ...CLIENT_OPTIONS["request-timeout"],
    help: `fail a connection's requests with EIO after SECONDS without a reply (default ${
      DEFAULT_TIMEOUT_MS / 1000
    }; 0 = never)`,
  },
  "ready-fd": {
    type: "string",
    value: "N",
    help: "also write the ready line to file descriptor N, then close it",
  },
  verbose: { type: "boolean", short: "v", help: "log every failed request to stderr" },
} as const;

const OWN_OPTIONS = {
  name: {
    type: "string",
    value: "NAME",
    help: "name of the file in a directory mount (default disk)",
  },
  "allow-other": {
    type: "boolean",
    help: "let other users open the file (default: only the mounting user)",
  },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const OPTIONS = { ...MOUNT_OPTIONS, ...OWN_OPTIONS, ...TLS_OPTIONS } as const;

const USAGE = `Usage: nbd mount [OPTIONS] URI MOUNTPOINT

Present an NBD export as a regular file over FUSE, like nbdfuse. If
MOUNTPOINT is a directory the file is MOUNTPOINT/disk; if it is an existing
regular file, the export is mounted over it. Reads, writes, fsync (FLUSH)
and fallocate (--punch-hole: TRIM, --zero-range: WRITE_ZEROES) go to the
server. Stays in the foreground until SIGINT, SIGTERM, SIGHUP or "nbd umount
MOUNTPOINT", and always unmounts on the way out (exit status 0; a second
signal unmounts lazily at once). Needs root (CAP_SYS_ADMIN).

Once the file is usable, one line goes to stdout:
  mounted URI on FILE (SIZE bytes, N connections, read-write)

Options:
${formatOptions({ ...MOUNT_OPTIONS, ...OWN_OPTIONS })}

${TLS_USAGE}

Examples:
  mkdir /tmp/m && nbd mount nbd://server/disk /tmp/m &
  qemu-img info /tmp/m/disk
  nbd umount /tmp/m
  nbd mount -r "nbd+unix:///?socket=/tmp/nbd.sock" ./image.raw   # over an existing file
`;

/** The parsed shared options. */
export interface MountFlags {
  readOnly: boolean;
  connections: number;
  /** Stale-request timeout (--request-timeout). */
  timeoutMs: number;
  /** Connect and handshake timeout in seconds (--timeout). */
  connectTimeout: number;
  readyFd: number | undefined;
  verbose: boolean;
}

/** Turns the shared option values into `MountFlags`. */
export function mountFlags(values: {
  readonly?: boolean;
  connections?: string;
  timeout?: string;
  "request-timeout"?: string;
  "ready-fd"?: string;
  verbose?: boolean;
}): MountFlags {
  let connections = 4;
  if (values.connections !== undefined) {
    connections = Number(values.connections);
    if (!Number.isInteger(connections) || connections < 1 || connections > 64) {
      throw new UsageError(
        `--connections: expected a number from 1 to 64, got "${values.connections}"`,
      );
    }
  }
  let readyFd: number | undefined;
  if (values["ready-fd"] !== undefined) {
    readyFd = Number(values["ready-fd"]);
    if (!Number.isInteger(readyFd) || readyFd < 0) {
      throw new UsageError(
        `--ready-fd: expected a file descriptor number, got "${values["ready-fd"]}"`,
      );
    }
  }
  const timeouts = clientTimeouts(values, DEFAULT_TIMEOUT_MS / 1000);
  return {
    readOnly: values.readonly ?? false,
    connections,
    timeoutMs: timeouts.requestTimeout * 1000,
    connectTimeout: timeouts.timeout,
    readyFd,
    verbose: values.verbose ?? false,
  };
}

/** Applies the TLS flags to the URI. */
export function mountUri(uri: string, flags: TlsFlags): string {
  return withTlsFlags(uri, flags);
}

const encoder = new TextEncoder();

/** Writes `line` to a descriptor the caller passed with --ready-fd, then closes it. */
export function signalReadyFd(fd: number | undefined, line: string): void {
  if (fd === undefined) return;
  const bytes = encoder.encode(line + "\n");
  let done = 0;
  while (done < bytes.length) {
    const n = sys.write(fd, bytes.subarray(done));
    if (n <= 0) break;
    done += n;
  }
  sys.closeFd(fd);
}

/**
 * Resolves with the signal's name on the process's first stop signal
 * (SIGINT, SIGTERM, SIGHUP: util/signals.ts); `dispose` stops waiting.
 */
export function onTerminate(): { signal: Promise<string>; dispose: () => void } {
  const waiting = whenAborted(terminationSignal());
  return {
    signal: waiting.promise.then((reason) =>
      reason instanceof Interrupted ? reason.signal : "stopped"
    ),
    dispose: waiting.dispose,
  };
}

/** A log line on stderr. */
function logToStderr(message: string): void {
  console.error(`nbd: ${message}`);
}

/** The `nbd mount` command. */
export const mountCommand: Command = {
  name: "mount",
  summary: "present an export as a file over FUSE (like nbdfuse)",
  usage: USAGE,
  options: OPTIONS,
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseOptions(argv, OPTIONS);
    if (values.help) {
      await writeStdout(USAGE);
      return 0;
    }
    const refusal = linuxOnly(
      "mount (FUSE)",
      "copy the export to a local file with `nbd copy URI FILE` instead",
    );
    if (refusal) throw new Error(refusal);
    if (positionals.length !== 2) {
      throw new UsageError("mount needs a URI and a MOUNTPOINT (see --help)");
    }
    const flags = mountFlags(values);
    const name = values.name ?? "disk";
    if (name.includes("/") || name === "." || name === ".." || name === "") {
      throw new UsageError(`--name: "${name}" is not a file name`);
    }
    const [uri, mountpoint] = positionals as [string, string];
    requireMountPrivilege(`mount on ${mountpoint}`);
    try {
      const info = await Deno.stat(mountpoint);
      if (!info.isDirectory && !info.isFile) {
        throw new Error(`Cannot mount on ${mountpoint}: not a directory or regular file`);
      }
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) {
        throw new Error(`Cannot mount on ${mountpoint}: no such file or directory`);
      }
      throw error;
    }
    const terminate = onTerminate();
    try {
      const session = await MountSession.start({
        uri: mountUri(uri, values),
        mountpoint,
        readOnly: flags.readOnly,
        connections: flags.connections,
        timeoutSeconds: flags.timeoutMs / 1000,
        connectTimeout: flags.connectTimeout,
        fileName: name,
        allowOther: values["allow-other"] ?? false,
        verbose: flags.verbose,
        log: logToStderr,
      });
      const record = session.record;
      const line = `mounted ${record.uri} on ${record.file} (${session.describe()})`;
      await writeStdout(line + "\n");
      signalReadyFd(flags.readyFd, line);
      try {
        const why = await Promise.race([
          terminate.signal,
          session.unmounted.then(() => "unmounted"),
          session.stopRequested.then(() => "stop"),
        ]);
        if (why !== "unmounted" && flags.verbose) {
          logToStderr(`${why}: unmounting ${record.mountpoint}`);
        }
      } finally {
        await session.stop();
      }
      if (flags.verbose) {
        const stats = session.file.stats();
        logToStderr(
          `unmounted ${record.mountpoint}: ${stats.completed} requests, ${
            formatSize(stats.bytesRead)
          } read, ${formatSize(stats.bytesWritten)} written, ${stats.failed} failed`,
        );
      }
      return 0;
    } finally {
      terminate.dispose();
    }
  },
};
