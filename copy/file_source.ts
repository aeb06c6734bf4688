/**
 * A local file or block device as the source of a copy, read with
 * positional reads so that many requests can be in flight on one
 * descriptor. A regular file describes its holes with SEEK_DATA/SEEK_HOLE
 * where the platform has them (else it is all data, and the copy's zero
 * detection finds its zero runs). On Linux sources are read in order with
 * POSIX_FADV_SEQUENTIAL, so the kernel's readahead keeps cold files streaming. FIFOs and character devices are
 * streams (see pipe.ts).
 *
 * @module
 */

import { adviseSequential, seekData } from "../io/libc.ts";
import { fileExtents } from "../io/file_extents.ts";
import { fileIo } from "../io/file_io.ts";
import type { BlockSize } from "../protocol/handshake.ts";
import { BaseEndpoint, COPY_BLOCK_SIZE, type CopyExtent, type ShareSpec } from "./endpoint.ts";
import { enlargeFifo, fsError, openPath, statPath } from "./file_open.ts";
import { StreamSource } from "./pipe.ts";

/** A regular file or block device read with positional reads. */
export class FileSource extends BaseEndpoint {
  readonly name: string;
  readonly kind: string;
  readonly size: number;
  readonly blockSize: BlockSize = COPY_BLOCK_SIZE;
  override readonly canExtents: boolean;
  override readonly synchronous = true;
  /** Device and inode, to refuse copying a file onto itself. */
  readonly identity: { dev: number; ino: number };
  readonly #fd: number;

  private constructor(name: string, fd: number, stat: Deno.FileInfo) {
    super();
    this.name = name;
    this.#fd = fd;
    const block = stat.isBlockDevice === true;
    this.kind = block ? "block device" : "file";
    this.size = block ? fileIo.deviceSize(fd, name) : stat.size;
    this.canExtents = !block && seekData(fd, 0) !== undefined;
    this.identity = { dev: stat.dev, ino: stat.ino ?? 0 };
  }

  /** Opens `path`: a FIFO or character device becomes a stream source. */
  static async open(path: string): Promise<FileSource | StreamSource> {
    const info = await statPath(path);
    if (!info) throw new Error(`Cannot open ${path}: no such file or directory`);
    if (info.isDirectory) throw new Error(`Cannot copy from ${path}: it is a directory`);
    if (info.isFifo || info.isCharDevice || info.isSocket) {
      const file = await Deno.open(path, { read: true }).catch((error) => {
        throw fsError(error, `Cannot open ${path}`);
      });
      if (info.isFifo) enlargeFifo(path);
      return new StreamSource(path, file);
    }
    const fd = openPath(path, "read", `Cannot open ${path}`);
    await adviseSequential(fd);
    return new FileSource(path, fd, info);
  }

  /** Positional read of the whole buffer; a file that shrank is an error, not zeroes. */
  override read(buf: Uint8Array, offset: number): Promise<number> {
    try {
      let done = 0;
      while (done < buf.length) {
        const n = fileIo.readAt(this.#fd, buf.subarray(done), offset + done);
        if (n === 0) {
          throw new Error(`unexpected end of file at offset ${offset + done} (the file shrank)`);
        }
        done += n;
      }
      return Promise.resolve(done);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** Holes from SEEK_DATA/SEEK_HOLE. */
  override extents(offset: number, length: number): Promise<CopyExtent[]> {
    return Promise.resolve(
      fileExtents(this.#fd, offset, length) ?? [{ offset, length, zero: false }],
    );
  }

  /** The same file, through another descriptor. */
  override shareSpec(): ShareSpec {
    return { kind: "file-source", path: this.name };
  }

  /** Closes the descriptor. */
  override close(): Promise<void> {
    fileIo.close(this.#fd);
    return Promise.resolve();
  }
}
