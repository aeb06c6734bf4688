/**
 * Positional file I/O, on whichever path the platform switch chose
 * (platform.ts): plain synchronous libc calls through FFI on the Linux fast
 * paths, node:fs (`readSync`/`writeSync` with a position, `ftruncateSync`,
 * `fsync`) everywhere else. The choice is made once, when this module
 * loads; node:fs is loaded only on the portable paths, since loading the
 * Node compatibility layer slows a copy's start-up.
 *
 * Errors carry the system's code ("ENOENT") as node:fs errors do, so that
 * callers report them the same way on either path.
 *
 * @module
 */

import {
  closeFd,
  errnoOf,
  lastError,
  O_CREAT,
  O_EXCL,
  O_RDONLY,
  O_RDWR,
  O_WRONLY,
  openFd,
  pread,
  pwrite,
  seekEnd,
  syncFd,
  truncateFd,
} from "./libc.ts";
import { platform } from "./platform.ts";

/** How a file is opened: to read, to read and write, or created anew (write-only, never existing). */
export type OpenMode = "read" | "readWrite" | "createNew";

/** Positional file I/O on descriptors (numbers, as node:fs and libc use). */
export interface FileIo {
  /** "linux" for the libc calls, "portable" for node:fs. */
  readonly path: "linux" | "portable";
  /** Opens `path`; throws an error with the system's code. */
  open(path: string, mode: OpenMode): number;
  /** Reads up to `buf.length` bytes at `position`: the count (0 at the end). */
  readAt(fd: number, buf: Uint8Array, position: number): number;
  /** Writes up to `buf.length` bytes at `position`: the count. */
  writeAt(fd: number, buf: Uint8Array, position: number): number;
  /** Sets the size. */
  truncate(fd: number, size: number): void;
  /** Makes the written data durable. */
  sync(fd: number): Promise<void>;
  /** Closes the descriptor. */
  close(fd: number): void;
  /** Size of the block device open as `fd` at `path` (fstat says 0); 0 when unknown. */
  deviceSize(fd: number, path: string): number;
}

const OPEN_FLAGS: Record<OpenMode, number> = {
  read: O_RDONLY,
  readWrite: O_RDWR,
  createNew: O_WRONLY | O_CREAT | O_EXCL,
};

const linuxIo: FileIo = {
  path: "linux",
  open(path, mode) {
    const fd = openFd(path, OPEN_FLAGS[mode]);
    // Only chosen where libc binds, so this is not reached.
    if (fd === undefined) throw new Error(`Cannot open ${path}: libc is not available`);
    return fd;
  },
  readAt(fd, buf, position) {
    const n = pread(fd, buf, position)!;
    if (n < 0) throw lastError();
    return n;
  },
  writeAt(fd, buf, position) {
    const n = pwrite(fd, buf, position)!;
    if (n < 0) throw lastError();
    return n;
  },
  truncate: truncateFd,
  sync: syncFd,
  close: closeFd,
  deviceSize: (fd) => seekEnd(fd) ?? 0,
};

type NodeFs = typeof import("node:fs");

const NODE_FLAGS: Record<OpenMode, string> = { read: "r", readWrite: "r+", createNew: "wx" };

function portableIo(fs: NodeFs): FileIo {
  return {
    path: "portable",
    open: (path, mode) => fs.openSync(path, NODE_FLAGS[mode]),
    readAt: (fd, buf, position) => fs.readSync(fd, buf, 0, buf.length, position),
    writeAt: (fd, buf, position) => fs.writeSync(fd, buf, 0, buf.length, position),
    truncate: (fd, size) => fs.ftruncateSync(fd, size),
    sync: (fd) =>
      new Promise((resolve, reject) => fs.fsync(fd, (error) => error ? reject(error) : resolve())),
    close: (fd) => fs.closeSync(fd),
    deviceSize(fd, path) {
      // lseek through the C library where FFI is allowed; else the runtime's own seek.
      const end = seekEnd(fd);
      if (end !== undefined) return end;
      try {
        using file = Deno.openSync(path, { read: true });
        return file.seekSync(0, Deno.SeekMode.End);
      } catch {
        return 0;
      }
    },
  };
}

/** The file I/O of this process, chosen once by the platform switch. */
export const fileIo: FileIo = platform().linuxFast ? linuxIo : portableIo(await import("node:fs"));

/** The errno number (Linux numbering) of a failure from `fileIo`, for passing between threads. */
export function errnoOfError(error: unknown): number {
  const own = (error as { errno?: unknown }).errno;
  const code = (error as { code?: unknown }).code;
  if (fileIo.path === "linux" && typeof own === "number" && own > 0) return own;
  return errnoOf(typeof code === "string" ? code : undefined);
}
