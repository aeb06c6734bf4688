/**
 * The `linuxdisk` plugin: an ext2/ext3/ext4 filesystem holding a
 * directory's files. It is made once, when the server starts, by
 * `mke2fs -d DIR` into a sparse temporary file (so e2fsprogs must be
 * installed), which is then served like the `file` plugin serves a file.
 * Writes go to that temporary image, never to the directory. The image
 * is unlinked as soon as it is open, so it disappears when the server
 * exits, however it exits.
 *
 * ```
 * nbd serve linuxdisk /path/to/dir
 * nbd serve linuxdisk dir=/path/to/dir type=ext4 label=ROOT size=+200M
 * ```
 *
 * @module
 */

import * as fs from "node:fs";
import { completeBackend, type OpenContext, type Plugin } from "../core/backend.ts";
import { formatSize, parseSize } from "../util/parse.ts";
import { UsageError } from "../util/usage_error.ts";
import { fileBackend } from "./file.ts";
import { findOnPath } from "../util/which.ts";

const BLOCK = 4096;
const MiB = 1024 * 1024;
/** Filesystem types mke2fs makes. */
const TYPES = ["ext2", "ext3", "ext4"] as const;

/** Bytes the tree under `path` needs: data in whole blocks, plus an inode and a block per directory. */
async function treeBytes(path: string): Promise<{ bytes: number; inodes: number }> {
  let bytes = 0;
  let inodes = 1;
  const walk = async (dir: string) => {
    bytes += BLOCK;
    for await (const entry of Deno.readDir(dir)) {
      inodes++;
      const child = `${dir}/${entry.name}`;
      // The runtime reads names as UTF-8, replacing what is not: such a file cannot be
      // looked at again to size the filesystem.
      if (
        entry.name.includes("\uFFFD") && !(await Deno.lstat(child).then(() => true, () => false))
      ) {
        throw new UsageError(
          `linuxdisk: a name in ${dir} is not valid UTF-8 (read as "${entry.name}"): rename it`,
        );
      }
      if (entry.isDirectory) await walk(child);
      else if (entry.isFile) {
        // Opened, not only looked at: mke2fs would fail on an unreadable file without naming it.
        using file = await Deno.open(child, { read: true });
        bytes += Math.ceil((await file.stat()).size / BLOCK) * BLOCK;
      } else if (entry.isSymlink) bytes += BLOCK;
    }
  };
  await walk(path);
  return { bytes, inodes };
}

/**
 * A size for the filesystem when none is given: the files, room for the
 * metadata (inode tables, bitmaps, the journal of ext3/ext4), and some slack.
 */
function defaultSize(tree: { bytes: number; inodes: number }, type: string): number {
  const journal = type === "ext2" ? 0 : 16 * MiB;
  const estimate = tree.bytes * 1.1 + tree.inodes * 512 + journal + 4 * MiB;
  return Math.ceil(estimate / MiB) * MiB;
}

/** Runs mke2fs; its error output, or undefined when it succeeded. */
async function mke2fs(
  program: string,
  image: string,
  dir: string,
  type: string,
  label: string | undefined,
  inodes: number,
): Promise<string | undefined> {
  const args = ["-q", "-F", "-t", type, "-d", dir];
  if (label !== undefined) args.push("-L", label);
  // Enough inodes for the tree however small the filesystem is.
  args.push("-N", String(inodes + 64), image);
  const out = await new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (out.success) return undefined;
  const text = new TextDecoder().decode(out.stderr) + new TextDecoder().decode(out.stdout);
  return text.trim().split("\n").filter(Boolean).pop() ?? `exit status ${out.code}`;
}

