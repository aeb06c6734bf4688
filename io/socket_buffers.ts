/**
 * Larger kernel socket buffers for bulk transfers. With the default Unix
 * socket send buffer (208 KiB) a 256 KiB reply never fits: every reply
 * stalls the event loop on "socket full" and waits for a wake-up from the
 * peer's read. Room for a MiB lets a batch of replies leave in one call
 * while the peer is still reading the previous one (docs/performance.md).
 *
 * The runtime does not expose a connection's file descriptor, so the
 * process's descriptors are scanned (through /proc) for sockets not seen
 * before. Raising a buffer is harmless on any socket of ours: it is only a
 * ceiling on what the kernel may queue.
 *
 * @module
 */

import { lazyLibc } from "./ffi.ts";

/** Buffer size asked for (the kernel doubles it for bookkeeping); 1 MiB measured as good as 4. */
const SOCKET_BUFFER_BYTES = 1024 * 1024;

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_RCVBUF = 8;
const SO_SNDBUFFORCE = 32;
const SO_RCVBUFFORCE = 33;

const SYMBOLS = {
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
} as const;

const libc = lazyLibc(SYMBOLS);

/** Socket inodes already handled (bounded: cleared when large, re-raising is harmless). */
const seen = new Set<string>();

function setBuffer(fd: number, force: number, plain: number, bytes: number): void {
  const value = new Uint8Array(4);
  new DataView(value.buffer).setInt32(0, bytes, true);
  const symbols = libc()!.symbols;
  // The forcing variant passes the system maximum when we are privileged.
  if (symbols.setsockopt(fd, SOL_SOCKET, force, value, 4) !== 0) {
    symbols.setsockopt(fd, SOL_SOCKET, plain, value, 4);
  }
}

/**
 * Raises the send (and, with `receive`, receive) buffers of this process's
 * sockets that have not been handled yet. Call right after a connection is
 * accepted or opened. Does nothing where it cannot (no /proc, no FFI).
 */
export function enlargeNewSocketBuffers(
  options: { receive?: boolean; bytes?: number } = {},
): void {
  if (!libc()) return;
  const bytes = options.bytes ?? SOCKET_BUFFER_BYTES;
  if (seen.size > 4096) seen.clear();
  let entries: Iterable<Deno.DirEntry>;
  try {
    entries = Deno.readDirSync("/proc/self/fd");
  } catch {
    return;
  }
  for (const entry of entries) {
    let target: string;
    try {
      target = Deno.readLinkSync(`/proc/self/fd/${entry.name}`);
    } catch {
      continue; // closed meanwhile
    }
    if (!target.startsWith("socket:") || seen.has(target)) continue;
    seen.add(target);
    const fd = Number(entry.name);
    setBuffer(fd, SO_SNDBUFFORCE, SO_SNDBUF, bytes);
    if (options.receive) setBuffer(fd, SO_RCVBUFFORCE, SO_RCVBUF, bytes);
  }
}
