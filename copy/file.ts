/**
 * Local file and block-device endpoints, with positional I/O so that many
 * requests can be in flight on one descriptor.
 *
 * As a source, a regular file describes its holes with SEEK_DATA/SEEK_HOLE.
 * As a destination:
 * - a path that does not exist is written under a temporary name in the
 *   same directory and renamed into place only when the copy succeeds, so
 *   a failed or interrupted copy never leaves a file that looks complete;
 * - an existing regular file is resized to the source size and written in
 *   place, keeping its inode, owner and permissions; zero runs of the
 *   source become holes punched in it, so the result is as sparse as a new
 *   file;
 * - a block device keeps its size, which must be at least the source's;
 *   zero runs are discarded or zeroed with fallocate when the device can.
 * FIFOs and character devices are streams (see pipe.ts).
 *
 * @module
 */

import * as fs from "node:fs";
import { basename, dirname, join } from "node:path";
import {
  adviseSequential,
  dropCache,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fallocate,
  pread,
  pwrite,
  seekData,
  seekEnd,
  seekHole,
  SYNC_FILE_RANGE_WAIT_BEFORE,
  SYNC_FILE_RANGE_WRITE,
  syncFileRange,
} from "../io/libc.ts";
import type { BlockSize } from "../protocol/handshake.ts";
import { ZERO_BUFFER } from "../server/backend.ts";
import { registerCleanup } from "./cleanup.ts";
import { BaseEndpoint, type CopyExtent, type Endpoint } from "./endpoint.ts";
import { StreamDestination, StreamSource } from "./pipe.ts";

/** Files take any offset and length; 4 KiB is the page size the kernel likes. */
const FILE_BLOCK_SIZE: BlockSize = { minimum: 1, preferred: 4096, maximum: 64 << 20 };

/**
 * An error from a file with the system's error code, as node:fs reports it,
 * its message cut down to the reason ("ENOENT: no such file or directory,
 * open 'x'" → "no such file or directory").
 */
function fsError(error: unknown, what: string): Error {
  const code = (error as { code?: string }).code;
  const message = ((error as Error).message ?? String(error))
    .replace(/^E[A-Z]+: /, "")
    .replace(/, [a-z]+ '[^']*'$/, "")
    .replace(/\s*\(os error \d+\)$/, "");
  const wrapped = new Error(`${what}: ${message.charAt(0).toLowerCase()}${message.slice(1)}`, {
    cause: error,
  });
  if (code) (wrapped as Error & { code: string }).code = code;
  return wrapped;
}

/*
 * Reads and writes are plain synchronous pread/pwrite through FFI. In Deno
 * node:fs runs positional I/O on the event loop's thread anyway, with more
 * overhead, and handing a call to a worker thread (FFI "nonblocking") cost
 * the event loop more than the copy it saves: for 1 GiB in 256 KiB pieces,
 * ~85 ms of event-loop time against ~55 ms for reading from the page cache
 * directly. Sources are read in order with POSIX_FADV_SEQUENTIAL, so the
 * kernel's readahead keeps cold files streaming. A failed call is repeated
 * with node:fs, whose error carries the errno.
 */

function readAt(fd: number, buf: Uint8Array, position: number): number {
  const n = pread(fd, buf, position);
  if (n !== undefined && n >= 0) return n;
  return fs.readSync(fd, buf, 0, buf.length, position);
}

function writeAt(fd: number, buf: Uint8Array, position: number): number {
  const n = pwrite(fd, buf, position);
  if (n !== undefined && n >= 0) return n;
  return fs.writeSync(fd, buf, 0, buf.length, position);
}

function fsync(fd: number): Promise<void> {
  return new Promise((resolve, reject) =>
    fs.fsync(fd, (error) => error ? reject(error) : resolve())
  );
}

/** Writes all of `buf` at `position`. */
function writeFully(fd: number, buf: Uint8Array, position: number): void {
  let done = 0;
  while (done < buf.length) done += writeAt(fd, buf.subarray(done), position + done);
}

/** Allocation of a file range from SEEK_DATA/SEEK_HOLE; undefined when unsupported. */
export function fileExtents(fd: number, offset: number, length: number): CopyExtent[] | undefined {
  const end = offset + length;
  const out: CopyExtent[] = [];
  let pos = offset;
  while (pos < end) {
    const data = seekData(fd, pos);
    if (data === undefined) return undefined;
    if (data > pos) {
      const n = Math.min(data, end) - pos;
      out.push({ offset: pos, length: n, zero: true });
      pos += n;
      continue;
    }
    const hole = seekHole(fd, pos);
    if (hole === undefined) return undefined;
    // A file that shrank under us: report the rest as data and let the read fail.
    const n = (hole > pos ? Math.min(hole, end) : end) - pos;
    out.push({ offset: pos, length: n, zero: false });
    pos += n;
  }
  return out;
}

