/**
 * The `split` plugin: several files joined end to end into one disk, in
 * the order given. Writable when every file can be opened for writing;
 * the files are never resized.
 *
 * ```
 * nbd serve split file=part1.img file=part2.img file=part3.img
 * nbd serve split disk.img
 * ```
 *
 * Parameters:
 * - `[file=]PATH` (required, repeatable): the files, in order.
 *
 * @module
 */

import { open as openFile } from "node:fs/promises";
import type { FileHandle } from "node:fs/promises";
import { completeBackend, type Plugin } from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";

interface Part {
  path: string;
  handle: FileHandle;
  offset: number;
  size: number;
}

/** Finds the part holding `offset` (binary search). */
function partAt(parts: Part[], offset: number): number {
  let lo = 0;
  let hi = parts.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (parts[mid]!.offset <= offset) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** Runs `io` on each piece of [offset, offset+buf.length) that falls in a part. */
async function eachPiece(
  parts: Part[],
  buf: Uint8Array,
  offset: number,
  io: (part: Part, piece: Uint8Array, position: number) => Promise<void>,
): Promise<void> {
  let done = 0;
  for (let i = partAt(parts, offset); done < buf.length; i++) {
    const part = parts[i]!;
    const position = offset + done - part.offset;
    const n = Math.min(part.size - position, buf.length - done);
    if (n > 0) await io(part, buf.subarray(done, done + n), position);
    done += Math.max(n, 0);
  }
}

/** The split plugin. */
export const splitPlugin: Plugin = {
  name: "split",
  summary: "several files joined into one disk",
  description:
    "Examples:\n  nbd serve split file=part1.img file=part2.img\n  nbd serve split disk.img",
  params: [
    {
      name: "file",
      value: "PATH",
      type: "path",
      description: "a file; repeat to join several, in order",
      required: true,
      repeatable: true,
    },
  ],
  magicParam: "file",
  async create(params) {
    const paths = params.takeAll("file");
    const parts: Part[] = [];
    let writable = true;
    let offset = 0;
    try {
      for (const path of paths) {
        let handle: FileHandle;
        try {
          handle = await openFile(path, "r+");
        } catch (error) {
          const code = (error as { code?: string }).code;
          if (code !== "EACCES" && code !== "EROFS" && code !== "EPERM") throw error;
          handle = await openFile(path, "r");
          writable = false;
        }
        const stat = await handle.stat();
        if (!stat.isFile()) {
          await handle.close();
          throw new UsageError(`split: ${path} is not a regular file`);
        }
        parts.push({ path, handle, offset, size: stat.size });
        offset += stat.size;
      }
    } catch (error) {
      for (const part of parts) await part.handle.close();
      if (error instanceof UsageError) throw error;
      throw new UsageError(
        `split: cannot open ${paths[parts.length]}: ${(error as Error).message}`,
      );
    }
    const size = offset;
    const readPiece = async (part: Part, piece: Uint8Array, position: number) => {
      let done = 0;
      while (done < piece.length) {
        const { bytesRead } = await part.handle.read(
          piece,
          done,
          piece.length - done,
          position + done,
        );
        if (bytesRead === 0) {
          piece.fill(0, done); // the file shrank under us: read zeroes
          return;
        }
        done += bytesRead;
      }
    };
    const writePiece = async (part: Part, piece: Uint8Array, position: number) => {
      let done = 0;
      while (done < piece.length) {
        const { bytesWritten } = await part.handle.write(
          piece,
          done,
          piece.length - done,
          position + done,
        );
        done += bytesWritten;
      }
    };
    return {
      open: () =>
        Promise.resolve(completeBackend({
          size: () => size,
          capabilities: () => ({ multiConn: true, fua: writable ? "emulate" : "none" }),
          pread: (buf, at) => eachPiece(parts, buf, at, readPiece),
          ...(writable
            ? {
              pwrite: (buf: Uint8Array, at: number) => eachPiece(parts, buf, at, writePiece),
              flush: async () => {
                for (const part of parts) await part.handle.datasync();
              },
            }
            : {}),
        })),
      async close() {
        for (const part of parts) await part.handle.close();
      },
    };
  },
};
