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

import {
  adviseSequential,
  closeFd,
  dropCache,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fallocate,
  lastError,
  O_CREAT,
  O_EXCL,
  O_NONBLOCK,
  O_RDONLY,
  O_RDWR,
  O_WRONLY,
  openFd,
  pread,
  pwrite,
  seekData,
  seekEnd,
  SYNC_FILE_RANGE_WAIT_AFTER,
  SYNC_FILE_RANGE_WAIT_BEFORE,
  SYNC_FILE_RANGE_WRITE,
  syncFd,
  syncFileRange,
  truncateFd,
} from "../io/libc.ts";
import { fileExtents } from "../io/file_extents.ts";
import type { BlockSize } from "../protocol/handshake.ts";
import { ZERO_BUFFER } from "../util/zero_buffer.ts";
import { enlargePipe } from "../io/pipes.ts";
import { registerCleanup } from "./cleanup.ts";
import {
  BaseEndpoint,
  COPY_BLOCK_SIZE,
  type CopyExtent,
  type Endpoint,
  type ShareSpec,
} from "./endpoint.ts";
import { StreamDestination, StreamSource } from "./pipe.ts";
import { WriteThread } from "./write_thread.ts";
import {
  dirtyBudget,
  WRITE_BEHIND_STEP,
  type WritebackWindow,
  WritebackWindows,
} from "./writeback.ts";

/** Bytes of a stream written before its destination's write thread starts. */
const WRITE_THREAD_AFTER = 32 << 20;

/** Copies of this size or more start their destination's write thread with the copy. */
const WRITE_THREAD_SIZE = 64 << 20;

/** Largest arena of read buffers a destination offers (beyond it, ordinary buffers). */
const MAX_ARENA = 256 << 20;

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
 * Files are opened, read, written and resized with plain synchronous libc
 * calls through FFI, never node:fs: loading the Node compatibility layer
 * alone costs a copy ~25 ms of start-up, and node:fs runs positional I/O
 * on the event loop's thread anyway, with more overhead. Handing each call
 * to a worker thread (FFI "nonblocking") cost the event loop more than the
 * copy it saves: for 1 GiB in 256 KiB pieces, ~85 ms of event-loop time
 * against ~55 ms for reading from the page cache directly. Sources are
 * read in order with POSIX_FADV_SEQUENTIAL, so the kernel's readahead keeps
 * cold files streaming.
 */

function readAt(fd: number, buf: Uint8Array, position: number): number {
  const n = pread(fd, buf, position)!;
  if (n < 0) throw lastError();
  return n;
}

function writeAt(fd: number, buf: Uint8Array, position: number): number {
  const n = pwrite(fd, buf, position)!;
  if (n < 0) throw lastError();
  return n;
}

/** Opens `path` with open(2) `flags`; FFI is required. */
function openPath(path: string, flags: number, what: string): number {
  let fd: number | undefined;
  try {
    fd = openFd(path, flags);
  } catch (error) {
    throw fsError(error, what);
  }
  if (fd === undefined) throw new Error(`${what}: file access needs FFI (run nbd with -A)`);
  return fd;
}

/**
 * Enlarges the pipe of a FIFO that is open at both ends (see io/pipes.ts),
 * through a descriptor of its own: the runtime does not give out the one
 * it reads or writes through, and the size belongs to the pipe, not to a
 * descriptor. Opened for reading and writing, a FIFO never blocks the open.
 */
function enlargeFifo(path: string): void {
  try {
    const fd = openFd(path, O_RDWR | O_NONBLOCK);
    if (fd === undefined) return;
    enlargePipe(fd);
    closeFd(fd);
  } catch {
    // Gone or not ours to open: it keeps its size.
  }
}

/** The directory part of `path` ("." when it has none). */
function directoryOf(path: string): string {
  const slash = path.lastIndexOf("/");
  return slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
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
  while (done < buf.length) done += writeAt(fd, buf.subarray(done), position + done);
}

/**
 * Keeps the written data of a copy from piling up in the page cache, as
 * nbdcopy does (see writeback.ts). So a copy of any size cycles through the
 * same few MiB of memory, and neither crowds other programs out of the
 * cache nor waits for fresh memory: on virtual machines whose free memory
 * goes back to the host, each page touched for the first time is slow, and
 * a 1 GiB copy left in the cache was measured taking 2-4 times as long.
 * Writers only wait when the disk falls more than a budget behind. The
 * calls run on a helper thread of the runtime, three per window, never one
 * per write.
 */
