/**
 * Loop devices over the mounted file: attach and detach with losetup(8),
 * and find out who uses a device (mounts, holders such as device-mapper,
 * processes with it open) so a soft detach can refuse with a clear reason.
 *
 * losetup runs as a child process on purpose: attaching and scanning
 * partitions reads the device, and those reads must be answered by this
 * process's FUSE server, which a blocking call here would stall.
 *
 * @module
 */

import * as sys from "../io/libc.ts";
import { unescapeMountField } from "./registry.ts";

/** Options of `attachLoop`. */
export interface AttachLoopOptions {
  /** Attach read-only. */
  readOnly?: boolean;
  /** Logical sector size (512 by default; the export's minimum block size if larger). */
  sectorSize?: number;
  /** Scan the partition table (devices such as /dev/loop3p1). */
  partitions?: boolean;
  /**
   * Direct I/O on the file (default true): one page cache (the device's)
   * instead of two, and the loop driver's requests reach the file in
   * parallel rather than one write at a time.
   */
  directIo?: boolean;
}

async function losetup(args: string[]): Promise<string> {
  let output: Deno.CommandOutput;
  try {
    output = await new Deno.Command("losetup", {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new Error("Cannot attach a loop device: losetup is not installed (util-linux)");
    }
    throw error;
  }
  const stderr = new TextDecoder().decode(output.stderr).trim();
  if (!output.success) {
    throw new Error(stderr.replace(/^losetup: /, "") || `losetup exited ${output.code}`);
  }
  return new TextDecoder().decode(output.stdout).trim();
}

/** Attaches `file` to the first free loop device; resolves to its path, e.g. /dev/loop3. */
export async function attachLoop(file: string, options: AttachLoopOptions = {}): Promise<string> {
  const args = ["--find", "--show"];
  if (options.readOnly) args.push("--read-only");
  if (options.partitions ?? true) args.push("--partscan");
  if (options.directIo ?? true) args.push("--direct-io=on");
  if (options.sectorSize && options.sectorSize > 512) {
    args.push("--sector-size", String(options.sectorSize));
  }
  args.push(file);
  try {
    return await losetup(args);
  } catch (error) {
    throw new Error(`Cannot attach a loop device: ${(error as Error).message}`);
  }
}

/**
 * Detaches a loop device. If something still has it open, the kernel
 * detaches it automatically once the last user closes it.
 */
export async function detachLoop(device: string): Promise<void> {
  try {
    await losetup(["--detach", device]);
  } catch (error) {
    throw new Error(`Cannot detach ${device}: ${(error as Error).message}`);
  }
}

/** "loop3" for "/dev/loop3". */
export function deviceName(device: string): string {
  return device.replace(/^\/dev\//, "");
}

/** The file a loop device is attached to, or undefined if it is free. */
export function loopBackingFile(device: string): string | undefined {
  try {
    return Deno.readTextFileSync(`/sys/block/${deviceName(device)}/loop/backing_file`).trim();
  } catch {
    return undefined;
  }
}

/** The device and its partitions: name → "major:minor". */
function deviceNumbers(device: string): Map<string, string> {
  const name = deviceName(device);
  const numbers = new Map<string, string>();
  const base = `/sys/block/${name}`;
  try {
    numbers.set(name, Deno.readTextFileSync(`${base}/dev`).trim());
    for (const entry of Deno.readDirSync(base)) {
      if (entry.name.startsWith(name + "p")) {
        try {
          numbers.set(entry.name, Deno.readTextFileSync(`${base}/${entry.name}/dev`).trim());
        } catch { /* vanished */ }
      }
    }
  } catch { /* not a block device */ }
  return numbers;
}

/** Who uses a block device. */
export interface DeviceUsers {
  /** Mountpoints of the device or its partitions (this mount namespace). */
  mounts: string[];
  /** Devices stacked on it (device-mapper, md...). */
  holders: string[];
  /** Processes with it open: "pid (command)". */
  processes: string[];
  /** The kernel reports it claimed (mounted or held, perhaps in another namespace). */
  claimed: boolean;
}

/** Whether anything uses the device. */
export function inUse(users: DeviceUsers): boolean {
  return users.mounts.length > 0 || users.holders.length > 0 || users.processes.length > 0 ||
    users.claimed;
}

/** Describes the users for an error message, e.g. "mounted on /mnt/x; open by 123 (dd)". */
export function describeUsers(users: DeviceUsers): string {
  const parts: string[] = [];
  if (users.mounts.length) parts.push(`mounted on ${users.mounts.join(", ")}`);
  if (users.holders.length) parts.push(`held by ${users.holders.join(", ")}`);
  if (users.processes.length) parts.push(`open by ${users.processes.join(", ")}`);
  if (parts.length === 0 && users.claimed) parts.push("claimed by the kernel (mounted elsewhere?)");
  return parts.join("; ");
}

/**
 * Finds the users of a loop device and its partitions. Processes listed in
 * `ignorePids` (e.g. this one) are not counted.
 */
export function deviceUsers(device: string, ignorePids: number[] = [Deno.pid]): DeviceUsers {
  const numbers = deviceNumbers(device);
  const names = new Set([...numbers.keys()].map((n) => `/dev/${n}`));
  const devs = new Set(numbers.values());
  const users: DeviceUsers = { mounts: [], holders: [], processes: [], claimed: false };
  try {
    for (const line of Deno.readTextFileSync("/proc/self/mountinfo").split("\n")) {
      const fields = line.split(" ");
      if (fields.length > 4 && devs.has(fields[2]!)) {
        users.mounts.push(unescapeMountField(fields[4]!));
      }
    }
  } catch { /* no /proc */ }
  for (const name of numbers.keys()) {
    const dir = name === deviceName(device)
      ? `/sys/block/${name}/holders`
      : `/sys/block/${deviceName(device)}/${name}/holders`;
    try {
      for (const entry of Deno.readDirSync(dir)) users.holders.push(entry.name);
    } catch { /* none */ }
  }
  try {
    for (const proc of Deno.readDirSync("/proc")) {
      if (!/^\d+$/.test(proc.name)) continue;
      const pid = Number(proc.name);
      if (ignorePids.includes(pid)) continue;
      let found = false;
      try {
        for (const fd of Deno.readDirSync(`/proc/${pid}/fd`)) {
          try {
            if (names.has(Deno.readLinkSync(`/proc/${pid}/fd/${fd.name}`))) {
              found = true;
              break;
            }
          } catch { /* closed meanwhile */ }
        }
      } catch { /* gone, or not ours to read */ }
      if (found) {
        let command = "?";
        try {
          command = Deno.readTextFileSync(`/proc/${pid}/comm`).trim();
        } catch { /* gone */ }
        users.processes.push(`${pid} (${command})`);
      }
    }
  } catch { /* no /proc */ }
  // An exclusive open fails with EBUSY while the kernel has the device
  // claimed, which also catches mounts in other mount namespaces.
  for (const name of names) {
    try {
      const fd = sys.openFd(name, sys.O_RDONLY | sys.O_EXCL);
      if (fd !== undefined) sys.closeFd(fd);
    } catch (error) {
      if ((error as sys.SyscallError).errno === sys.EBUSY) users.claimed = true;
    }
  }
  return users;
}

/** Writes the device's cached data through to the file behind it (fsync). */
export async function flushDevice(device: string): Promise<void> {
  const file = await Deno.open(device, { read: true });
  try {
    await file.sync();
  } finally {
    file.close();
  }
}
