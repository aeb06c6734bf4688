/**
 * A FUSE file system holding one regular file, spoken over /dev/fuse
 * directly (no libfuse). The file is either `MOUNTPOINT/NAME` in a
 * directory mount, or the mount itself when it is mounted over an existing
 * regular file. Its contents come from a `FileContents`, e.g. an NBD export.
 *
 * Requests are read with synchronous, non-blocking read(2) calls while the
 * kernel has some queued, and a poll(2) on a worker thread waits when it
 * has none, so the event loop stays free for the sockets behind the file.
 * Requests are answered in any order as they complete; many are in flight
 * at once.
 *
 * @module
 */

import {
  decodeInitIn,
  decodeName,
  decodeRequestHeader,
  type DirEntry,
  DT_DIR,
  DT_REG,
  encodeAttrOut,
  encodeDirents,
  encodeEntryOut,
  encodeError,
  encodeInitOut,
  encodeLseekOut,
  encodeOpenOut,
  encodeStatfsOut,
  encodeWriteOut,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  FATTR_ATIME,
  FATTR_ATIME_NOW,
  FATTR_GID,
  FATTR_MODE,
  FATTR_MTIME,
  FATTR_MTIME_NOW,
  FATTR_SIZE,
  FATTR_UID,
  FOPEN_PARALLEL_DIRECT_WRITES,
  FUSE_ACCESS,
  FUSE_ASYNC_DIO,
  FUSE_ASYNC_READ,
  FUSE_BATCH_FORGET,
  FUSE_BIG_WRITES,
  FUSE_DESTROY,
  FUSE_FALLOCATE,
  FUSE_FLUSH,
  FUSE_FORGET,
  FUSE_FSYNC,
  FUSE_FSYNCDIR,
  FUSE_GETATTR,
  FUSE_INIT,
  FUSE_INTERRUPT,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  FUSE_LOOKUP,
  FUSE_LSEEK,
  FUSE_MAX_PAGES,
  FUSE_OPEN,
  FUSE_OPENDIR,
  FUSE_READ,
  FUSE_READDIR,
  FUSE_RELEASE,
  FUSE_RELEASEDIR,
  FUSE_ROOT_ID,
  FUSE_SETATTR,
  FUSE_STATFS,
  FUSE_SYNCFS,
  FUSE_WRITE,
  getU64,
  IN_HEADER_SIZE,
  OUT_HEADER_SIZE,
  type RequestHeader,
  S_IFDIR,
  S_IFREG,
  SEEK_DATA,
  SEEK_HOLE,
  WRITE_IN_SIZE,
  writeReplyHeader,
} from "./fuse_protocol.ts";
import * as sys from "../io/libc.ts";

/** The contents of the served file. Offsets and lengths are within the file. */
export interface FileContents {
  /** Size in bytes (fixed). */
  readonly size: number;
  /** Writes are refused. */
  readonly readOnly: boolean;
  /** Preferred I/O size, reported as st_blksize. */
  readonly blockSize: number;
  /** Fills `buf` from `offset`. */
  read(buf: Uint8Array, offset: number): Promise<void>;
  /** Writes `buf` at `offset`. */
  write(buf: Uint8Array, offset: number): Promise<void>;
  /** Makes completed writes durable (fsync). */
  flush(): Promise<void>;
  /** Deallocates a range, which then reads as zeroes (fallocate PUNCH_HOLE). */
  punchHole(offset: number, length: number): Promise<void>;
  /** Makes a range read as zeroes (fallocate ZERO_RANGE). */
  zeroRange(offset: number, length: number): Promise<void>;
  /** Start of the next data at or after `offset` (SEEK_DATA); `size` when none. */
  seekData?(offset: number): Promise<number>;
  /** Start of the next hole at or after `offset` (SEEK_HOLE); `size` at the latest. */
  seekHole?(offset: number): Promise<number>;
}