/**
 * Keeps the written data of a copy from piling up in the page cache. Left
 * alone, the kernel lets gigabytes of dirty pages accumulate, then throttles
 * every writer while it flushes them: single 256 KiB writes were measured
 * stalling for up to 640 ms, turning a 0.7 s copy of 1 GiB into 2-5 s at
 * random. So every `step` bytes written, the writer that crosses the mark
 * waits for the writeback started at the previous mark, drops those pages
 * from the cache (the copy will not read them back) and starts writeback
 * of what was written since. Dirty data stays within about two steps.
 * Whole-file calls keep it to three calls a step: each call costs a hop to
 * a worker thread, too dear to make for every write.
 */
export class WriteBehind {
  readonly #fd: number;
  readonly #step: number;
  #since = 0;
  #running: Promise<void> | undefined;
  #enabled = true;

  /** Flushes behind writes to `fd` every `step` bytes. */
  constructor(fd: number, step = 16 << 20) {
    this.#fd = fd;
    this.#step = step;
  }

  /** Called after each write of `length` bytes. */
  async written(length: number): Promise<void> {
    if (!this.#enabled) return;
    this.#since += length;
    if (this.#since < this.#step) return;
    // A step is under way: wait for it, which holds writers back as the disk requires.
    if (this.#running) return await this.#running;
    this.#since = 0;
    this.#running = this.#flush().finally(() => this.#running = undefined);
    await this.#running;
  }

  async #flush(): Promise<void> {
    const fd = this.#fd;
    // nbytes 0 means "to the end of the file".
    await syncFileRange(fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE);
    await dropCache(fd, 0, 0);
    // Not supported here (or no FFI): the kernel's own writeback will do.
    if (!(await syncFileRange(fd, 0, 0, SYNC_FILE_RANGE_WRITE))) this.#enabled = false;
  }
}

/** What a path is, following symbolic links; undefined when it does not exist. */
async function statPath(path: string): Promise<Deno.FileInfo | undefined> {
  try {
    return await Deno.stat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw fsError(error, `Cannot access ${path}`);
  }
}

/** A regular file or block device read with positional reads. */
export class FileSource extends BaseEndpoint {
  readonly name: string;
  readonly kind: string;
  readonly size: number;
  readonly blockSize: BlockSize = FILE_BLOCK_SIZE;
  override readonly canExtents: boolean;
  /** Device and inode, to refuse copying a file onto itself. */
  readonly identity: { dev: number; ino: number };
  readonly #fd: number;

  private constructor(name: string, fd: number, stat: fs.Stats) {
    super();
    this.name = name;
    this.#fd = fd;
    const block = stat.isBlockDevice();
    this.kind = block ? "block device" : "file";
    this.size = block ? (seekEnd(fd) ?? 0) : stat.size;
    this.canExtents = !block && seekData(fd, 0) !== undefined;
    this.identity = { dev: stat.dev, ino: stat.ino };
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
      return new StreamSource(path, file);
    }
    let fd: number;
    try {
      fd = fs.openSync(path, "r");
    } catch (error) {
      throw fsError(error, `Cannot open ${path}`);
    }
    await adviseSequential(fd);
    return new FileSource(path, fd, fs.fstatSync(fd));
  }

  /** Positional read of the whole buffer; a file that shrank is an error, not zeroes. */
  override read(buf: Uint8Array, offset: number): Promise<number> {
    try {
      let done = 0;
      while (done < buf.length) {
        const n = readAt(this.#fd, buf.subarray(done), offset + done);
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

  /** Closes the descriptor. */
  override close(): Promise<void> {
    fs.closeSync(this.#fd);
    return Promise.resolve();
  }
}

/** How a file destination was opened, which decides what a failure leaves behind. */
type FileMode = "new" | "existing" | "device";

/** A regular file or block device written with positional writes. */
export class FileDestination extends BaseEndpoint {
  readonly name: string;
  readonly kind: string;
  readonly size: number | undefined;
  readonly blockSize: BlockSize = FILE_BLOCK_SIZE;
  override readonly isZero: boolean;
  readonly #fd: number;
  readonly #mode: FileMode;
  /** Where the data goes until the copy succeeds (a new file); otherwise the path. */
  readonly #writePath: string;
  #canPunch = true;
  #canZeroRange = true;
  #closed = false;
  readonly #behind: WriteBehind;
  /** Removes the temporary file if the process is killed before `close`. */
  readonly #unregister: () => void;

  private constructor(name: string, fd: number, mode: FileMode, writePath: string, size?: number) {
    super();
    this.name = name;
    this.#fd = fd;
    this.#mode = mode;
    this.#writePath = writePath;
    this.kind = mode === "device" ? "block device" : "file";
    this.size = size;
    this.isZero = mode === "new";
    this.#behind = new WriteBehind(fd);
    this.#unregister = mode === "new"
      ? registerCleanup(() => Deno.removeSync(writePath))
      : () => {};
  }

  /**
   * Opens `path` as the destination of a copy of `sourceSize` bytes
   * (undefined for a stream source: the file is sized at the end).
   * `source` is the source's identity, to refuse copying a file onto itself.
   */
  static async open(
    path: string,
    sourceSize: number | undefined,
    source?: { dev: number; ino: number },
  ): Promise<Endpoint> {
    const info = await statPath(path);
    if (info?.isDirectory) throw new Error(`Cannot copy to ${path}: it is a directory`);
    if (info && (info.isFifo || info.isCharDevice || info.isSocket)) {
      const file = await Deno.open(path, { write: true }).catch((error) => {
        throw fsError(error, `Cannot open ${path}`);
      });
      return new StreamDestination(path, file);
    }
    if (info && source && info.dev === source.dev && info.ino === source.ino) {
      throw new Error(`Cannot copy ${path} onto itself`);
    }
    if (!info) {
      // A new file: written under a temporary name, renamed into place on success.
      const temporary = join(
        dirname(path),
        `.${basename(path)}.nbd-copy-${crypto.randomUUID().slice(0, 8)}`,
      );
      let fd: number;
      try {
        fd = fs.openSync(temporary, "wx");
      } catch (error) {
        throw fsError(error, `Cannot create ${path}`);
      }
      try {
        if (sourceSize !== undefined) fs.ftruncateSync(fd, sourceSize);
      } catch (error) {
        fs.closeSync(fd);
        fs.rmSync(temporary, { force: true });
        throw fsError(error, `Cannot size ${path}`);
      }
      return new FileDestination(path, fd, "new", temporary, sourceSize);
    }
    let fd: number;
    try {
      // Never O_CREAT here: a device node must not be replaced by a regular file.
      fd = fs.openSync(path, "r+");
    } catch (error) {
      throw fsError(error, `Cannot open ${path}`);
    }
    const stat = fs.fstatSync(fd);
    if (stat.isBlockDevice()) {
      return new FileDestination(path, fd, "device", path, seekEnd(fd) ?? 0);
    }
    try {
      // Only resized, not emptied: zero runs are punched as they come. Emptying
      // first would free every block and, on ext4, make close() wait for the
      // new data to reach the disk (its "replace via truncate" heuristic).
      if (sourceSize !== undefined) fs.ftruncateSync(fd, sourceSize);
    } catch (error) {
      fs.closeSync(fd);
      throw fsError(error, `Cannot truncate ${path}`);
    }
    return new FileDestination(path, fd, "existing", path, sourceSize);
  }

  /** Positional write, then writeback behind it. */
  override async write(buf: Uint8Array, offset: number): Promise<void> {
    writeFully(this.#fd, buf, offset);
    await this.#behind.written(buf.length);
  }

  /**
   * Punches a hole (unless `allocate`), else zeroes the range in place,
   * else writes zeroes: the first that the filesystem or device supports.
   */
  override async zero(offset: number, length: number, allocate: boolean): Promise<void> {
    const fd = this.#fd;
    if (!allocate && this.#canPunch) {
      if (await fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)) return;
      this.#canPunch = false;
    }
    if (this.#canZeroRange) {
      if (await fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)) return;
      this.#canZeroRange = false;
    }
    for (let done = 0; done < length;) {
      const n = Math.min(ZERO_BUFFER.length, length - done);
      writeFully(fd, ZERO_BUFFER.subarray(0, n), offset + done);
      done += n;
    }
  }

  /** fsync. */
  override flush(): Promise<void> {
    return fsync(this.#fd);
  }

  /** Sizes the file once a stream source has ended (what lies beyond the stream goes). */
  override finish(size: number): Promise<void> {
    if (this.#mode !== "device") fs.ftruncateSync(this.#fd, size);
    return Promise.resolve();
  }

  /** Closes; a new file is renamed into place on success and removed on failure. */
  override async close(complete: boolean): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#unregister();
    fs.closeSync(this.#fd);
    if (this.#mode !== "new") return;
    if (complete) {
      try {
        await Deno.rename(this.#writePath, this.name);
      } catch (error) {
        await Deno.remove(this.#writePath).catch(() => {});
        throw fsError(error, `Cannot rename the finished copy to ${this.name}`);
      }
    } else {
      await Deno.remove(this.#writePath).catch(() => {});
    }
  }

  /** What a failure leaves. */
  override incompleteNote(): string {
    return this.#mode === "new"
      ? `${this.name} was not created`
      : `${this.name} is incomplete (it was partly overwritten)`;
  }
}
