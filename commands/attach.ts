/**
 * `nbd attach [OPTIONS] URI`: the export as a loop block device. The export
 * is mounted privately over FUSE and a loop device attached to the file; a
 * background process serves it until `nbd detach`. Prints the device.
 *
 * @module
 */

import { linuxOnly } from "../io/platform.ts";
import { startDaemon } from "../mount/daemon.ts";
import { sessionDir } from "../mount/registry.ts";
import { MountSession, requireMountPrivilege } from "../mount/session.ts";
import { UsageError } from "../util/usage_error.ts";
import { type Command, formatOptions, parseOptions } from "./command.ts";
import { MOUNT_OPTIONS, mountFlags, mountUri, onTerminate, signalReadyFd } from "./mount.ts";
import { writeStdout } from "./output.ts";
import { TLS_OPTIONS, TLS_USAGE } from "./tls_options.ts";

const OWN_OPTIONS = {
  foreground: {
    type: "boolean",
    help:
      "serve in the foreground (until SIGINT/SIGTERM or nbd detach), logging to stderr; for service managers",
  },
  // The background process started by "nbd attach".
  daemon: { type: "boolean", hidden: true },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const OPTIONS = { ...MOUNT_OPTIONS, ...OWN_OPTIONS, ...TLS_OPTIONS } as const;

const USAGE = `Usage: nbd attach [OPTIONS] URI

Attach an NBD export as a local block device, without the kernel's NBD
module: the export is mounted privately over FUSE and a loop device is
attached to it (with partition scanning, so /dev/loopNpM appear too).
Prints the device, e.g. /dev/loop3, once it is usable, and keeps serving it
in the background until "nbd detach". "nbd attached" lists attachments with
their I/O counters. Needs root (CAP_SYS_ADMIN) and losetup.

Options:
${formatOptions({ ...MOUNT_OPTIONS, ...OWN_OPTIONS })}

${TLS_USAGE}

Examples:
  dev=$(nbd attach nbd://server/disk)
  mkfs.ext4 "$dev" && mount "$dev" /mnt
  umount /mnt && nbd detach "$dev"
`;

/** The `nbd attach` command. */
export const attachCommand: Command = {
  name: "attach",
  summary: "attach an export as a loop block device (no kernel NBD module)",
  usage: USAGE,
  options: OPTIONS,
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseOptions(argv, OPTIONS);
    if (values.help) {
      await writeStdout(USAGE);
      return 0;
    }
    const refusal = linuxOnly(
      "attach (loop devices)",
      "serve the export to the system's own NBD client (WNBD on Windows) or copy it with `nbd copy URI FILE` instead",
    );
    if (refusal) throw new Error(refusal);
    if (positionals.length !== 1) throw new UsageError("attach needs exactly one URI (see --help)");
    const flags = mountFlags(values);
    requireMountPrivilege("attach a device");
    if (!values.foreground && !values.daemon) {
      const start = await startDaemon(["attach", "--daemon", ...argv]);
      if (!start.ready) {
        // The background process reported its own error lines.
        await Deno.stderr.write(new TextEncoder().encode(start.stderr));
        return start.code;
      }
      await writeStdout(start.line + "\n");
      signalReadyFd(flags.readyFd, start.line);
      return 0;
    }
    return await serveAttachment(positionals[0]!, values, flags, values.daemon ?? false);
  },
};

/** The attachment itself: in the foreground, or as the background process. */
async function serveAttachment(
  uri: string,
  values: Parameters<typeof mountUri>[1],
  flags: ReturnType<typeof mountFlags>,
  daemon: boolean,
): Promise<number> {
  // In the background, stdout/stderr belong to "nbd attach", which stops
  // reading once ready: after that, messages go to the session's log file.
  let logFile: string | undefined;
  const log = (message: string) => {
    const line = `nbd: ${message}`;
    if (!logFile) console.error(line);
    else {
      try {
        Deno.writeTextFileSync(logFile, `${new Date().toISOString()} ${line}\n`, { append: true });
      } catch { /* nowhere left to report */ }
    }
  };
  const terminate = onTerminate();
  try {
    const session = await MountSession.start({
      uri: mountUri(uri, values),
      attach: true,
      readOnly: flags.readOnly,
      connections: flags.connections,
      timeoutSeconds: flags.timeoutMs / 1000,
      connectTimeout: flags.connectTimeout,
      verbose: flags.verbose,
      log,
    });
    const device = session.record.device!;
    await writeStdout(device + "\n");
    if (daemon) {
      logFile = `${sessionDir()}/log`;
      log(`attached ${session.record.uri} as ${device} (${session.describe()})`);
      // Like any daemon, do not keep the caller's directory busy.
      Deno.chdir("/");
    } else {
      signalReadyFd(flags.readyFd, device);
    }
    let hard = true;
    try {
      const why = await Promise.race([
        terminate.signal,
        session.unmounted.then(() => "unmounted"),
        session.stopRequested.then((h) => {
          hard = h;
          return "detach";
        }),
      ]);
      log(`${why}: detaching ${device}`);
    } finally {
      await session.stop({ hard });
    }
    return 0;
  } catch (error) {
    if (logFile) log((error as Error).message);
    throw error;
  } finally {
    terminate.dispose();
  }
}