/** Options of `FuseFileServer`. */
export interface FuseFileServerOptions {
  /** A directory (the file appears in it as `fileName`) or an existing regular file. */
  mountpoint: string;
  /** Name of the file in a directory mount (default "disk"). */
  fileName?: string;
  /** Mount read-only. */
  readOnly?: boolean;
  /** Let users other than the mounting one access the file. */
  allowOther?: boolean;
  /** Source shown in /proc/mounts (default "nbd"). */
  source?: string;
  /** Largest READ/WRITE the kernel sends (default 1 MiB). */
  maxRequest?: number;
  /** Background requests (readahead, direct I/O) the kernel keeps in flight (default 64). */
  maxBackground?: number;
  /**
   * Kernel readahead for the file in bytes (default 1 MiB: whole-size
   * requests, several in flight). The kernel's default of 128 KiB keeps
   * sequential reads to one small request at a time.
   */
  readahead?: number;
  /** Called for each request that fails, for logging. */
  onError?: (what: string, error: unknown) => void;
}

/** File-system type in /proc/mounts: "fuse.nbd". */
export const FUSE_SUBTYPE = "nbd";

const PAGE_SIZE = 4096;
/**
 * READ replies from this size on are written by a worker thread: copying
 * them into the page cache then overlaps with the event loop's work.
 */
const THREADED_REPLY = 256 * 1024;
/** How long the kernel may cache names and attributes: the size never changes. */
const VALID_SECONDS = 3600;
/** Read buffers beyond this many are not kept for reuse. */
const MAX_SPARE_BUFFERS = 16;
/** Requests read in one go before letting other work run. */
const READ_BATCH = 64;
/**
 * How long the event loop may block waiting for the next request once the
 * last one was answered (timers and sockets wait at most this long).
 */
const NEXT_REQUEST_WAIT_MS = 2;
/**
 * Once the mount is gone, how long requests still being served may take
 * before /dev/fuse is closed anyway: closing fails whatever is left, so a
 * stuck request can never keep a user of the detached file (a loop device,
 * a file system being unmounted) waiting for ever.
 */
const STOP_GRACE_MS = 5_000;

/** Maps an error from the contents to an errno for the kernel. */
function errnoOf(error: unknown): number {
  if (error && typeof error === "object") {
    const record = error as { errno?: unknown; code?: unknown };
    if (typeof record.errno === "number" && record.errno > 0) return record.errno;
    // NbdError: NBD error numbers are Linux errno values (EPERM 1 ... ESHUTDOWN 108).
    if (typeof record.code === "number" && record.code > 0) return record.code;
  }
  return sys.EIO;
}

/** Counts of what the server did, for tests and status. */
export interface FuseServerState {
  /** Descriptors open on the file. */
  openFiles: number;
  /** Requests being served. */
  active: number;
  /** Whether INIT was answered. */
  initialized: boolean;
}

/**
 * Serves one file over FUSE.
 *
 * @example
 * ```ts
 * const server = new FuseFileServer(contents, { mountpoint: "/mnt/x" });
 * await server.mount();          // /mnt/x/disk is usable from here on
 * await server.closed;           // resolves after unmount
 * ```
 */
export class FuseFileServer {
  readonly #contents: FileContents;
  readonly #mountpoint: string;
  readonly #fileName: string;
  readonly #readOnly: boolean;
  readonly #allowOther: boolean;
  readonly #source: string;
  readonly #maxRequest: number;
  readonly #maxBackground: number;
  readonly #readahead: number;
  readonly #onError: (what: string, error: unknown) => void;
  /** true when the mount is the file itself (mounted over a regular file). */
  #naked = false;
  #fd = -1;
  #fileIno = 2;
  readonly #startMs = Date.now();
  #atimeMs = this.#startMs;
  #mtimeMs = this.#startMs;
  #ctimeMs = this.#startMs;
  #nextFh = 1;
  #openFiles = 0;
  #active = 0;
  #initialized = false;
  #stopping = false;
  #unmounted = false;
  #requestBufferSize: number;
  #spareRequestBuffers: Uint8Array<ArrayBuffer>[] = [];
  /** The buffer the next request is read into. */
  #buffer: Uint8Array<ArrayBuffer>;
  #spareReplyBuffers: Uint8Array<ArrayBuffer>[] = [];
  #onInit: { resolve: () => void; reject: (e: unknown) => void } | undefined;
  #idleWaiters: (() => void)[] = [];
  #pump: Promise<void> | undefined;
  readonly #stopped = Promise.withResolvers<void>();
  #uid = 0;
  #gid = 0;

