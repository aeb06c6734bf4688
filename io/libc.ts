/**
 * The libc calls Deno does not expose, in one place: lseek with
 * SEEK_DATA/SEEK_HOLE, fallocate (punch hole, zero range), the
 * block-device size, a listening Unix socket as a plain file descriptor
 * (to hand to a child process for socket activation), plain pread/pwrite,
 * the calls that advise on, write back and drop ranges of the page cache,
 * and what `nbd mount` needs: read and write on /dev/fuse, poll, mount(2)
 * and umount2(2). Each symbol is bound through FFI on its first use
 * (ffi.ts), and only where the platform switch (platform.ts) chose the
 * Linux fast paths; lseek alone is also bound on the portable paths, from
 * the platform's C library. Elsewhere these functions report that they
 * are unavailable, and callers take the portable path (file_io.ts).
 *
 * errno is thread-local, and FFI calls declared `nonblocking` run on a
 * worker thread, so only synchronous calls report errno. The calls that may
 * block for long (poll, umount2) are non-blocking and report just success
 * or failure; callers check the outcome another way where it matters.
 *
 * @module
 */

import { lazyLibc, lazyPosixLibc } from "./ffi.ts";
import { platform } from "./platform.ts";

const SEEK_END = 2;
/** SEEK_DATA and SEEK_HOLE are 3 and 4 on Linux, 4 and 3 on macOS. */
const SEEK_DATA = Deno.build.os === "darwin" ? 4 : 3;
const SEEK_HOLE = Deno.build.os === "darwin" ? 3 : 4;
/** fallocate mode bits. */
export const FALLOC_FL_KEEP_SIZE = 0x01;
/** Deallocate the range (reads as zeroes afterwards). */
export const FALLOC_FL_PUNCH_HOLE = 0x02;
/** Zero the range, keeping it allocated. */
export const FALLOC_FL_ZERO_RANGE = 0x10;

/**
 * The POSIX calls of the portable paths too (platform.ts): lseek and the
 * platform's way to errno, bound from glibc or libSystem where FFI is allowed.
 */
const POSIX_SYMBOLS = {
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  errno_location: {
    name: Deno.build.os === "darwin" ? "__error" : "__errno_location",
    parameters: [],
    result: "pointer",
  },
} as const;

const posix = lazyPosixLibc(POSIX_SYMBOLS);

