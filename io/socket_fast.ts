/**
 * A synchronous fast path for plain sockets. Every `Deno.Conn` read or
 * write is an asynchronous operation whose bookkeeping (the operation, its
 * promise, the event loop's turn) costs several microseconds of processor
 * time on top of the system call; at a few GB/s in 256 KiB replies that is
 * a tenth of a processor. A non-blocking recv(2) or send(2) through FFI on
 * the same descriptor costs about a third of that. When the kernel has
 * nothing to give (or no room), the caller falls back to the runtime's own
 * asynchronous read or write, which waits for readiness as usual: the
 * runtime's edge-triggered poller only ever sees a spurious "would block".
 *
 * The runtime does not expose a connection's descriptor, so `connectWithFd`
 * compares the process's sockets (through /proc) before and after the
 * connection opens: only when exactly one socket appeared is it known to be
 * this connection's; otherwise (a connection opened meanwhile) the
 * connection simply goes without the fast path. Unix connections, which
 * open at once, are opened one at a time within a thread for this; TCP
 * connections, which take a round trip each, are not held up.
 *
 * @module
 */

import { lazyLibc } from "./ffi.ts";

const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;

const SYMBOLS = {
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
} as const;

const libc = lazyLibc(SYMBOLS);

/** The process's sockets: descriptor → "socket:[inode]". Undefined where /proc is unreadable. */
function sockets(): Map<number, string> | undefined {
  const found = new Map<number, string>();
  try {
    for (const entry of Deno.readDirSync("/proc/self/fd")) {
      try {
        const target = Deno.readLinkSync(`/proc/self/fd/${entry.name}`);
        if (target.startsWith("socket:")) found.set(Number(entry.name), target);
      } catch {
        // closed meanwhile
      }
    }
  } catch {
    return undefined;
  }
  return found;
}

/**
 * Opens a connection with `connect` and finds its descriptor: the one
 * socket that appeared meanwhile, or undefined when that is not certain
 * (or FFI is unavailable). With `oneAtATime`, connections of this thread
 * open in turn, so that those opened together all find theirs.
 */
export function connectWithFd<T>(
  connect: () => Promise<T>,
  oneAtATime = true,
): Promise<{ conn: T; fd: number | undefined }> {
  if (!oneAtATime) return connectAndFind(connect);
  const opened = connecting.then(() => connectAndFind(connect));
  connecting = opened.catch(() => {});
  return opened;
}

let connecting: Promise<unknown> = Promise.resolve();

async function connectAndFind<T>(
  connect: () => Promise<T>,
): Promise<{ conn: T; fd: number | undefined }> {
  const before = libc() ? sockets() : undefined;
  const conn = await connect();
  if (!before) return { conn, fd: undefined };
  const after = sockets();
  if (!after) return { conn, fd: undefined };
  const known = new Set(before.values());
  const appeared = [...after].filter(([, target]) => !known.has(target));
  return { conn, fd: appeared.length === 1 ? appeared[0]![0] : undefined };
}

/**
 * Non-blocking reads and writes on a descriptor that a `Deno.Conn` owns.
 * The owner calls `disable()` before closing the connection, so that a
 * reused descriptor number is never touched.
 */
export class SocketFastPath {
  #fd: number;
  #symbols: Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

  /** Wraps `fd`; undefined when FFI is unavailable. */
  static create(fd: number | undefined): SocketFastPath | undefined {
    const l = fd === undefined ? null : libc();
    return l ? new SocketFastPath(fd!, l.symbols) : undefined;
  }

  private constructor(fd: number, symbols: Deno.DynamicLibrary<typeof SYMBOLS>["symbols"]) {
    this.#fd = fd;
    this.#symbols = symbols;
  }

  /**
   * Reads what is already there into `buf`: the count (> 0), null at end
   * of stream, or undefined when nothing is there now or the read failed
   * (the asynchronous read then waits, or reports the error).
   */
  read(buf: Uint8Array): number | null | undefined {
    if (this.#fd < 0 || buf.length === 0) return undefined;
    const n = Number(this.#symbols.recv(this.#fd, buf, BigInt(buf.length), MSG_DONTWAIT));
    return n > 0 ? n : n === 0 ? null : undefined;
  }

  /** Writes what fits now: the count, 0 when nothing fits or the write failed. */
  write(buf: Uint8Array): number {
    if (this.#fd < 0 || buf.length === 0) return 0;
    const n = Number(
      this.#symbols.send(this.#fd, buf, BigInt(buf.length), MSG_DONTWAIT | MSG_NOSIGNAL),
    );
    return n > 0 ? n : 0;
  }

  /** No more calls on the descriptor (it is about to be closed). */
  disable(): void {
    this.#fd = -1;
  }
}