  /** Creates a server for `contents`; nothing happens until `mount()`. */
  constructor(contents: FileContents, options: FuseFileServerOptions) {
    this.#contents = contents;
    this.#mountpoint = options.mountpoint;
    this.#fileName = options.fileName ?? "disk";
    this.#readOnly = (options.readOnly ?? false) || contents.readOnly;
    this.#allowOther = options.allowOther ?? false;
    this.#source = options.source ?? "nbd";
    this.#maxRequest = Math.max(PAGE_SIZE, options.maxRequest ?? 1 << 20);
    this.#maxBackground = options.maxBackground ?? 64;
    this.#readahead = options.readahead ?? 1 << 20;
    this.#onError = options.onError ?? (() => {});
    // The kernel refuses reads of /dev/fuse into buffers that could not hold
    // a WRITE of max_write bytes with its headers.
    this.#requestBufferSize = this.#maxRequest + PAGE_SIZE;
    this.#buffer = new Uint8Array(this.#requestBufferSize);
  }

  /** Path of the served file. */
  get filePath(): string {
    return this.#naked
      ? this.#mountpoint
      : `${this.#mountpoint.replace(/\/+$/, "")}/${this.#fileName}`;
  }

  /** The mountpoint. */
  get mountpoint(): string {
    return this.#mountpoint;
  }

  /** Whether the file is mounted read-only. */
  get readOnly(): boolean {
    return this.#readOnly;
  }

