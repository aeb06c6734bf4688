/**
 * Finds the descriptors of this process's listening sockets, so that other
 * threads (serve workers) can accept on them too. The runtime does not
 * expose a listener's descriptor: /proc/self/fd is scanned for sockets and
 * each is asked whether it listens (`SO_ACCEPTCONN`).
 *
 * @module
 */

import { lazyLibc } from "./ffi.ts";

const SOL_SOCKET = 1;
const SO_ACCEPTCONN = 30;

const SYMBOLS = {
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  dup: { parameters: ["i32"], result: "i32" },
} as const;

const libc = lazyLibc(SYMBOLS);

/** The socket inode behind each open descriptor (`socket:[N]`), by descriptor. */
export function socketDescriptors(): Map<number, string> {
  const found = new Map<number, string>();
  let entries: Iterable<Deno.DirEntry>;
  try {
    entries = Deno.readDirSync("/proc/self/fd");
  } catch {
    return found;
  }
  for (const entry of entries) {
    try {
      const target = Deno.readLinkSync(`/proc/self/fd/${entry.name}`);
      if (target.startsWith("socket:")) found.set(Number(entry.name), target);
    } catch {
      // closed meanwhile
    }
  }
  return found;
}

/** Whether descriptor `fd` is a listening socket; null when that cannot be asked (no FFI). */
export function isListening(fd: number): boolean | null {
  const lib = libc();
  if (!lib) return null;
  const value = new Uint8Array(4);
  const length = new Uint8Array(4);
  new DataView(length.buffer).setUint32(0, 4, true);
  if (lib.symbols.getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, value, length) !== 0) return false;
  return new DataView(value.buffer).getInt32(0, true) !== 0;
}

/**
 * The listening sockets opened since `before` (a `socketDescriptors()`
 * taken earlier), or null when they cannot be found here (no /proc, no FFI).
 */
export function newListeningDescriptors(before: Map<number, string>): number[] | null {
  if (libc() === null) return null;
  const fds: number[] = [];
  for (const [fd, inode] of socketDescriptors()) {
    if (before.get(fd) === inode) continue;
    if (isListening(fd)) fds.push(fd);
  }
  return fds;
}

/** A new descriptor for the same socket as `fd` (for another thread to own and close), or null. */
export function duplicateDescriptor(fd: number): number | null {
  const lib = libc();
  if (!lib) return null;
  const copy = lib.symbols.dup(fd);
  return copy < 0 ? null : copy;
}