/** The linuxdisk plugin. */
export const linuxdiskPlugin: Plugin = {
  name: "linuxdisk",
  summary: "ext2/ext3/ext4 filesystem made from a directory (mke2fs -d into a temporary image)",
  description: "Needs mke2fs (e2fsprogs). Writes go to the temporary image.\n\nExamples:\n" +
    "  nbd serve linuxdisk /path/to/dir\n" +
    "  nbd serve linuxdisk dir=/path/to/dir type=ext4 label=ROOT size=+200M",
  params: [
    {
      name: "dir",
      value: "PATH",
      type: "path",
      description: "directory to copy in",
      required: true,
    },
    {
      name: "type",
      value: "TYPE",
      type: "enum",
      choices: ["ext2", "ext3", "ext4"],
      default: "ext2",
      description: "filesystem type",
    },
    {
      name: "label",
      value: "TEXT",
      type: "string",
      description: "filesystem label, up to 16 bytes",
    },
    {
      name: "size",
      value: "[+]SIZE",
      type: "string",
      description:
        "filesystem size, or +SIZE of free space beyond the files (when not given: a little)",
    },
  ],
  magicParam: "dir",
  async create(params) {
    const dir = params.take("dir");
    if (dir === undefined) throw new UsageError("linuxdisk: missing required parameter dir=");
    const type = params.take("type") ?? "ext2";
    if (!(TYPES as readonly string[]).includes(type)) {
      throw new UsageError(`linuxdisk: type must be ext2, ext3 or ext4, got "${type}"`);
    }
    const label = params.take("label");
    if (label !== undefined && new TextEncoder().encode(label).length > 16) {
      throw new UsageError("linuxdisk: label is at most 16 bytes");
    }
    const sizeText = params.take("size");
    const extra = sizeText?.startsWith("+") ? parseSize(sizeText.slice(1), "size") : undefined;
    const fixed = sizeText !== undefined && extra === undefined
      ? parseSize(sizeText, "size")
      : undefined;
    const program = findOnPath("mke2fs");
    if (!program) {
      throw new Error(
        "linuxdisk: mke2fs not found on PATH (install e2fsprogs; it is often in /usr/sbin)",
      );
    }
    let tree: { bytes: number; inodes: number };
    try {
      if (!(await Deno.stat(dir)).isDirectory) {
        throw new UsageError(`linuxdisk: ${dir} is not a directory`);
      }
      tree = await treeBytes(dir);
    } catch (error) {
      if (error instanceof UsageError) throw error;
      throw new UsageError(`linuxdisk: cannot read ${dir}: ${(error as Error).message}`);
    }

    const tmpdir = Deno.env.get("TMPDIR") || "/var/tmp";
    const image = await Deno.makeTempFile({
      dir: tmpdir,
      prefix: "nbd-linuxdisk-",
      suffix: ".img",
    });
    let fd: number | undefined;
    try {
      // Without a fixed size, grow and try again when the estimate was short.
      let size = fixed ?? defaultSize(tree, type) + (extra ?? 0);
      for (let attempt = 0;; attempt++) {
        // A sparse file: mke2fs writes only the metadata and the files' blocks.
        await Deno.truncate(image, 0);
        await Deno.truncate(image, size);
        const failure = await mke2fs(program, image, dir, type, label, tree.inodes);
        if (failure === undefined) break;
        const full = /space|could not allocate|too small|no free|Could not allocate/i.test(failure);
        if (fixed !== undefined || !full || attempt >= 4) {
          throw new Error(
            `linuxdisk: mke2fs failed for a ${formatSize(size)} ${type} filesystem: ${failure}`,
          );
        }
        size *= 2;
      }
      // Keep it open, then unlink it: the image lives exactly as long as the server.
      fd = fs.openSync(image, "r+");
    } finally {
      await Deno.remove(image).catch(() => {});
    }
    const path = `/proc/self/fd/${fd}`;
    return {
      open: (context: OpenContext) =>
        Promise.resolve(completeBackend(fileBackend(path, context.readonly))),
      close() {
        if (fd !== undefined) fs.closeSync(fd);
        fd = undefined;
        return Promise.resolve();
      },
    };
  },
};