  /** What the server is doing now. */
  get state(): FuseServerState {
    return { openFiles: this.#openFiles, active: this.#active, initialized: this.#initialized };
  }

  /**
   * Resolves once the server stopped reading requests: the file system was
   * unmounted (by `unmount()` or from outside). Requests may still be
   * finishing; see `closed`.
   */
  get stopped(): Promise<void> {
    return this.#stopped.promise;
  }

  /** Resolves once the server stopped and every request it read has been answered. */
  get closed(): Promise<void> {
    return this.#pump ?? Promise.resolve();
  }

  /**
   * Mounts and starts serving; resolves once the kernel completed INIT, so
   * the file is usable. Throws a clear error when the mountpoint is missing
   * or mounting is not permitted.
   */
  async mount(): Promise<void> {
    let info: Deno.FileInfo;
    try {
      info = await Deno.stat(this.#mountpoint);
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) {
        throw new Error(`Cannot mount on ${this.#mountpoint}: no such file or directory`);
      }
      throw new Error(`Cannot mount on ${this.#mountpoint}: ${(error as Error).message}`);
    }
    if (info.isFile) this.#naked = true;
    else if (!info.isDirectory) {
      throw new Error(
        `Cannot mount on ${this.#mountpoint}: not a directory or regular file`,
      );
    }
    this.#fileIno = this.#naked ? FUSE_ROOT_ID : 2;
    this.#uid = Deno.uid() ?? 0;
    this.#gid = Deno.gid() ?? 0;
    try {
      const fd = sys.openFd("/dev/fuse", sys.O_RDWR | sys.O_NONBLOCK);
      if (fd === undefined) throw new Error("Cannot mount: FFI is not available (run nbd with -A)");
      this.#fd = fd;
    } catch (error) {
      if (!(error instanceof sys.SystemError)) throw error;
      const errno = error.errno;
      if (errno === sys.ENOENT || errno === sys.ENODEV) {
        throw new Error("Cannot mount: /dev/fuse is missing (is the fuse module loaded?)");
      }
      if (errno === sys.EACCES || errno === sys.EPERM) {
        throw new Error(
          "Cannot mount: permission denied opening /dev/fuse (nbd mount needs root or CAP_SYS_ADMIN)",
        );
      }
      throw new sys.SyscallError("open", errno, "/dev/fuse");
    }
    const rootMode = this.#naked ? S_IFREG : S_IFDIR;
    const options = [
      `fd=${this.#fd}`,
      `rootmode=${rootMode.toString(8)}`,
      `user_id=${this.#uid}`,
      `group_id=${this.#gid}`,
      "default_permissions",
    ];
    if (this.#allowOther) options.push("allow_other");
    let flags = sys.MS_NOSUID | sys.MS_NODEV;
    if (this.#readOnly) flags |= sys.MS_RDONLY;
    try {
      sys.mount(this.#source, this.#mountpoint, `fuse.${FUSE_SUBTYPE}`, flags, options.join(","));
    } catch (error) {
      sys.closeFd(this.#fd);
      this.#fd = -1;
      const errno = (error as sys.SyscallError).errno;
      if (errno === sys.EPERM || errno === sys.EACCES) {
        throw new Error(
          `Cannot mount on ${this.#mountpoint}: permission denied (nbd mount needs root or CAP_SYS_ADMIN)`,
        );
      }
      throw new Error(`Cannot mount on ${this.#mountpoint}: ${sys.errnoText(errno)}`);
    }
    const initialized = new Promise<void>((resolve, reject) => {
      this.#onInit = { resolve, reject };
    });
    this.#pump = this.#serve();
    try {
      await initialized;
    } catch (error) {
      await this.unmount({ lazy: true });
      await this.closed;
      throw error;
    }
    await this.#tuneReadahead();
  }

  /** Sets the readahead of the mount's backing-device info in sysfs (best effort). */
  async #tuneReadahead(): Promise<void> {
    try {
      // The stat is answered by this process, so it must not block the event loop.
      const dev = (await Deno.stat(this.#mountpoint)).dev;
      const major = Math.floor(dev / 256) & 0xfff;
      const minor = (dev & 0xff) | (Math.floor(dev / 4096) & 0xfff00);
      const kib = Math.max(4, Math.round(this.#readahead / 1024));
      await Deno.writeTextFile(`/sys/class/bdi/${major}:${minor}/read_ahead_kb`, `${kib}\n`);
    } catch (error) {
      this.#onError("setting the readahead", error);
    }
  }

  /**
   * Unmounts. A busy mount (the file is open, e.g. by a loop device) is
   * refused unless `lazy`, which detaches it now. Either way, once the
   * mount is gone the server stops reading requests (users of a lazily
   * detached file then get errors) and `closed` resolves when the requests
   * being served have finished. Resolves to whether the mount is gone.
   */
  async unmount(options: { lazy?: boolean } = {}): Promise<boolean> {
    if (this.#fd < 0 && !this.#pump) return true;
    if (!this.#unmounted) {
      let ok = await sys.umount2(this.#mountpoint, 0);
      if (!ok && options.lazy) ok = await sys.umount2(this.#mountpoint, sys.MNT_DETACH);
      if (!ok) return false;
      this.#unmounted = true;
    }
    this.#stopping = true;
    return true;
  }

  /** Resolves when no request is being served. */
  idle(): Promise<void> {
    if (this.#active === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  // ---- the request loop ------------------------------------------------------

  #takeRequestBuffer(): Uint8Array<ArrayBuffer> {
    return this.#spareRequestBuffers.pop() ?? new Uint8Array(this.#requestBufferSize);
  }

  #giveRequestBuffer(buf: Uint8Array<ArrayBuffer>): void {
    if (this.#spareRequestBuffers.length < MAX_SPARE_BUFFERS) this.#spareRequestBuffers.push(buf);
  }

  async #serve(): Promise<void> {
    try {
      while (true) {
        const n = this.#readAvailable();
        if (n > 0) {
          // A long burst: let the sockets and timers run before reading on.
          await new Promise((resolve) => setTimeout(resolve, 0));
          continue;
        }
        if (n === -sys.ENODEV) break; // unmounted: the kernel ended the connection
        if (n === -sys.EAGAIN) {
          if (this.#stopping) break;
          await sys.pollIn(this.#fd, 500);
          continue;
        }
        // EINTR, or ENOENT: a request that was interrupted before we read it.
        if (n === -sys.EINTR || n === -sys.ENOENT) continue;
        throw new sys.SyscallError("read", -n, "/dev/fuse");
      }
    } catch (error) {
      this.#onInit?.reject(error);
      this.#onError("the FUSE request loop", error);
    } finally {
      this.#unmounted = true;
      this.#stopped.resolve();
      this.#onInit?.reject(new Error("the file system was unmounted before it was ready"));
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<void>((resolve) => timer = setTimeout(resolve, STOP_GRACE_MS));
      await Promise.race([this.idle(), late]);
      clearTimeout(timer);
      if (this.#active > 0) {
        this.#onError(
          "stopping",
          new Error(`${this.#active} request(s) unanswered after ${STOP_GRACE_MS / 1000} s`),
        );
      }
      sys.closeFd(this.#fd);
      this.#fd = -1;
    }
  }

  /**
   * Reads and dispatches the requests the kernel has queued, up to a batch.
   * Returns the last read's result: positive when the batch filled up,
   * otherwise the negated errno that ended it (EAGAIN: none left).
   */
  #readAvailable(): number {
    let n = 0;
    for (let batch = 0; batch < READ_BATCH; batch++) {
      n = sys.read(this.#fd, this.#buffer);
      if (n <= 0) return n === 0 ? -sys.ENODEV : n;
      if (this.#dispatch(this.#buffer, n)) this.#buffer = this.#takeRequestBuffer();
    }
    return n;
  }

  /**
   * Called when the last request in progress has been answered. A program
   * doing one request at a time (dd, cp) sends its next one right after our
   * reply; waiting for it briefly on this thread saves the hand-over from
   * the polling thread (docs/performance.md).
   */
  #awaitNext(): void {
    if (this.#stopping || this.#unmounted || this.#fd < 0) return;
    if (this.#readAvailable() !== -sys.EAGAIN) return;
    if (sys.pollInNow(this.#fd, NEXT_REQUEST_WAIT_MS) > 0) this.#readAvailable();
  }

  #reply(bytes: Uint8Array<ArrayBuffer>): void {
    if (this.#fd < 0) return; // closed after the stop grace: the kernel failed the request
    const n = sys.write(this.#fd, bytes);
    // ENOENT: the request was interrupted meanwhile; ENODEV: unmounted. Both fine.
    if (n < 0 && n !== -sys.ENOENT && n !== -sys.ENODEV) {
      this.#onError("a reply to the kernel", new sys.SyscallError("write", -n, "/dev/fuse"));
    }
  }

  #error(unique: bigint, errno: number): void {
    this.#reply(encodeError(unique, errno));
  }

  /**
   * Handles one request. Returns true when the request keeps `buf` (a WRITE
   * whose data is still being sent), so the caller must read into another.
   */
  #dispatch(buf: Uint8Array<ArrayBuffer>, n: number): boolean {
    const view = new DataView(buf.buffer, buf.byteOffset, n);
    const header = decodeRequestHeader(view);

    const unique = header.unique;
    switch (header.opcode) {
      case FUSE_READ:
        this.#track(this.#read(header, view));
        return false;
      case FUSE_WRITE:
        this.#track(this.#write(header, view, buf));
        return true;
      case FUSE_INIT:
        this.#init(header, view);
        return false;
      case FUSE_LOOKUP:
        this.#lookup(header, buf, n);
        return false;
      case FUSE_GETATTR:
        this.#getattr(header);
        return false;
      case FUSE_SETATTR:
        this.#setattr(header, view);
        return false;
      case FUSE_OPEN:
        this.#open(header, view);
        return false;
      case FUSE_OPENDIR:
        if (header.nodeid !== FUSE_ROOT_ID || this.#naked) this.#error(unique, sys.ENOTDIR);
        else this.#reply(encodeOpenOut(unique, 0, 0));
        return false;
      case FUSE_READDIR:
        this.#readdir(header, view);
        return false;
      case FUSE_RELEASE:
        this.#openFiles = Math.max(0, this.#openFiles - 1);
        this.#reply(encodeError(unique, 0));
        return false;
      case FUSE_RELEASEDIR:
      case FUSE_FLUSH:
      case FUSE_FSYNCDIR:
      case FUSE_ACCESS:
        // FLUSH comes with every close(2); writes were already sent, and
        // durability is what fsync asks for, not close.
        this.#reply(encodeError(unique, 0));
        return false;
      case FUSE_FSYNC:
      case FUSE_SYNCFS:
        this.#track(this.#fsync(header));
        return false;
      case FUSE_FALLOCATE:
        this.#track(this.#fallocate(header, view));
        return false;
      case FUSE_LSEEK:
        this.#track(this.#lseek(header, view));
        return false;
      case FUSE_STATFS:
        this.#statfs(header);
        return false;
      case FUSE_FORGET:
      case FUSE_BATCH_FORGET:
      case FUSE_INTERRUPT:
        // No reply. Interrupted requests finish normally: NBD has no cancel.
        return false;
      case FUSE_DESTROY:
        this.#reply(encodeError(unique, 0));
        return false;
      default:
        // The kernel remembers ENOSYS for most optional operations (xattrs...).
        this.#error(unique, sys.ENOSYS);
        return false;
    }
  }

  #track(work: Promise<void>): void {
    this.#active++;
    work.finally(() => {
      this.#active--;
      if (this.#active === 0) {
        const waiters = this.#idleWaiters;
        this.#idleWaiters = [];
        for (const wake of waiters) wake();
        this.#awaitNext();
      }
    });
  }

  #init(header: RequestHeader, view: DataView): void {
    const init = decodeInitIn(view);
    if (init.major !== FUSE_KERNEL_VERSION) {
      // The kernel retries with our major version if it can.
      this.#reply(
        encodeInitOut(header.unique, {
          minor: FUSE_KERNEL_MINOR_VERSION,
          maxReadahead: 0,
          flags: 0,
          maxBackground: 0,
          congestionThreshold: 0,
          maxWrite: 0,
          maxPages: 0,
        }),
      );
      if (init.major < FUSE_KERNEL_VERSION) {
        this.#onInit?.reject(new Error(`the kernel speaks FUSE ${init.major}, not 7`));
      }
      return;
    }
    const wanted = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES;
    const minor = Math.min(init.minor, FUSE_KERNEL_MINOR_VERSION);
    const maxPages = Math.max(1, Math.floor(this.#maxRequest / PAGE_SIZE));
    this.#reply(
      encodeInitOut(header.unique, {
        minor,
        maxReadahead: init.maxReadahead,
        flags: init.flags & wanted,
        maxBackground: this.#maxBackground,
        congestionThreshold: Math.max(1, Math.floor(this.#maxBackground * 3 / 4)),
        maxWrite: maxPages * PAGE_SIZE,
        maxPages,
      }),
    );
    this.#initialized = true;
    this.#onInit?.resolve();
    this.#onInit = undefined;
  }

  #fileAttributes() {
    const size = this.#contents.size;
    return {
      ino: this.#fileIno,
      size,
      blocks: Math.ceil(size / 512),
      atimeMs: this.#atimeMs,
      mtimeMs: this.#mtimeMs,
      ctimeMs: this.#ctimeMs,
      mode: S_IFREG | (this.#readOnly ? 0o444 : 0o644),
      nlink: 1,
      uid: this.#uid,
      gid: this.#gid,
      blksize: Math.min(Math.max(this.#contents.blockSize, PAGE_SIZE), 1 << 20),
    };
  }

  #rootAttributes() {
    return {
      ino: FUSE_ROOT_ID,
      size: 0,
      blocks: 0,
      atimeMs: this.#startMs,
      mtimeMs: this.#startMs,
      ctimeMs: this.#startMs,
      mode: S_IFDIR | 0o755,
      nlink: 2,
      uid: this.#uid,
      gid: this.#gid,
      blksize: PAGE_SIZE,
    };
  }

  #lookup(header: RequestHeader, buf: Uint8Array, n: number): void {
    const name = decodeName(buf, IN_HEADER_SIZE, n);
    if (header.nodeid !== FUSE_ROOT_ID || this.#naked) {
      this.#error(header.unique, sys.ENOTDIR);
    } else if (name === this.#fileName) {
      this.#reply(encodeEntryOut(header.unique, this.#fileAttributes(), VALID_SECONDS));
    } else {
      this.#error(header.unique, sys.ENOENT);
    }
  }

  #getattr(header: RequestHeader): void {
    if (header.nodeid === this.#fileIno) {
      this.#reply(encodeAttrOut(header.unique, this.#fileAttributes(), VALID_SECONDS));
    } else if (header.nodeid === FUSE_ROOT_ID) {
      this.#reply(encodeAttrOut(header.unique, this.#rootAttributes(), VALID_SECONDS));
    } else {
      this.#error(header.unique, sys.ENOENT);
    }
  }

  #setattr(header: RequestHeader, view: DataView): void {
    const at = IN_HEADER_SIZE;
    const valid = view.getUint32(at, true);
    if (header.nodeid !== this.#fileIno) {
      this.#error(header.unique, sys.EPERM);
      return;
    }
    if (valid & (FATTR_MODE | FATTR_UID | FATTR_GID)) {
      this.#error(header.unique, sys.EPERM);
      return;
    }
    if (valid & FATTR_SIZE) {
      // Like a block device: O_TRUNC (size 0) is ignored, and the size of
      // the export cannot be changed from here.
      const size = getU64(view, at + 16);
      if (size !== 0 && size !== this.#contents.size) {
        this.#error(header.unique, sys.EINVAL);
        return;
      }
    }
    const now = Date.now();
    const time = (secondsAt: number, nanosAt: number) =>
      getU64(view, secondsAt) * 1000 + view.getUint32(nanosAt, true) / 1e6;
    if (valid & FATTR_ATIME_NOW) this.#atimeMs = now;
    else if (valid & FATTR_ATIME) this.#atimeMs = time(at + 32, at + 56);
    if (valid & FATTR_MTIME_NOW) this.#mtimeMs = now;
    else if (valid & FATTR_MTIME) this.#mtimeMs = time(at + 40, at + 60);
    this.#ctimeMs = now;
    this.#reply(encodeAttrOut(header.unique, this.#fileAttributes(), VALID_SECONDS));
  }

  #open(header: RequestHeader, view: DataView): void {
    if (header.nodeid !== this.#fileIno) {
      this.#error(header.unique, sys.EISDIR);
      return;
    }
    const flags = view.getUint32(IN_HEADER_SIZE, true);
    if (this.#readOnly && (flags & 3) !== 0) {
      this.#error(header.unique, sys.EROFS);
      return;
    }
    this.#openFiles++;
    // No FOPEN_KEEP_CACHE: each open drops cached pages, so data written to
    // the export by other clients shows up when the file is opened again.
    this.#reply(encodeOpenOut(header.unique, this.#nextFh++, FOPEN_PARALLEL_DIRECT_WRITES));
  }

  #readdir(header: RequestHeader, view: DataView): void {
    if (header.nodeid !== FUSE_ROOT_ID || this.#naked) {
      this.#error(header.unique, sys.ENOTDIR);
      return;
    }
    const offset = getU64(view, IN_HEADER_SIZE + 8);
    const size = view.getUint32(IN_HEADER_SIZE + 16, true);
    const entries: DirEntry[] = [
      { ino: FUSE_ROOT_ID, name: ".", type: DT_DIR },
      { ino: FUSE_ROOT_ID, name: "..", type: DT_DIR },
      { ino: this.#fileIno, name: this.#fileName, type: DT_REG },
    ];
    this.#reply(encodeDirents(header.unique, entries, offset, size));
  }

  #statfs(header: RequestHeader): void {
    const blockSize = PAGE_SIZE;
    this.#reply(
      encodeStatfsOut(header.unique, {
        blocks: Math.ceil(this.#contents.size / blockSize),
        free: 0,
        blockSize,
        files: 1,
      }),
    );
  }

  async #read(header: RequestHeader, view: DataView): Promise<void> {
    const offset = getU64(view, IN_HEADER_SIZE + 8);
    const requested = view.getUint32(IN_HEADER_SIZE + 16, true);
    const unique = header.unique;
    const size = this.#contents.size;
    const length = offset >= size ? 0 : Math.min(requested, size - offset);
    const capacity = OUT_HEADER_SIZE + this.#maxRequest;
    let reply: Uint8Array<ArrayBuffer>;
    if (OUT_HEADER_SIZE + length <= capacity) {
      reply = this.#spareReplyBuffers.pop() ?? new Uint8Array(capacity);
    } else {
      reply = new Uint8Array(OUT_HEADER_SIZE + length);
    }
    try {
      if (length > 0) {
        await this.#contents.read(
          reply.subarray(OUT_HEADER_SIZE, OUT_HEADER_SIZE + length),
          offset,
        );
      }
      const bytes = reply.subarray(0, OUT_HEADER_SIZE + length);
      writeReplyHeader(new DataView(reply.buffer), unique, 0, bytes.length);
      if (length >= THREADED_REPLY && this.#fd >= 0) await sys.writeAsync(this.#fd, bytes);
      else this.#reply(bytes);
    } catch (error) {
      this.#onError(`READ of ${length} bytes at offset ${offset}`, error);
      this.#error(unique, errnoOf(error));
    } finally {
      if (reply.length === capacity && this.#spareReplyBuffers.length < MAX_SPARE_BUFFERS) {
        this.#spareReplyBuffers.push(reply);
      }
    }
  }

  async #write(
    header: RequestHeader,
    view: DataView,
    buf: Uint8Array<ArrayBuffer>,
  ): Promise<void> {
    const unique = header.unique;
    try {
      const offset = getU64(view, IN_HEADER_SIZE + 8);
      const requested = view.getUint32(IN_HEADER_SIZE + 16, true);
      const size = this.#contents.size;
      if (this.#readOnly) {
        this.#error(unique, sys.EROFS);
        return;
      }
      if (offset >= size) {
        this.#error(unique, requested === 0 ? 0 : sys.ENOSPC);
        return;
      }
      // A write past the end is cut short, as on a block device.
      const length = Math.min(requested, size - offset);
      const start = IN_HEADER_SIZE + WRITE_IN_SIZE;
      try {
        await this.#contents.write(buf.subarray(start, start + length), offset);
        this.#reply(encodeWriteOut(unique, length));
      } catch (error) {
        this.#onError(`WRITE of ${length} bytes at offset ${offset}`, error);
        this.#error(unique, errnoOf(error));
      }
    } finally {
      this.#giveRequestBuffer(buf);
    }
  }

  async #fsync(header: RequestHeader): Promise<void> {
    try {
      if (!this.#readOnly) await this.#contents.flush();
      this.#reply(encodeError(header.unique, 0));
    } catch (error) {
      this.#onError("FSYNC", error);
      this.#error(header.unique, errnoOf(error));
    }
  }

  async #fallocate(header: RequestHeader, view: DataView): Promise<void> {
    const at = IN_HEADER_SIZE;
    const offset = getU64(view, at + 8);
    const requested = getU64(view, at + 16);
    const mode = view.getUint32(at + 24, true);
    const unique = header.unique;
    const size = this.#contents.size;
    if (this.#readOnly) {
      this.#error(unique, sys.EROFS);
      return;
    }
    const keepSize = (mode & FALLOC_FL_KEEP_SIZE) !== 0;
    if (offset + requested > size && !keepSize) {
      this.#error(unique, sys.ENOSPC); // the file cannot grow
      return;
    }
    const length = offset >= size ? 0 : Math.min(requested, size - offset);
    const operation = mode & ~FALLOC_FL_KEEP_SIZE;
    try {
      if (operation === 0) {
        // Plain allocation: every byte of the file already exists.
      } else if (operation === FALLOC_FL_PUNCH_HOLE && keepSize) {
        if (length > 0) await this.#contents.punchHole(offset, length);
      } else if (operation === FALLOC_FL_ZERO_RANGE) {
        if (length > 0) await this.#contents.zeroRange(offset, length);
      } else {
        this.#error(unique, sys.EOPNOTSUPP);
        return;
      }
      this.#reply(encodeError(unique, 0));
    } catch (error) {
      this.#onError(`FALLOCATE of ${length} bytes at offset ${offset}`, error);
      this.#error(unique, errnoOf(error));
    }
  }

  async #lseek(header: RequestHeader, view: DataView): Promise<void> {
    const at = IN_HEADER_SIZE;
    const offset = getU64(view, at + 8);
    const whence = view.getUint32(at + 16, true);
    const unique = header.unique;
    const contents = this.#contents;
    if ((whence !== SEEK_DATA && whence !== SEEK_HOLE) || !contents.seekData) {
      this.#error(unique, sys.ENOSYS); // the kernel then treats the file as all data
      return;
    }
    if (offset >= contents.size) {
      this.#error(unique, sys.ENXIO);
      return;
    }
    try {
      const found = whence === SEEK_DATA
        ? await contents.seekData(offset)
        : await contents.seekHole!(offset);
      if (whence === SEEK_DATA && found >= contents.size) this.#error(unique, sys.ENXIO);
      else this.#reply(encodeLseekOut(unique, found));
    } catch (error) {
      this.#onError("LSEEK", error);
      this.#error(unique, errnoOf(error));
    }
  }
}
