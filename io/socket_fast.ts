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
 * The server finds the descriptors of the connections it accepts the same
 * way (`acceptedFd`), to send READ replies straight from files
 * (`sendFile`, `writeMore`).
 *
 * @module
 */

import { lazyLibc } from "./ffi.ts";

const MSG_DONTWAIT = 0x40;
const MSG_MORE = 0x8000;
const MSG_NOSIGNAL = 0x4000;

const SYMBOLS = {
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  sendfile: { parameters: ["i32", "i32", "buffer", "usize"], result: "isize" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  getpeername: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  splice: {
    parameters: ["i32", "pointer", "i32", "pointer", "usize", "u32"],
    result: "isize",
  },
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  close: { parameters: ["i32"], result: "i32" },
} as const;

const SPLICE_F_MOVE = 1;
const SPLICE_F_NONBLOCK = 2;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const F_SETPIPE_SZ = 1031;
/** The pipe between the socket and the file holds this much (the default limit for anyone). */
const PIPE_SIZE = 1024 * 1024;

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

/** sendfile's in-out offset argument. */
const SENDFILE_OFFSET = new BigInt64Array(1);
const SENDFILE_OFFSET_BYTES = new Uint8Array(SENDFILE_OFFSET.buffer);

/** splice's output offset argument. */
const SPLICE_OFFSET = new BigInt64Array(1);
/** Its address, taken on first use (taking it needs FFI permission). */
let spliceOffsetPointer: Deno.PointerValue | undefined;

/**
 * Whether WRITE payloads may be moved from sockets into files with splice:
 * not when `NBD_NO_SPLICE` is set to anything but "" or "0".
 */
export function spliceAllowed(): boolean {
  return !envSet("NBD_NO_SPLICE");
}

function envSet(variable: string): boolean {
  try {
    if (Deno.permissions.querySync({ name: "env", variable }).state !== "granted") return false;
    const value = Deno.env.get(variable);
    return value !== undefined && value !== "" && value !== "0";
  } catch {
    return false;
  }
}

/** Socket inodes ("socket:[N]") present at the last `acceptedFd` scan. */
const earlier = new Set<string>();
const ADDRESS = new Uint8Array(128);
const ADDRESS_LENGTH = new Uint32Array(1);

/**
 * A socket's own or peer address, in the form of a `Deno.Addr`'s key
 * (`addressKey`): "tcp:PORT" or "unix:PATH"; undefined when the call fails
 * (not a socket, not connected) or the family is another.
 */
function socketAddress(
  call: (fd: number, address: Uint8Array, length: Uint32Array) => number,
  fd: number,
): string | undefined {
  ADDRESS_LENGTH[0] = ADDRESS.length;
  if (call(fd, ADDRESS, ADDRESS_LENGTH) !== 0) return undefined;
  const length = Math.min(ADDRESS_LENGTH[0]!, ADDRESS.length);
  const family = ADDRESS[0]! | (ADDRESS[1]! << 8);
  // AF_INET and AF_INET6 keep the port at the same place, in network order.
  if (family === 2 || family === 10) return `tcp:${(ADDRESS[2]! << 8) | ADDRESS[3]!}`;
  if (family !== 1) return undefined;
  let end = 2;
  while (end < length && ADDRESS[end] !== 0) end++;
  return `unix:${new TextDecoder().decode(ADDRESS.subarray(2, end))}`;
}

/** The key `socketAddress` gives for a runtime address; undefined for other transports. */
function addressKey(addr: Deno.Addr): string | undefined {
  if (addr.transport === "tcp") return `tcp:${addr.port}`;
  if (addr.transport === "unix") return `unix:${addr.path}`;
  return undefined;
}

/**
 * Whether replies may be sent straight from files: not when `NBD_NO_SENDFILE`
 * is set to anything but "" or "0" (to compare, or to rule the path out).
 */
export function sendFileAllowed(): boolean {
  return !envSet("NBD_NO_SENDFILE");
}

/**
 * The descriptor of a connection just accepted, for sending files straight
 * into it; call right after `accept` resolves, before anything else runs.
 * The runtime does not expose it, so the process's sockets (through /proc)
 * are searched for one that was not there at the previous call and whose
 * own address is the connection's local one and (TCP) whose peer's port
 * is the remote one. Only a single match counts: anything else (a socket
 * accepted on another thread meanwhile, say) gives undefined, and the
 * connection goes without. Undefined without FFI or /proc.
 */
export function acceptedFd(conn: Deno.Conn): number | undefined {
  const l = libc();
  if (!l) return undefined;
  const local = addressKey(conn.localAddr);
  if (local === undefined) return undefined;
  const remote = conn.remoteAddr.transport === "tcp" ? addressKey(conn.remoteAddr) : undefined;
  const now = sockets();
  if (!now) return undefined;
  const found: number[] = [];
  for (const [fd, target] of now) {
    if (earlier.has(target)) continue;
    if (socketAddress(l.symbols.getsockname, fd) !== local) continue;
    // A listening socket has no peer; an accepted Unix one has an unnamed peer.
    const peer = socketAddress(l.symbols.getpeername, fd);
    if (peer === undefined || (remote !== undefined && peer !== remote)) continue;
    found.push(fd);
  }
  earlier.clear();
  for (const target of now.values()) earlier.add(target);
  return found.length === 1 ? found[0] : undefined;
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

  /**
   * Like `write`, telling the kernel that more follows at once (MSG_MORE),
   * so that a reply header and its data leave together.
   */
  writeMore(buf: Uint8Array): number {
    if (this.#fd < 0 || buf.length === 0) return 0;
    const n = Number(
      this.#symbols.send(
        this.#fd,
        buf,
        BigInt(buf.length),
        MSG_DONTWAIT | MSG_NOSIGNAL | MSG_MORE,
      ),
    );
    return n > 0 ? n : 0;
  }

  /**
   * Sends up to `length` bytes of the file `file` from `offset` with
   * sendfile(2), without waiting (the socket is non-blocking): the count
   * sent, 0 at the end of the file, -1 when nothing fits now or the call
   * failed (an ordinary write then waits, or reports the error). sendfile
   * has no MSG_NOSIGNAL; the runtime ignores SIGPIPE, so a peer that went
   * away is an EPIPE like any other.
   */
  sendFile(file: number, offset: number, length: number): number {
    if (this.#fd < 0) return -1;
    SENDFILE_OFFSET[0] = BigInt(offset);
    const n = Number(
      this.#symbols.sendfile(this.#fd, file, SENDFILE_OFFSET_BYTES, BigInt(length)),
    );
    return n >= 0 ? n : -1;
  }

  /** The pipe for `spliceToFile` ([read end, write end]); null once it cannot be had. */
  #pipe: [number, number] | undefined | null;
  /** Bytes taken back out of the pipe after a failed splice into a file. */
  #stranded: Uint8Array | undefined;

  #openPipe(): [number, number] | null {
    if (this.#pipe !== undefined) return this.#pipe;
    const fds = new Int32Array(2);
    if (this.#symbols.pipe2(fds, O_NONBLOCK | O_CLOEXEC) !== 0) return this.#pipe = null;
    // A larger pipe moves a whole payload per pair of calls; the default size also works.
    this.#symbols.fcntl(fds[1]!, F_SETPIPE_SZ, PIPE_SIZE);
    return this.#pipe = [fds[0]!, fds[1]!];
  }

  /**
   * Moves up to `length` bytes that have already arrived on the socket into
   * the file `file` at `offset` with splice(2), through a pipe, without
   * copying them through this process and without waiting for more: the
   * count written to the file, 0 at the end of the stream, -1 when nothing
   * is there now (or the socket failed: an ordinary read then waits, or
   * reports the error). Where the file refuses (a full disk, a filesystem
   * without splice), the bytes already taken from the socket are read back
   * out of the pipe and handed over by `takeStranded`, for an ordinary
   * write to place (or report); splicing is then off for this socket.
   */
  spliceToFile(file: number, offset: number, length: number): number {
    const pipe = this.#fd < 0 ? null : this.#openPipe();
    if (!pipe) return -1;
    const s = this.#symbols;
    spliceOffsetPointer ??= Deno.UnsafePointer.of(SPLICE_OFFSET);
    let moved = 0;
    while (moved < length) {
      const n = Number(
        s.splice(
          this.#fd,
          null,
          pipe[1],
          null,
          BigInt(Math.min(length - moved, PIPE_SIZE)),
          SPLICE_F_MOVE | SPLICE_F_NONBLOCK,
        ),
      );
      if (n === 0) return moved > 0 ? moved : 0;
      if (n < 0) break;
      let left = n;
      while (left > 0) {
        SPLICE_OFFSET[0] = BigInt(offset + moved);
        const m = Number(
          s.splice(pipe[0], null, file, spliceOffsetPointer, BigInt(left), SPLICE_F_MOVE),
        );
        if (m <= 0) {
          this.#strand(left);
          return moved;
        }
        moved += m;
        left -= m;
      }
    }
    return moved > 0 ? moved : -1;
  }

  /** Empties the pipe into `#stranded` and stops splicing. */
  #strand(length: number): void {
    const out = new Uint8Array(length);
    let got = 0;
    while (got < length) {
      const n = Number(this.#symbols.read(this.#pipe![0], out.subarray(got), BigInt(length - got)));
      if (n <= 0) break;
      got += n;
    }
    this.#stranded = out.subarray(0, got);
    this.#closePipe();
    this.#pipe = null;
  }

  /** The bytes a failed `spliceToFile` took from the socket and did not write, once. */
  takeStranded(): Uint8Array | undefined {
    const out = this.#stranded;
    this.#stranded = undefined;
    return out;
  }

  #closePipe(): void {
    if (!this.#pipe) return;
    this.#symbols.close(this.#pipe[0]);
    this.#symbols.close(this.#pipe[1]);
  }

  /** No more calls on the descriptor (it is about to be closed). */
  disable(): void {
    this.#fd = -1;
    this.#closePipe();
    this.#pipe = null;
  }
}
