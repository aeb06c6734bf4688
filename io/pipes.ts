/**
 * Larger pipes for streamed copies. A pipe holds 64 KiB by default, so a
 * producer such as `cat` and a copy reading the other end take turns every
 * 64 KiB, each waiting while the other works; with room for a MiB they
 * overlap (figures in docs/performance.md).
 *
 * @module
 */

import { lazyLibc } from "./ffi.ts";

/** Pipe size asked for: the default ceiling for unprivileged users (fs.pipe-max-size). */
const PIPE_BYTES = 1024 * 1024;

const F_SETPIPE_SZ = 1031;

const SYMBOLS = {
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
} as const;

const libc = lazyLibc(SYMBOLS);

/**
 * Raises the capacity of the pipe on descriptor `fd` to `bytes`; false when
 * `fd` is not a pipe, the system refuses (a lower limit, or the user's pipe
 * memory used up) or FFI is unavailable. A larger pipe is harmless: it is
 * only room the kernel may use.
 */
export function enlargePipe(fd: number, bytes = PIPE_BYTES): boolean {
  const l = libc();
  if (!l) return false;
  return l.symbols.fcntl(fd, F_SETPIPE_SZ, bytes) >= bytes;
}
