/**
 * The `tmpdisk` plugin: every connection gets its own fresh, empty,
 * formatted scratch disk. On each connection a sparse temporary file of
 * the given size is made and formatted (`mkfs -t TYPE`, or a script of
 * your own), opened, and unlinked at once: it is gone when the connection
 * closes (or the server exits, however it exits).
 *
 * ```
 * nbd serve tmpdisk 1G
 * nbd serve tmpdisk size=10G type=xfs label=SCRATCH
 * nbd serve tmpdisk 1G command='mkfs.ext4 -q -F -E lazy_itable_init=1 "$disk"'
 * ```
 *
 * @module
 */

import * as fs from "node:fs";
import { NbdError } from "../protocol/errors.ts";
import { completeBackend, type OpenContext, type Plugin } from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";
import { fileBackend } from "./file.ts";
import { findOnPath } from "../util/which.ts";

/** The script run when no command= is given, with $disk, $type, $label and $size set. */
const DEFAULT_COMMAND = 'mkfs -t "$type" ${label:+-L "$label"} "$disk"';

/** Makes, formats, opens and unlinks one scratch disk: its open descriptor. */
async function makeDisk(
  tmpdir: string,
  size: number,
  command: string,
  env: Record<string, string>,
): Promise<number> {
  const disk = await Deno.makeTempFile({ dir: tmpdir, prefix: "nbd-tmpdisk-", suffix: ".img" });
  try {
    await Deno.truncate(disk, size);
    const out = await new Deno.Command("/bin/sh", {
      args: ["-c", command],
      env: { ...env, disk, size: String(size) },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (!out.success) {
      const text = new TextDecoder().decode(out.stderr) + new TextDecoder().decode(out.stdout);
      const reason = text.trim().split("\n").filter(Boolean).pop() ?? `exit status ${out.code}`;
      throw new NbdError("EIO", `tmpdisk: formatting the disk failed: ${reason}`);
    }
    return fs.openSync(disk, "r+");
  } finally {
    await Deno.remove(disk).catch(() => {});
  }
}

/** The tmpdisk plugin. */
export const tmpdiskPlugin: Plugin = {
  name: "tmpdisk",
  summary: "a fresh, empty, formatted scratch disk for each connection, deleted at disconnect",
  description:
    "Examples:\n  nbd serve tmpdisk 1G\n  nbd serve tmpdisk size=10G type=xfs label=SCRATCH",
  params: [
    { name: "size", value: "SIZE", type: "size", description: "disk size", required: true },
    {
      name: "type",
      value: "TYPE",
      type: "string",
      default: "ext4",
      description: "filesystem type for mkfs -t",
    },
    { name: "label", value: "TEXT", type: "string", description: "filesystem label" },
    {
      name: "command",
      value: "SCRIPT",
      type: "string",
      description: "shell script that formats $disk instead of mkfs ($size, $type, $label set)",
    },
  ],
  magicParam: "size",
  create(params) {
    const size = params.takeSize("size")!;
    if (size < 512) throw new UsageError("tmpdisk: size must be at least 512 bytes");
    const type = params.take("type") ?? "ext4";
    if (!/^[a-z0-9][a-z0-9._-]*$/i.test(type)) {
      throw new UsageError(`tmpdisk: "${type}" is not a filesystem type`);
    }
    const label = params.take("label") ?? "";
    const command = params.take("command");
    if (command === undefined && !findOnPath(`mkfs.${type}`)) {
      throw new Error(`tmpdisk: mkfs.${type} not found on PATH (is type=${type} right?)`);
    }
    const tmpdir = Deno.env.get("TMPDIR") || "/var/tmp";
    const env = { type, label };
    return Promise.resolve({
      async open(context: OpenContext) {
        const fd = await makeDisk(tmpdir, size, command ?? DEFAULT_COMMAND, env);
        // The backend opens the disk again for itself; then only it holds the file.
        let backend;
        try {
          backend = fileBackend(`/proc/self/fd/${fd}`, context.readonly);
        } finally {
          fs.closeSync(fd);
        }
        const capabilities = backend.capabilities?.() ?? {};
        return completeBackend({
          ...backend,
          // Each connection has its own disk: nothing to be coherent with.
          capabilities: () => ({ ...capabilities, multiConn: false }),
        });
      },
    });
  },
};
