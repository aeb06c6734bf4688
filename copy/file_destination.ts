/**
 * A local file or block device as the destination of a copy, written with
 * positional writes so that many requests can be in flight on one
 * descriptor:
 * - a path that does not exist is written under a temporary name in the
 *   same directory and renamed into place only when the copy succeeds, so
 *   a failed or interrupted copy never leaves a file that looks complete;
 * - an existing regular file is resized to the source size and written in
 *   place, keeping its inode, owner and permissions; zero runs of the
 *   source become holes punched in it, so the result is as sparse as a new
 *   file;
 * - a block device keeps its size, which must be at least the source's;
 *   zero runs are discarded or zeroed with fallocate when the device can.
 * FIFOs and character devices are streams (see pipe.ts). Written data is
 * kept from piling up in the page cache (writeback.ts), and a large copy's
 * writes go to a thread of their own (write_thread.ts).
 *
 * @module
 */

import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fallocate,
} from "../io/libc.ts";
import { fileIo } from "../io/file_io.ts";
import { platform } from "../io/platform.ts";
import type { BlockSize } from "../protocol/handshake.ts";
import { ZERO_BUFFER } from "../util/zero_buffer.ts";
import { registerCleanup } from "./cleanup.ts";
import { BaseEndpoint, COPY_BLOCK_SIZE, type Endpoint, type ShareSpec } from "./endpoint.ts";
import { enlargeFifo, fsError, openPath, statPath } from "./file_open.ts";
import { StreamDestination } from "./pipe.ts";
import { WriteHandoff } from "./write_thread.ts";
import { WriteBehind } from "./writeback.ts";

/** Where the last path separator of `path` is ("\\" too on Windows); -1 when none. */
function lastSeparator(path: string): number {
  const slash = path.lastIndexOf("/");
  return Deno.build.os === "windows" ? Math.max(slash, path.lastIndexOf("\\")) : slash;
}

/** The directory part of `path` ("." when it has none). */
function directoryOf(path: string): string {
  const slash = lastSeparator(path);
  return slash < 0 ? "." : slash === 0 ? path.slice(0, 1) : path.slice(0, slash);
}

/**
 * Resolves when `lock` is seen released or after a millisecond, whichever
 * comes first: the wake-up of an asynchronous wait comes through the event
 * loop, and the timer keeps the loop turning even when nothing else would.
 */
function lockReleased(lock: Int32Array): Promise<unknown> {
  const wait = Atomics.waitAsync(lock, 0, 1);
  if (!wait.async) return Promise.resolve();
  let timer: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    wait.value,
    new Promise((resolve) => timer = setTimeout(resolve, 1)),
  ]).finally(() => clearTimeout(timer));
}

/** Writes all of `buf` at `position`. */
function writeFully(fd: number, buf: Uint8Array, position: number): void {
  let done = 0;
  while (done < buf.length) done += fileIo.writeAt(fd, buf.subarray(done), position + done);
}

/**
 * How a file destination was opened, which decides what a failure leaves
 * behind; "shared" is another thread's descriptor for a file that the
 * main thread opened, and owns.
 */
type FileMode = "new" | "existing" | "device" | "shared";

/**
 * How a new file is kept for a resumable copy (`nbd copy --state`): its
 * temporary file stays after a failure, and a resumed copy reopens it.
 */
export interface PartialFile {
  /** The temporary file of the copy being resumed; absent to start one. */
  resume?: string;
}

/** A regular file or block device written with positional writes. */
export class FileDestination extends BaseEndpoint {
  readonly name: string;
  readonly kind: string;
  readonly size: number | undefined;
  readonly blockSize: BlockSize = COPY_BLOCK_SIZE;
  override readonly isZero: boolean;
  override readonly synchronous = true;
  readonly #fd: number;
  readonly #mode: FileMode;
  /** Where the data goes until the copy succeeds (a new file); otherwise the path. */
  readonly #writePath: string;
  /** A block device (so never resized). */
  #device: boolean;
  /** fallocate is a Linux fast path; elsewhere zeroes are written. */
  #canPunch = platform().linuxFast;
  #canZeroRange = platform().linuxFast;
  #closed = false;
  readonly #behind: WriteBehind;
  /** The hand-off of writes to a write thread, when the copy took its buffers (`sharedBuffers`). */
  #handoff: WriteHandoff | undefined;
  /** Shared with the other threads writing this file (shares.ts): one writes at a time. */
  #writeLock: Int32Array | undefined;
  /** Removes the temporary file if the process is killed before `close`. */
  readonly #unregister: () => void;
  /** The temporary file of a new file stays after a failure, for a resumed copy. */
  readonly #keepPartial: boolean;

