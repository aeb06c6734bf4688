/**
 * The libc calls `nbd mount` needs and Deno does not expose: open, read and
 * write on /dev/fuse, poll, mount(2) and umount2(2). Loaded lazily through
 * FFI (`--allow-ffi`).
 *
 * errno is thread-local, and FFI calls declared `nonblocking` run on a
 * worker thread, so only synchronous calls report errno. The calls that may
 * block for long (poll, umount2) are non-blocking and report just success
 * or failure; callers check the outcome another way where it matters.
 *
 * @module
 */

/** open(2) flags used here. */
export const O_RDONLY = 0;
/** Open for reading and writing. */
export const O_RDWR = 2;
/** Fail with EBUSY if a block device is in use (mounted, claimed). */
export const O_EXCL = 0o200;
/** Reads return EAGAIN instead of blocking. */
export const O_NONBLOCK = 0o4000;
/** Close the descriptor in child processes. */
export const O_CLOEXEC = 0o2000000;

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
/** Connection timed out. */
export const ETIMEDOUT = 110;

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
};

/** A short text for an errno value. */
export function errnoText(errno: number): string {
  return ERRNO_TEXT[errno] ?? `errno ${errno}`;
}

const SYMBOLS = {
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
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
  __errno_location: { parameters: [], result: "pointer" },
} as const;

let lib: Deno.DynamicLibrary<typeof SYMBOLS> | undefined;

function libc(): Deno.DynamicLibrary<typeof SYMBOLS> {
  if (!lib) {
    try {
      lib = Deno.dlopen("libc.so.6", SYMBOLS);
    } catch (error) {
      const why = error instanceof Deno.errors.NotCapable
        ? "FFI is not allowed (run with --allow-ffi or -A)"
        : (error as Error).message;
      throw new Error(`Cannot load libc for FUSE: ${why}`, { cause: error });
    }
  }
  return lib;
}

const encoder = new TextEncoder();

/** A NUL-terminated C string. */
function cString(text: string): Uint8Array<ArrayBuffer> {
  const bytes = encoder.encode(text);
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}

/** errno of the last synchronous call on this thread. */
export function errno(): number {
  const ptr = libc().symbols.__errno_location();
  return ptr ? new Deno.UnsafePointerView(ptr).getInt32() : 0;
}

/** An OS error with its errno, e.g. from mount(2). */
export class SyscallError extends Error {
  /** The errno value. */
  readonly errno: number;

  /** Creates the error for `call` failing with `errno`. */
  constructor(call: string, errnoValue: number, detail?: string) {
    super(`${call}${detail ? ` ${detail}` : ""}: ${errnoText(errnoValue)}`);
    this.name = "SyscallError";
    this.errno = errnoValue;
  }
}

/** open(2); throws `SyscallError` on failure. */
export function open(path: string, flags: number, mode = 0): number {
  const fd = libc().symbols.open(cString(path), flags, mode);
  if (fd < 0) throw new SyscallError("open", errno(), path);
  return fd;
}

/** close(2); errors are ignored (the descriptor is gone either way). */
export function close(fd: number): void {
  libc().symbols.close(fd);
}

/** read(2): the byte count, or the negated errno. */
export function read(fd: number, buf: Uint8Array<ArrayBuffer>): number {
  const n = Number(libc().symbols.read(fd, buf, BigInt(buf.length)));
  return n >= 0 ? n : -errno();
}

/** write(2): the byte count, or the negated errno. */
export function write(fd: number, buf: Uint8Array<ArrayBuffer>): number {
  const n = Number(libc().symbols.write(fd, buf, BigInt(buf.length)));
  return n >= 0 ? n : -errno();
}

/**
 * write(2) on a worker thread: the byte count, or -1 on failure (errno
 * stays on that thread).
 */
export async function writeAsync(fd: number, buf: Uint8Array<ArrayBuffer>): Promise<number> {
  const n = Number(await libc().symbols.write_async(fd, buf, BigInt(buf.length)));
  return n >= 0 ? n : -1;
}

/** poll(2) flags. */
export const POLLIN = 1;

/**
 * Waits on a worker thread until `fd` is readable or `timeoutMs` passes;
 * resolves to the `revents` bits (0 on timeout or failure).
 */
export async function pollIn(fd: number, timeoutMs: number): Promise<number> {
  const fds = new Uint8Array(8);
  const view = new DataView(fds.buffer);
  view.setInt32(0, fd, true);
  view.setInt16(4, POLLIN, true);
  const n = await libc().symbols.poll(fds, 1n, timeoutMs);
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
  const n = libc().symbols.poll_sync(fds, 1n, timeoutMs);
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
  const r = libc().symbols.mount(
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
  return (await libc().symbols.umount2(cString(target), flags)) === 0;
}

/**
 * umount2(2) on this thread; throws `SyscallError` (e.g. EBUSY) on failure.
 * Only for processes that do not serve the mount themselves.
 */
export function umount2Sync(target: string, flags: number): void {
  if (libc().symbols.umount2_sync(cString(target), flags) !== 0) {
    throw new SyscallError("umount", errno(), target);
  }
}
