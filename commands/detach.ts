/**
 * `nbd detach [--hard] DEVICE|URI`: ends an attachment. Soft by default:
 * refuses while the device is in use (mounted, held, open), otherwise
 * flushes it through to the server, detaches the loop device and stops the
 * serving process. `--hard` detaches regardless; whoever still uses the
 * device gets I/O errors.
 *
 * @module
 */

import { linuxOnly } from "../io/platform.ts";
import {
  describeUsers,
  detachLoop,
  deviceName,
  deviceUsers,
  flushDevice,
  inUse,
  loopBackingFile,
} from "../mount/loop_device.ts";
import {
  controlRequest,
  listSessions,
  removeSessionDir,
  type SessionEntry,
  waitForExit,
} from "../mount/registry.ts";
import { absoluteUri, requireMountPrivilege } from "../mount/session.ts";
import * as sys from "../io/libc.ts";
import { isNbdUri } from "../protocol/uri.ts";
import { UsageError } from "../util/usage_error.ts";
import { type Command, formatOptions, parseOptions, printError } from "./command.ts";
import { writeStdout } from "./output.ts";

const OPTIONS = {
  hard: { type: "boolean", help: "detach even if the device is in use" },
  wait: {
    type: "string",
    value: "SECONDS",
    help: "how long to wait for the serving process (default 60)",
  },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const USAGE = `Usage: nbd detach [OPTIONS] DEVICE|URI

End an attachment made by "nbd attach". By default the detach is soft: it
is refused while the device is in use (mounted, held by device-mapper, or
open in a process), and otherwise the device's cached writes are flushed
through to the server before the loop device is detached and the serving
process stops. With --hard it goes ahead anyway: whoever still uses the
device gets I/O errors.

Options:
${formatOptions(OPTIONS)}

Examples:
  nbd detach /dev/loop3
  nbd detach nbd://server/disk
  nbd detach --hard loop3
`;

/** Finds the attachment an argument names: a device (/dev/loop3, loop3) or a URI. */
function findAttachment(target: string, sessions: SessionEntry[]): SessionEntry {
  const attachments = sessions.filter((s) => s.record.kind === "attach");
  let matches: SessionEntry[];
  if (isNbdUri(target)) {
    const uri = absoluteUri(target);
    matches = attachments.filter((s) => s.record.uri === uri || s.record.uri === target);
  } else {
    const name = deviceName(target);
    matches = attachments.filter((s) => s.record.device && deviceName(s.record.device) === name);
  }
  if (matches.length === 1) return matches[0]!;
  if (matches.length > 1) {
    throw new Error(
      `Cannot detach ${target}: it is attached more than once (${
        matches.map((s) => s.record.device).join(", ")
      }); name the device`,
    );
  }
  throw new Error(`Cannot detach ${target}: not attached by nbd attach (see "nbd attached")`);
}

/** Cleans up after a serving process that died: loop device, mount, record. */
async function cleanUpDead(entry: SessionEntry): Promise<void> {
  const { device, file, mountpoint } = entry.record;
  const backing = device ? loopBackingFile(device) : undefined;
  if (device && backing !== undefined && backing.startsWith(file)) {
    await detachLoop(device).catch((error) => printError((error as Error).message));
  }
  await sys.umount2(mountpoint, sys.MNT_DETACH);
  await removeSessionDir(entry.dir);
}

/** The `nbd detach` command. */
export const detachCommand: Command = {
  name: "detach",
  summary: "detach an attached export (soft, or --hard)",
  usage: USAGE,
  options: OPTIONS,
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseOptions(argv, OPTIONS);
    if (values.help) {
      await writeStdout(USAGE);
      return 0;
    }
    const refusal = linuxOnly("detach", "there are no attached devices on this system");
    if (refusal) throw new Error(refusal);
    if (positionals.length !== 1) {
      throw new UsageError("detach needs a DEVICE or URI (see --help)");
    }
    const waitSeconds = values.wait === undefined ? 60 : Number(values.wait);
    if (!Number.isFinite(waitSeconds) || waitSeconds < 0) {
      throw new UsageError(`--wait: expected seconds, got "${values.wait}"`);
    }
    const target = positionals[0]!;
    const hard = values.hard ?? false;
    requireMountPrivilege(`detach ${target}`);
    const entry = findAttachment(target, await listSessions());
    const { device, pid } = entry.record;
    if (!entry.alive) {
      await cleanUpDead(entry);
      printError(`the process serving ${device} had died; cleaned up its device and mount`);
      return 0;
    }
    const users = deviceUsers(device!, [Deno.pid, pid]);
    if (inUse(users) && !hard) {
      throw new Error(
        `Cannot detach ${device}: it is in use (${describeUsers(users)}); ` +
          `unmount or close it first, or use --hard`,
      );
    }
    if (!inUse(users)) {
      // Cached writes of the block device go to the file, then FLUSH to the server.
      await flushDevice(device!);
    }
    await detachLoop(device!);
    const reply = await controlRequest(entry.dir, { op: "stop", hard });
    if (!reply.ok) throw new Error(`Cannot detach ${device}: ${reply.error}`);
    if (!(await waitForExit(pid, waitSeconds * 1000))) {
      throw new Error(
        `detached ${device}, but its process ${pid} is still running after ${waitSeconds} s`,
      );
    }
    if (inUse(users)) {
      printError(
        `${device} was in use (${describeUsers(users)}); it is cut off from the export ` +
          `and will disappear once its last user lets go`,
      );
    }
    return 0;
  },
};
