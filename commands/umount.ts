/**
 * `nbd umount MOUNTPOINT`: ends an `nbd mount`. Unmounts, then waits for
 * the serving process to flush and exit, so that when this returns the
 * data is with the server.
 *
 * @module
 */

import { linuxOnly } from "../io/platform.ts";
import { dirname } from "node:path";
import { FUSE_SUBTYPE } from "../mount/fuse_file_server.ts";
import {
  listSessions,
  mountTypeAt,
  removeSessionDir,
  type SessionEntry,
  waitForExit,
} from "../mount/registry.ts";
import { requireMountPrivilege } from "../mount/session.ts";
import * as sys from "../io/libc.ts";
import { UsageError } from "../util/usage_error.ts";
import { type Command, formatOptions, parseOptions } from "./command.ts";
import { writeStdout } from "./output.ts";

const OPTIONS = {
  lazy: {
    type: "boolean",
    short: "l",
    help: "detach the mount even if the file is open; the remaining users get I/O errors",
  },
  wait: {
    type: "string",
    value: "SECONDS",
    help: "how long to wait for the serving process (default 60)",
  },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const USAGE = `Usage: nbd umount [OPTIONS] MOUNTPOINT

Unmount a file system made by "nbd mount" (MOUNTPOINT is the directory, the
file in it, or the file a mount was made over), then wait until the
process serving it has flushed its writes to the server and exited.

Options:
${formatOptions(OPTIONS)}

Examples:
  nbd umount /tmp/m
`;

/** Resolves a path as far as it exists, for matching against mountpoints. */
async function canonical(path: string): Promise<string> {
  try {
    return await Deno.realPath(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new Error(`Cannot unmount ${path}: no such file or directory`);
    }
    // A dead FUSE mount cannot be stat'ed (ENOTCONN); keep the path as given.
    return path.startsWith("/") ? path : `${Deno.cwd()}/${path}`;
  }
}

/** The mountpoint `path` names: itself, or its directory when it is the file in a mount. */
function findMountpoint(path: string, sessions: SessionEntry[]): string | undefined {
  if (mountTypeAt(path) === `fuse.${FUSE_SUBTYPE}`) return path;
  const byFile = sessions.find((s) => s.record.file === path);
  if (byFile && mountTypeAt(byFile.record.mountpoint) === `fuse.${FUSE_SUBTYPE}`) {
    return byFile.record.mountpoint;
  }
  const parent = dirname(path);
  if (parent !== path && mountTypeAt(parent) === `fuse.${FUSE_SUBTYPE}`) return parent;
  return undefined;
}

/** The `nbd umount` command. */
export const umountCommand: Command = {
  name: "umount",
  summary: "unmount an nbd mount and wait for it to finish",
  usage: USAGE,
  options: OPTIONS,
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseOptions(argv, OPTIONS);
    if (values.help) {
      await writeStdout(USAGE);
      return 0;
    }
    const refusal = linuxOnly("umount", "there are no nbd mounts on this system");
    if (refusal) throw new Error(refusal);
    if (positionals.length !== 1) throw new UsageError("umount needs a MOUNTPOINT (see --help)");
    const waitSeconds = values.wait === undefined ? 60 : Number(values.wait);
    if (!Number.isFinite(waitSeconds) || waitSeconds < 0) {
      throw new UsageError(`--wait: expected seconds, got "${values.wait}"`);
    }
    const given = positionals[0]!;
    requireMountPrivilege(`unmount ${given}`);
    const path = await canonical(given);
    const sessions = await listSessions();
    const mountpoint = findMountpoint(path, sessions);
    if (!mountpoint) {
      const type = mountTypeAt(path);
      throw new Error(
        type
          ? `Cannot unmount ${given}: it is a ${type} mount, not one made by nbd mount`
          : `Cannot unmount ${given}: not mounted by nbd mount`,
      );
    }
    const session = sessions.find((s) => s.record.mountpoint === mountpoint);
    if (session?.record.kind === "attach" && session.alive) {
      throw new Error(
        `Cannot unmount ${given}: it belongs to the attachment ${session.record.device}; ` +
          `use "nbd detach ${session.record.device}"`,
      );
    }
    try {
      sys.umount2Sync(mountpoint, values.lazy ? sys.MNT_DETACH : 0);
    } catch (error) {
      const errno = (error as sys.SyscallError).errno;
      if (errno === sys.EBUSY) {
        throw new Error(
          `Cannot unmount ${given}: it is busy (the file is open, perhaps by a loop device; ` +
            `see "losetup -a"); close it first, or use --lazy`,
        );
      }
      throw new Error(`Cannot unmount ${given}: ${sys.errnoText(errno)}`);
    }
    if (session) {
      if (!session.alive) {
        await removeSessionDir(session.dir);
      } else if (!(await waitForExit(session.record.pid, waitSeconds * 1000))) {
        throw new Error(
          `unmounted ${mountpoint}, but its process ${session.record.pid} is still running ` +
            `after ${waitSeconds} s (flushing to a slow server?)`,
        );
      }
    }
    return 0;
  },
};