/** The Linux fast paths' calls: bound only where the platform switch chose them. */
const SYMBOLS = {
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32", nonblocking: true },
  __errno_location: { parameters: [], result: "pointer" },
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  listen: { parameters: ["i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  strerror: { parameters: ["i32"], result: "pointer" },
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  preadv2: { parameters: ["i32", "buffer", "i32", "i64", "i32"], result: "isize" },
  cachestat: {
    name: "syscall",
    parameters: ["i64", "i64", "buffer", "buffer", "i64"],
    result: "i64",
  },
  pread_on_thread: {
    name: "pread",
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: true,
  },
  pwrite_on_thread: {
    name: "pwrite",
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: true,
  },
  sync_file_range: { parameters: ["i32", "i64", "i64", "u32"], result: "i32", nonblocking: true },
  posix_fadvise: { parameters: ["i32", "i64", "i64", "i32"], result: "i32", nonblocking: true },
  sync_file_range_here: {
    name: "sync_file_range",
    parameters: ["i32", "i64", "i64", "u32"],
    result: "i32",
  },
  posix_fadvise_here: {
    name: "posix_fadvise",
    parameters: ["i32", "i64", "i64", "i32"],
    result: "i32",
  },
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  ioctl_on_thread: {
    name: "ioctl",
    parameters: ["i32", "u64", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  fsync: { parameters: ["i32"], result: "i32" },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  write_async: {
    name: "write",
    parameters: ["i32", "buffer", "usize"],
    result: "isize",
    nonblocking: true,
  },
  poll: { parameters: ["buffer", "u64", "i32"], result: "i32", nonblocking: true },
  poll_sync: { name: "poll", parameters: ["buffer", "u64", "i32"], result: "i32" },
  mount: { parameters: ["buffer", "buffer", "buffer", "u64", "buffer"], result: "i32" },
  umount2: { parameters: ["buffer", "i32"], result: "i32", nonblocking: true },
  umount2_sync: { name: "umount2", parameters: ["buffer", "i32"], result: "i32" },
} as const;

const libc = lazyLibc(SYMBOLS);

/** mount(2) flags. */
export const MS_RDONLY = 1;
/** Ignore set-user-id bits. */
export const MS_NOSUID = 2;
/** Do not interpret device files. */
export const MS_NODEV = 4;
/** umount2(2): detach now, clean up once no longer busy. */
export const MNT_DETACH = 2;

/** errno values this code reacts to. */
export const EPERM = 1;
/** No such file or directory. */
export const ENOENT = 2;
/** Interrupted system call. */
export const EINTR = 4;
/** Input/output error. */
export const EIO = 5;
/** No such device or address. */
export const ENXIO = 6;
/** Try again. */
export const EAGAIN = 11;
/** Out of memory. */
export const ENOMEM = 12;
/** Permission denied. */
export const EACCES = 13;
/** Device or resource busy. */
export const EBUSY = 16;
/** No such device (the FUSE connection is gone). */
export const ENODEV = 19;
/** Not a directory. */
export const ENOTDIR = 20;
/** Is a directory. */
export const EISDIR = 21;
/** Invalid argument. */
export const EINVAL = 22;
/** File too large. */
export const EFBIG = 27;
/** No space left on device. */
export const ENOSPC = 28;
/** Read-only file system. */
export const EROFS = 30;
/** Function not implemented. */
export const ENOSYS = 38;
/** Value too large for defined data type. */
export const EOVERFLOW = 75;
/** Operation not supported. */
export const EOPNOTSUPP = 95;
/** Cannot send after transport endpoint shutdown. */
export const ESHUTDOWN = 108;

const ERRNO_TEXT: Record<number, string> = {
  [EPERM]: "operation not permitted",
  [ENOENT]: "no such file or directory",
  [EINTR]: "interrupted",
  [EIO]: "input/output error",
  [ENXIO]: "no such device or address",
  [EAGAIN]: "resource temporarily unavailable",
  [ENOMEM]: "out of memory",
  [EACCES]: "permission denied",
  [EBUSY]: "device or resource busy",
  [ENODEV]: "no such device",
  [ENOTDIR]: "not a directory",
  [EISDIR]: "is a directory",
  [EINVAL]: "invalid argument",
  [ENOSPC]: "no space left on device",
  [EROFS]: "read-only file system",
  [ENOSYS]: "function not implemented",
  [EFBIG]: "file too large",
  [EOPNOTSUPP]: "operation not supported",
};

/** A short text for an errno value. */
export function errnoText(errno: number): string {
  return ERRNO_TEXT[errno] ?? `errno ${errno}`;
}

/** errno of the last synchronous call on this thread (0 without FFI). */
export function errno(): number {
  const l = libc();
  if (!l) return 0;
  const ptr = l.symbols.__errno_location();
  return ptr ? new Deno.UnsafePointerView(ptr).getInt32() : 0;
}

/**
 * Next data offset at or after `offset` (SEEK_DATA): the offset itself when
 * it is in data, `size` when only a hole follows, undefined if unsupported.
 */
export function seekData(fd: number, offset: number): number | undefined {
  const l = posix();
  if (!l) return undefined;
  const r = Number(l.symbols.lseek(fd, BigInt(offset), SEEK_DATA));
  if (r >= 0) return r;
  // ENXIO is 6 on Linux and macOS alike.
  const ptr = l.symbols.errno_location();
  return ptr && new Deno.UnsafePointerView(ptr).getInt32() === ENXIO ? Infinity : undefined;
}

/** Next hole offset at or after `offset` (SEEK_HOLE); the end of file counts as a hole. */
export function seekHole(fd: number, offset: number): number | undefined {
  const l = posix();
  if (!l) return undefined;
  const r = Number(l.symbols.lseek(fd, BigInt(offset), SEEK_HOLE));
  return r >= 0 ? r : undefined;
}

/** Size by seeking to the end: works for block devices, where fstat says 0. */
export function seekEnd(fd: number): number | undefined {
  const l = posix();
  if (!l) return undefined;
  const r = Number(l.symbols.lseek(fd, 0n, SEEK_END));
  return r >= 0 ? r : undefined;
}

/** fallocate(2); resolves to true on success, false if unsupported or failed. */
export async function fallocate(
  fd: number,
  mode: number,
  offset: number,
  length: number,
): Promise<boolean> {
  const l = libc();
  if (!l) return false;
  return (await l.symbols.fallocate(fd, mode, BigInt(offset), BigInt(length))) === 0;
}

const AF_UNIX = 1;
const SOCK_STREAM = 1;
/** Keeps the descriptor out of other children; the one it is handed to gets a dup without it. */
const SOCK_CLOEXEC = 0o2000000;
/** sizeof(struct sockaddr_un) on Linux: a 2-byte family and a 108-byte path. */
const SOCKADDR_UN_SIZE = 110;

/** The system's text for errno `code` ("No such file or directory"). */
function strerror(code: number): string {
  const text = libc()?.symbols.strerror(code);
  return text ? new Deno.UnsafePointerView(text).getCString() : errnoText(code);
}

function osError(call: string): Error {
  return new Error(`${call}: ${strerror(errno())}`);
}

/**
 * Creates a Unix socket listening at `path` and returns its file descriptor
 * (close-on-exec). Throws when FFI is unavailable or a call fails.
 */
export function listenUnixFd(path: string, backlog = 128): number {
  const l = libc();
  if (!l) throw new Error("cannot create a listening socket: FFI (--allow-ffi) is not available");
  const bytes = new TextEncoder().encode(path);
  if (bytes.length >= SOCKADDR_UN_SIZE - 2) throw new Error(`socket path is too long: ${path}`);
  const address = new Uint8Array(SOCKADDR_UN_SIZE);
  new DataView(address.buffer).setUint16(0, AF_UNIX, true);
  address.set(bytes, 2);
  const fd = l.symbols.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw osError("socket");
  if (l.symbols.bind(fd, address, SOCKADDR_UN_SIZE) !== 0) {
    const error = osError(`bind ${path}`);
    l.symbols.close(fd);
    throw error;
  }
  if (l.symbols.listen(fd, backlog) !== 0) {
    const error = osError("listen");
    l.symbols.close(fd);
    throw error;
  }
  return fd;
}

/** close(2) of a descriptor made here (`listenUnixFd`, `openFd`). */
export function closeFd(fd: number): void {
  libc()?.symbols.close(fd);
}

/**
 * pread(2), synchronous: the count read, or -1 on failure (callers that need
 * the reason repeat the call with node:fs, whose error carries it);
 * undefined when FFI is unavailable.
 */
export function pread(fd: number, buf: Uint8Array, offset: number): number | undefined {
  const l = libc();
  if (!l) return undefined;
  return Number(l.symbols.pread(fd, buf, BigInt(buf.length), BigInt(offset)));
}

/** preadv2 flag: only what is in the page cache, EAGAIN instead of waiting for the disk. */
const RWF_NOWAIT = 0x08;
/** The one struct iovec { void *base; size_t len } of `preadCached`, filled anew by each call. */
const IOVEC = new BigUint64Array(2);

/**
 * Reads what of `buf.length` bytes at `offset` the page cache holds, without
 * waiting for the disk (preadv2 with RWF_NOWAIT): the count (0 at the end of
 * the file); undefined when the range is not cached; null when reads of this
 * descriptor cannot be made that way (not supported, no FFI, or an error,
 * which a plain read then reports).
 */
export function preadCached(
  fd: number,
  buf: Uint8Array,
  offset: number,
): number | undefined | null {
  const l = libc();
  if (!l) return null;
  if (buf.length === 0) return 0;
  IOVEC[0] = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
  IOVEC[1] = BigInt(buf.length);
  const n = Number(l.symbols.preadv2(fd, IOVEC, 1, BigInt(offset), RWF_NOWAIT));
  if (n >= 0) return n;
  return errno() === EAGAIN ? undefined : null;
}

/** cachestat(2)'s number: one number on every architecture for system calls this recent. */
const SYS_CACHESTAT = 451n;
/** Its struct cachestat_range { u64 off, len } and struct cachestat (nr_cache first). */
const CACHESTAT_RANGE = new BigUint64Array(2);
const CACHESTAT = new BigUint64Array(5);
const PAGE = 4096;

/**
 * Whether every page under `length` bytes at `offset` of `fd` is in the
 * page cache right now (cachestat(2), Linux 6.5 and later); undefined when
 * the call is unavailable (older kernel, no FFI, a file it does not serve).
 */
export function rangeCached(fd: number, offset: number, length: number): boolean | undefined {
  const l = libc();
  if (!l || length <= 0) return undefined;
  CACHESTAT_RANGE[0] = BigInt(offset);
  CACHESTAT_RANGE[1] = BigInt(length);
  if (l.symbols.cachestat(SYS_CACHESTAT, BigInt(fd), CACHESTAT_RANGE, CACHESTAT, 0n) !== 0n) {
    return undefined;
  }
  // Counted in pages (of 4 KiB; with larger pages the count falls short, which only says no).
  const pages = Math.ceil((offset + length) / PAGE) - Math.floor(offset / PAGE);
  return Number(CACHESTAT[0]) >= pages;
}

/** pread or pwrite on one of the runtime's threads: the count, -1 on failure, undefined without FFI. */
async function onThread(
  call: "pread_on_thread" | "pwrite_on_thread",
  fd: number,
  buf: Uint8Array,
  offset: number,
): Promise<number | undefined> {
  const l = libc();
  if (!l) return undefined;
  return Number(await l.symbols[call](fd, buf, BigInt(buf.length), BigInt(offset)));
}

/**
 * pread(2) on one of the runtime's threads, so that waiting for the disk
 * does not stop the event loop: the count, or -1 on failure (the error is
 * that thread's; repeat the call with node:fs to learn it); undefined
 * without FFI.
 */
export function preadOnThread(
  fd: number,
  buf: Uint8Array,
  offset: number,
): Promise<number | undefined> {
  return onThread("pread_on_thread", fd, buf, offset);
}

/** pwrite(2) on one of the runtime's threads, like `preadOnThread`. */
export function pwriteOnThread(
  fd: number,
  buf: Uint8Array,
  offset: number,
): Promise<number | undefined> {
  return onThread("pwrite_on_thread", fd, buf, offset);
}

/** pwrite(2), synchronous, like `pread`. */
export function pwrite(fd: number, buf: Uint8Array, offset: number): number | undefined {
  const l = libc();
  if (!l) return undefined;
  return Number(l.symbols.pwrite(fd, buf, BigInt(buf.length), BigInt(offset)));
}

/** posix_fadvise(POSIX_FADV_SEQUENTIAL): the whole file will be read in order. */
export async function adviseSequential(fd: number): Promise<boolean> {
  const l = libc();
  if (!l) return false;
  return (await l.symbols.posix_fadvise(fd, 0n, 0n, POSIX_FADV_SEQUENTIAL)) === 0;
}

/** posix_fadvise(2) advice for a whole file: how it will be accessed. */
export type FileAdvice = "normal" | "random" | "sequential";

const FADVISE: Record<FileAdvice, number> = { normal: 0, random: 1, sequential: 2 };

/** posix_fadvise(2) over the whole file, on this thread (it only sets the readahead policy); false if unsupported or failed. */
export function adviseFile(fd: number, advice: FileAdvice): boolean {
  const l = libc();
  if (!l) return false;
  return l.symbols.posix_fadvise_here(fd, 0n, 0n, FADVISE[advice]) === 0;
}

/** Block-device ioctl requests (Linux, <linux/fs.h>). */
const BLKROGET = 0x125e;
const BLKSSZGET = 0x1268;
const BLKDISCARD = 0x1277;
const BLKZEROOUT = 0x127f;
const BLKGETSIZE64 = 0x80081272;

/** What the kernel says about a block device. */
export interface BlockDeviceInfo {
  /** Size in bytes (BLKGETSIZE64). */
  size: number;
  /** The device refuses writes (BLKROGET). */
  readOnly: boolean;
  /** Logical sector size (BLKSSZGET): the alignment of discard and zero-out ranges. */
  sectorSize: number;
}

/** Size, read-only flag and sector size of the block device open as `fd`; undefined without FFI or on failure. */
export function blockDeviceInfo(fd: number): BlockDeviceInfo | undefined {
  const l = libc();
  if (!l) return undefined;
  const size = new BigUint64Array(1);
  const ints = new Int32Array(2);
  if (l.symbols.ioctl(fd, BigInt(BLKGETSIZE64), size) !== 0) return undefined;
  if (l.symbols.ioctl(fd, BigInt(BLKROGET), ints.subarray(0, 1)) !== 0) return undefined;
  if (l.symbols.ioctl(fd, BigInt(BLKSSZGET), ints.subarray(1, 2)) !== 0) ints[1] = 512;
  return { size: Number(size[0]), readOnly: ints[0] !== 0, sectorSize: ints[1]! || 512 };
}

/** An ioctl taking a { start, length } byte range, on a runtime thread: whether it succeeded. */
async function rangeIoctl(fd: number, request: number, offset: number, length: number) {
  const l = libc();
  if (!l) return false;
  const range = new BigUint64Array([BigInt(offset), BigInt(length)]);
  return (await l.symbols.ioctl_on_thread(fd, BigInt(request), range)) === 0;
}

/** BLKDISCARD: the device may forget the range (sector-aligned); false if unsupported or failed. */
export function discardRange(fd: number, offset: number, length: number): Promise<boolean> {
  return rangeIoctl(fd, BLKDISCARD, offset, length);
}

/** BLKZEROOUT: the range reads as zeroes (sector-aligned); false if unsupported or failed. */
export function zeroOutRange(fd: number, offset: number, length: number): Promise<boolean> {
  return rangeIoctl(fd, BLKZEROOUT, offset, length);
}

/** sync_file_range flags: wait for writeback already under way on the range. */
export const SYNC_FILE_RANGE_WAIT_BEFORE = 1;
/** Start writeback of the dirty pages of the range. */
export const SYNC_FILE_RANGE_WRITE = 2;
/** Wait for the writeback of the range to finish. */
export const SYNC_FILE_RANGE_WAIT_AFTER = 4;
const POSIX_FADV_SEQUENTIAL = 2;
const POSIX_FADV_DONTNEED = 4;

/** sync_file_range(2) on a worker thread; resolves to false if unsupported or failed. */
export async function syncFileRange(
  fd: number,
  offset: number,
  length: number,
  flags: number,
): Promise<boolean> {
  const l = libc();
  if (!l) return false;
  return (await l.symbols.sync_file_range(fd, BigInt(offset), BigInt(length), flags)) === 0;
}

/** posix_fadvise(POSIX_FADV_DONTNEED): drops clean cached pages of the range. */
export async function dropCache(fd: number, offset: number, length: number): Promise<boolean> {
  const l = libc();
  if (!l) return false;
  return (await l.symbols.posix_fadvise(
    fd,
    BigInt(offset),
    BigInt(length),
    POSIX_FADV_DONTNEED,
  )) ===
    0;
}

/**
 * sync_file_range(2) on the calling thread, which waits as long as the
 * call does: for a thread of its own (write_worker.ts), not the event
 * loop's. False if unsupported or failed.
 */
export function syncFileRangeHere(
  fd: number,
  offset: number,
  length: number,
  flags: number,
): boolean {
  const l = libc();
  if (!l) return false;
  return l.symbols.sync_file_range_here(fd, BigInt(offset), BigInt(length), flags) === 0;
}

/** posix_fadvise(POSIX_FADV_DONTNEED) on the calling thread, like `syncFileRangeHere`. */
export function dropCacheHere(fd: number, offset: number, length: number): boolean {
  const l = libc();
  if (!l) return false;
  return l.symbols.posix_fadvise_here(
    fd,
    BigInt(offset),
    BigInt(length),
    POSIX_FADV_DONTNEED,
  ) === 0;
}

/** Names of the errno values a file operation commonly meets (Linux numbering). */
const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM",
  2: "ENOENT",
  5: "EIO",
  6: "ENXIO",
  9: "EBADF",
  12: "ENOMEM",
  13: "EACCES",
  16: "EBUSY",
  17: "EEXIST",
  20: "ENOTDIR",
  21: "EISDIR",
  22: "EINVAL",
  24: "EMFILE",
  26: "ETXTBSY",
  27: "EFBIG",
  28: "ENOSPC",
  30: "EROFS",
  36: "ENAMETOOLONG",
  40: "ELOOP",
  95: "EOPNOTSUPP",
  122: "EDQUOT",
};

/** The errno number (Linux numbering) of an error code such as "ENOSPC"; EIO when unknown. */
export function errnoOf(code: string | undefined): number {
  for (const [number, name] of Object.entries(ERRNO_NAMES)) {
    if (name === code) return Number(number);
  }
  return EIO;
}

/** A failed system call: `code` is the errno name ("ENOSPC"), the message the system's text. */
export class SystemError extends Error {
  /** The errno name, or "E" and the number when it has no name here. */
  readonly code: string;
  /** The errno number. */
  readonly errno: number;

  /** Describes errno `errno`. */
  constructor(errno: number) {
    // In the lower case of the rest of our messages: "no space left on device".
    const reason = strerror(errno);
    super(reason.charAt(0).toLowerCase() + reason.slice(1));
    this.name = "SystemError";
    this.errno = errno;
    this.code = ERRNO_NAMES[errno] ?? `E${errno}`;
  }
}

/** The error of the libc call just made on this thread. */
export function lastError(): SystemError {
  return new SystemError(errno());
}

/** open(2) flags. */
export const O_RDONLY = 0;
/** Read and write. */
export const O_RDWR = 2;
/** Write only. */
export const O_WRONLY = 1;
/** Create the file if it does not exist. */
export const O_CREAT = 0o100;
/** With O_CREAT: fail if it exists. */
export const O_EXCL = 0o200;
/** Not inherited by child processes. */
const O_CLOEXEC = 0o2000000;
/** Transfers go between the device and the caller's buffer, bypassing the page cache. */
export const O_DIRECT = Deno.build.arch === "aarch64" ? 0o200000 : 0o40000;
/** Opens without waiting (a FIFO with no peer yet, say). */
export const O_NONBLOCK = 0o4000;

/**
 * open(2): the descriptor; throws `SystemError`. Undefined when FFI is
 * unavailable.
 */
export function openFd(path: string, flags: number, mode = 0o666): number | undefined {
  const l = libc();
  if (!l) return undefined;
  const bytes = new TextEncoder().encode(path + "\0");
  const fd = l.symbols.open(bytes, flags | O_CLOEXEC, mode);
  if (fd < 0) throw lastError();
  return fd;
}

/** ftruncate(2); throws `SystemError`. */
export function truncateFd(fd: number, size: number): void {
  const l = libc();
  if (!l) throw new Error("ftruncate: FFI (--allow-ffi) is not available");
  if (l.symbols.ftruncate(fd, BigInt(size)) !== 0) throw lastError();
}

/**
 * Makes the file durable: the bulk of its dirty data is written and waited
 * for on a helper thread (sync_file_range), then fsync(2) runs here, where
 * its error can still be read: it reports any writeback error of the file.
 * Throws `SystemError`.
 */
export async function syncFd(fd: number): Promise<void> {
  const l = libc();
  if (!l) throw new Error("fsync: FFI (--allow-ffi) is not available");
  await l.symbols.sync_file_range(
    fd,
    0n,
    0n,
    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER,
  );
  if (l.symbols.fsync(fd) !== 0) throw lastError();
}

/** libc, for the calls that cannot do without it: throws, saying why it is unavailable. */
function required(): NonNullable<ReturnType<typeof libc>> {
  const l = libc();
  if (l) return l;
  throw new Error(`Cannot load libc: the Linux fast paths are off (${platform().why})`);
}

const encoder = new TextEncoder();

/** A NUL-terminated C string. */
function cString(text: string): Uint8Array<ArrayBuffer> {
  const bytes = encoder.encode(text);
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}

/** A failed call of `nbd mount`'s: "mount /mnt: permission denied", with its errno. */
export class SyscallError extends SystemError {
  /** Creates the error for `call` (on `detail`, a path say) failing with `errnoValue`. */
  constructor(call: string, errnoValue: number, detail?: string) {
    super(errnoValue);
    this.message = `${call}${detail ? ` ${detail}` : ""}: ${errnoText(errnoValue)}`;
    this.name = "SyscallError";
  }
}

/** read(2): the byte count, or the negated errno. */
export function read(fd: number, buf: Uint8Array<ArrayBuffer>): number {
  const n = Number(required().symbols.read(fd, buf, BigInt(buf.length)));
  return n >= 0 ? n : -errno();
}

/** write(2): the byte count, or the negated errno. */
export function write(fd: number, buf: Uint8Array<ArrayBuffer>): number {
  const n = Number(required().symbols.write(fd, buf, BigInt(buf.length)));
  return n >= 0 ? n : -errno();
}

/**
 * write(2) on a worker thread: the byte count, or -1 on failure (errno
 * stays on that thread).
 */
export async function writeAsync(fd: number, buf: Uint8Array<ArrayBuffer>): Promise<number> {
  const n = Number(await required().symbols.write_async(fd, buf, BigInt(buf.length)));
  return n >= 0 ? n : -1;
}

/** poll(2) flags. */
const POLLIN = 1;

/**
 * Waits on a worker thread until `fd` is readable or `timeoutMs` passes;
 * resolves to the `revents` bits (0 on timeout or failure).
 */
export async function pollIn(fd: number, timeoutMs: number): Promise<number> {
  const fds = new Uint8Array(8);
  const view = new DataView(fds.buffer);
  view.setInt32(0, fd, true);
  view.setInt16(4, POLLIN, true);
  const n = await required().symbols.poll(fds, 1n, timeoutMs);
  return n > 0 ? view.getInt16(6, true) : 0;
}

/**
 * poll(2) on this thread, blocking it for up to `timeoutMs`: only for very
 * short waits. Returns the `revents` bits (0 on timeout or failure).
 */
export function pollInNow(fd: number, timeoutMs: number): number {
  const fds = new Uint8Array(8);
  const view = new DataView(fds.buffer);
  view.setInt32(0, fd, true);
  view.setInt16(4, POLLIN, true);
  const n = required().symbols.poll_sync(fds, 1n, timeoutMs);
  return n > 0 ? view.getInt16(6, true) : 0;
}

/** mount(2); throws `SyscallError` on failure. */
export function mount(
  source: string,
  target: string,
  type: string,
  flags: number,
  data: string,
): void {
  const r = required().symbols.mount(
    cString(source),
    cString(target),
    cString(type),
    BigInt(flags),
    cString(data),
  );
  if (r !== 0) throw new SyscallError("mount", errno(), target);
}

/**
 * umount2(2) on a worker thread, so that a FUSE server in this process can
 * keep answering the kernel meanwhile; resolves to whether it succeeded.
 */
export async function umount2(target: string, flags: number): Promise<boolean> {
  return (await required().symbols.umount2(cString(target), flags)) === 0;
}

/**
 * umount2(2) on this thread; throws `SyscallError` (e.g. EBUSY) on failure.
 * Only for processes that do not serve the mount themselves.
 */
export function umount2Sync(target: string, flags: number): void {
  if (required().symbols.umount2_sync(cString(target), flags) !== 0) {
    throw new SyscallError("umount", errno(), target);
  }
}