  private constructor(
    name: string,
    fd: number,
    mode: FileMode,
    writePath: string,
    size: number | undefined,
    isZero = mode === "new",
    keepPartial = false,
  ) {
    super();
    this.name = name;
    this.#fd = fd;
    this.#mode = mode;
    this.#writePath = writePath;
    this.kind = mode === "device" ? "block device" : "file";
    this.size = size;
    this.isZero = isZero;
    this.#device = mode === "device";
    this.#behind = new WriteBehind(fd);
    this.#keepPartial = keepPartial;
    this.#unregister = mode === "new" && !keepPartial
      ? registerCleanup(() => Deno.removeSync(writePath))
      : () => {};
  }

  /**
   * Opens `path` as the destination of a copy of `sourceSize` bytes
   * (undefined for a stream source: the file is sized at the end).
   * `source` is the source's identity, to refuse copying a file onto itself.
   * With `partial`, a new file's temporary file is kept after a failure,
   * and `partial.resume` names the one a resumed copy goes on writing.
   */
  static async open(
    path: string,
    sourceSize: number | undefined,
    source?: { dev: number; ino: number },
    partial?: PartialFile,
  ): Promise<Endpoint> {
    const info = await statPath(path);
    if (partial?.resume !== undefined) {
      if (info) {
        throw new Error(
          `Cannot resume the copy to ${path}: ${path} exists now (the partial copy was ${partial.resume})`,
        );
      }
      const partialInfo = await statPath(partial.resume);
      if (!partialInfo?.isFile) {
        throw new Error(
          `Cannot resume the copy to ${path}: its partial copy ${partial.resume} is gone`,
        );
      }
      const fd = openPath(partial.resume, "readWrite", `Cannot open ${partial.resume}`);
      // Every byte of the partial copy is either as created (zero) or the source's. Its
      // own size is kept: the caller compares it with the source's.
      return new FileDestination(path, fd, "new", partial.resume, partialInfo.size, true, true);
    }
    if (info?.isDirectory) throw new Error(`Cannot copy to ${path}: it is a directory`);
    if (info && (info.isFifo || info.isCharDevice || info.isSocket)) {
      const file = await Deno.open(path, { write: true }).catch((error) => {
        throw fsError(error, `Cannot open ${path}`);
      });
      if (info.isFifo) enlargeFifo(path);
      return new StreamDestination(path, file);
    }
    if (info?.ino && source?.ino && info.dev === source.dev && info.ino === source.ino) {
      throw new Error(`Cannot copy ${path} onto itself`);
    }
    if (!info) {
      // A new file: written under a temporary name, renamed into place on success.
      const directory = directoryOf(path);
      const base = path.slice(lastSeparator(path) + 1);
      const temporary = `${directory}/.${base}.nbd-copy-${crypto.randomUUID().slice(0, 8)}`;
      const fd = openPath(temporary, "createNew", `Cannot create ${path}`);
      try {
        if (sourceSize !== undefined) fileIo.truncate(fd, sourceSize);
      } catch (error) {
        fileIo.close(fd);
        try {
          Deno.removeSync(temporary);
        } catch { /* already gone */ }
        throw fsError(error, `Cannot size ${path}`);
      }
      return new FileDestination(
        path,
        fd,
        "new",
        temporary,
        sourceSize,
        true,
        partial !== undefined,
      );
    }
    // Never O_CREAT here: a device node must not be replaced by a regular file.
    const fd = openPath(path, "readWrite", `Cannot open ${path}`);
    if (info?.isBlockDevice) {
      return new FileDestination(path, fd, "device", path, fileIo.deviceSize(fd, path));
    }
    try {
      // Only resized, not emptied: zero runs are punched as they come. Emptying
      // first would free every block and, on ext4, make close() wait for the
      // new data to reach the disk (its "replace via truncate" heuristic).
      if (sourceSize !== undefined) fileIo.truncate(fd, sourceSize);
    } catch (error) {
      fileIo.close(fd);
      throw fsError(error, `Cannot truncate ${path}`);
    }
    return new FileDestination(path, fd, "existing", path, sourceSize);
  }