export class WriteBehind {
  readonly #fd: number;
  readonly #windows: WritebackWindows;
  #retiring: Promise<void> | undefined;
  /** Writebacks started and not yet returned. */
  readonly #started = new Set<Promise<unknown>>();
  #enabled = true;

  /** Writes back behind writes to `fd` in windows of `step` bytes, `budget` bytes behind. */
  constructor(
    fd: number,
    step = WRITE_BEHIND_STEP,
    budget = dirtyBudget(),
  ) {
    this.#fd = fd;
    this.#windows = new WritebackWindows(step, budget);
  }

  /** The budget in bytes. */
  get budget(): number {
    return this.#windows.budget;
  }
  set budget(bytes: number) {
    this.#windows.budget = bytes;
  }

  /**
   * Called after each write of `length` bytes at `offset`: a promise when
   * the writer must wait for the disk, else undefined.
   */
  written(offset: number, length: number): Promise<void> | undefined {
    if (!this.#enabled) return;
    const window = this.#windows.add(offset, length);
    if (!window) return;
    this.#startWriteback(window);
    if (!this.#windows.due()) return;
    const retiring = this.#retire();
    return this.#windows.pending > 2 * this.#windows.budget ? retiring : undefined;
  }

  /** Starts the writeback of a window: usually over by the time the window is retired. */
  #startWriteback(window: WritebackWindow): void {
    const started = syncFileRange(
      this.#fd,
      window.start,
      window.end - window.start,
      SYNC_FILE_RANGE_WRITE,
    );
    this.#started.add(started);
    void started.finally(() => this.#started.delete(started));
  }

  /**
   * Writes back and drops all that was written so far, in the background:
   * another writer (a write thread, with a budget of its own) takes over.
   */
  drain(): void {
    if (!this.#enabled) return;
    const last = this.#windows.drain();
    if (last) this.#startWriteback(last);
    void this.#retire();
  }

  /** Waits for and drops the oldest windows until a budget at most is pending. */
  #retire(): Promise<void> {
    this.#retiring ??= (async () => {
      const fd = this.#fd;
      for (
        let window = this.#windows.due();
        window && this.#enabled;
        window = this.#windows.due()
      ) {
        const length = window.end - window.start;
        const flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
          SYNC_FILE_RANGE_WAIT_AFTER;
        // Not supported here (or no FFI): the kernel's own writeback will do.
        if (!(await syncFileRange(fd, window.start, length, flags))) this.#enabled = false;
        if (!this.#enabled) break;
        await dropCache(fd, window.start, length);
        this.#windows.retired();
      }
    })().finally(() => this.#retiring = undefined);
    return this.#retiring;
  }

  /**
   * Stops for good and resolves once no call on the descriptor is left
   * running, so that it can be closed: a call made after the close would
   * reach whatever file reused its number.
   */
  async stop(): Promise<void> {
    this.#enabled = false;
    await this.#retiring;
    await Promise.all(this.#started);
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
    this.size = block ? (seekEnd(fd) ?? 0) : stat.size;
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
    const fd = openPath(path, O_RDONLY, `Cannot open ${path}`);
    await adviseSequential(fd);
    return new FileSource(path, fd, info);
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

  /** The same file, through another descriptor. */
  override shareSpec(): ShareSpec {
    return { kind: "file-source", path: this.name };
  }

  /** Closes the descriptor. */
  override close(): Promise<void> {
    closeFd(this.#fd);
    return Promise.resolve();
  }
}

/**
 * How a file destination was opened, which decides what a failure leaves
 * behind; "shared" is another thread's descriptor for a file that the
 * main thread opened, and owns.
 */
type FileMode = "new" | "existing" | "device" | "shared";

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
  #canPunch = true;
  #canZeroRange = true;
  #closed = false;
  readonly #behind: WriteBehind;
  /** The read buffers' memory, when the copy took it (`sharedBuffers`). */
  #arena: SharedArrayBuffer | undefined;
  #thread: WriteThread | undefined;
  #threadTried = false;
  /** The write thread has taken over (this thread's write-behind drained). */
  #handedOver = false;
  /** Bytes written from the arena on this thread before a write thread started. */
  #writtenHere = 0;
  /** Shared with the other threads writing this file (shares.ts): one writes at a time. */
  #writeLock: Int32Array | undefined;
  /** Removes the temporary file if the process is killed before `close`. */
  readonly #unregister: () => void;

  private constructor(
    name: string,
    fd: number,
    mode: FileMode,
    writePath: string,
    size: number | undefined,
    isZero = mode === "new",
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
      if (info.isFifo) enlargeFifo(path);
      return new StreamDestination(path, file);
    }
    if (info && source && info.dev === source.dev && info.ino === source.ino) {
      throw new Error(`Cannot copy ${path} onto itself`);
    }
    if (!info) {
      // A new file: written under a temporary name, renamed into place on success.
      const directory = directoryOf(path);
      const base = path.slice(path.lastIndexOf("/") + 1);
      const temporary = `${directory}/.${base}.nbd-copy-${crypto.randomUUID().slice(0, 8)}`;
      const fd = openPath(temporary, O_WRONLY | O_CREAT | O_EXCL, `Cannot create ${path}`);
      try {
        if (sourceSize !== undefined) truncateFd(fd, sourceSize);
      } catch (error) {
        closeFd(fd);
        try {
          Deno.removeSync(temporary);
        } catch { /* already gone */ }
        throw fsError(error, `Cannot size ${path}`);
      }
      return new FileDestination(path, fd, "new", temporary, sourceSize);
    }
    // Never O_CREAT here: a device node must not be replaced by a regular file.
    const fd = openPath(path, O_RDWR, `Cannot open ${path}`);
    if (info?.isBlockDevice) {
      return new FileDestination(path, fd, "device", path, seekEnd(fd) ?? 0);
    }
    try {
      // Only resized, not emptied: zero runs are punched as they come. Emptying
      // first would free every block and, on ext4, make close() wait for the
      // new data to reach the disk (its "replace via truncate" heuristic).
      if (sourceSize !== undefined) truncateFd(fd, sourceSize);
    } catch (error) {
      closeFd(fd);
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
    const fd = openPath(spec.path, O_RDWR, `Cannot open ${spec.name}`);
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
    if (this.#writeLock || this.#arena || count * bytes > MAX_ARENA) return undefined;
    // A copy this small would not pay for the thread's start (~15 ms holding this
    // thread up); a large one pays whenever it comes, and measured no slower starting
    // it now than after the first requests. A stream's is started once it has shown
    // its size (`#threadFor`).
    if (total !== undefined && total < WRITE_THREAD_SIZE) return undefined;
    this.#arena = new SharedArrayBuffer(count * bytes);
    if (total !== undefined) this.#startThread();
    return this.#arena;
  }

  #startThread(): WriteThread | undefined {
    if (this.#threadTried || this.#closed) return this.#thread;
    this.#threadTried = true;
    this.#thread = WriteThread.start(
      this.#fd,
      this.#arena!,
      WRITE_BEHIND_STEP,
      this.#behind.budget,
    );
    return this.#thread;
  }

  /** The write thread of a stream's copy, started once enough was written here. */
  #threadFor(length: number): WriteThread | undefined {
    if (this.#threadTried) return this.#thread;
    this.#writtenHere += length;
    return this.#writtenHere < WRITE_THREAD_AFTER ? undefined : this.#startThread();
  }

  /** Whether a write thread was started (for tests). */
  get writeThreadStarted(): boolean {
    return this.#thread !== undefined;
  }

  /** Whether writes have gone to the write thread (for tests). */
  get threaded(): boolean {
    return this.#handedOver;
  }

  /** Positional write, then writeback behind it. */
  override async write(buf: Uint8Array, offset: number): Promise<void> {
    if (this.#arena && buf.buffer === this.#arena) {
      const thread = this.#threadFor(buf.length);
      // Until the thread has loaded, this one writes.
      if (thread?.ready) {
        if (!this.#handedOver) {
          // What this thread wrote is written back and dropped as the thread's would be.
          this.#handedOver = true;
          this.#behind.drain();
        }
        return await thread.write(buf, offset);
      }
    }
    const lock = this.#writeLock;
    if (lock) {
      // Threads sharing the file take turns here: in the kernel each write holds the
      // file's lock while copying, and a thread waiting there spins on a processor
      // (measured: system time tripled on 2 processors). The wait is asynchronous,
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
      await syncFd(this.#fd);
    } catch (error) {
      throw fsError(error, "fsync");
    }
  }

  /** Sizes the file once a stream source has ended (what lies beyond the stream goes). */
  override finish(size: number): Promise<void> {
    if (!this.#device) truncateFd(this.#fd, size);
    return Promise.resolve();
  }

  /** Closes; a new file is renamed into place on success and removed on failure. */
  override async close(complete: boolean): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#unregister();
    await this.#thread?.stop();
    await this.#behind.stop();
    closeFd(this.#fd);
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