  /**
   * Opens the file that another thread's `shareSpec()` describes, for a
   * share of the same copy: written through its own descriptor, never
   * created, resized or removed from here.
   */
  static openShared(spec: Extract<ShareSpec, { kind: "file-destination" }>): FileDestination {
    const fd = openPath(spec.path, "readWrite", `Cannot open ${spec.name}`);
    const destination = new FileDestination(
      spec.name,
      fd,
      "shared",
      spec.path,
      spec.size,
      spec.isZero,
    );
    destination.#behind.budget = spec.writeBehindBudget;
    if (spec.writeLock) destination.#writeLock = new Int32Array(spec.writeLock);
    destination.#device = Deno.statSync(spec.path).isBlockDevice === true;
    return destination;
  }

  /**
   * The file being written, through another descriptor. With `threads`,
   * the write-behind budget is split between them, this one included.
   */
  override shareSpec(threads?: number): ShareSpec {
    if (threads) {
      this.#behind.budget = Math.floor(this.#behind.budget / threads);
      this.#writeLock ??= new Int32Array(new SharedArrayBuffer(4));
    }
    return {
      kind: "file-destination",
      name: this.name,
      path: this.#writePath,
      size: this.size,
      isZero: this.isZero,
      writeBehindBudget: this.#behind.budget,
      writeLock: this.#writeLock?.buffer as SharedArrayBuffer | undefined,
    };
  }

  /**
   * The copy's read buffers, in memory that a write thread can write from:
   * for a file or device written by this thread alone (threads sharing the
   * copy take turns on it instead).
   */
  sharedBuffers(count: number, bytes: number, total?: number): SharedArrayBuffer | undefined {
    if (this.#writeLock || this.#handoff || this.#closed) return undefined;
    this.#handoff = WriteHandoff.offer(
      this.#fd,
      this.#behind,
      count,
      bytes,
      total,
      this.#writePath,
    );
    return this.#handoff?.arena;
  }

  /** Positional write, then writeback behind it. */
  override async write(buf: Uint8Array, offset: number): Promise<void> {
    // Until the write thread has loaded, this one writes.
    const threaded = this.#handoff?.write(buf, offset);
    if (threaded) return await threaded;
    const lock = this.#writeLock;
    if (lock) {
      // Threads sharing the file take turns here: in the kernel each write holds the
      // file's lock while copying, and a thread waiting there spins on a processor,
      // multiplying the system time. The wait is asynchronous,
      // so that this thread goes on receiving meanwhile.
      while (Atomics.compareExchange(lock, 0, 0, 1) !== 0) await lockReleased(lock);
      try {
        writeFully(this.#fd, buf, offset);
      } finally {
        Atomics.store(lock, 0, 0);
        Atomics.notify(lock, 0, 1);
      }
    } else writeFully(this.#fd, buf, offset);
    await this.#behind.written(offset, buf.length);
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
  override async flush(): Promise<void> {
    try {
      await fileIo.sync(this.#fd);
    } catch (error) {
      throw fsError(error, "fsync");
    }
  }

  /** Sizes the file once a stream source has ended (what lies beyond the stream goes). */
  override finish(size: number): Promise<void> {
    if (!this.#device) fileIo.truncate(this.#fd, size);
    return Promise.resolve();
  }

  /** Closes; a new file is renamed into place on success and removed on failure. */
  override async close(complete: boolean): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#unregister();
    await this.#handoff?.stop();
    await this.#behind.stop();
    fileIo.close(this.#fd);
    if (this.#mode !== "new") return;
    if (complete) {
      try {
        await Deno.rename(this.#writePath, this.name);
      } catch (error) {
        await Deno.remove(this.#writePath).catch(() => {});
        throw fsError(error, `Cannot rename the finished copy to ${this.name}`);
      }
    } else if (!this.#keepPartial) {
      await Deno.remove(this.#writePath).catch(() => {});
    }
  }

  /** The temporary file of a new file (where the data goes until the copy succeeds). */
  get partialPath(): string | undefined {
    return this.#mode === "new" ? this.#writePath : undefined;
  }

  /** What a failure leaves. */
  override incompleteNote(): string {
    if (this.#mode === "new" && this.#keepPartial) {
      return `${this.name} is not created yet (the partial copy is ${this.#writePath})`;
    }
    return this.#mode === "new"
      ? `${this.name} was not created`
      : `${this.name} is incomplete (it was partly overwritten)`;
  }
}
