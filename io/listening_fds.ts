/**
 * Finds the descriptors of this process's listening sockets, so that other
 * threads (serve workers) can accept on them too. The runtime does not
 * expose a listener's descriptor: /proc/self/fd is scanned for sockets and
 * each is asked whether it listens (`SO_ACCEPTCONN`). `adoptListeningSocket`
 * turns such a descriptor back into a runtime listener.
 *
 * @module
 */

import { lazyLibc } from "./ffi.ts";

const SOL_SOCKET = 1;
const SO_ACCEPTCONN = 30;

const SO_TYPE = 3;
const SOCK_STREAM = 1;
const AF_UNIX = 1;
const AF_INET = 2;
const AF_INET6 = 10;
const F_GETFL = 3;
const F_SETFL = 4;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const EPOLL_CTL_ADD = 1;

const SYMBOLS = {
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  dup: { parameters: ["i32"], result: "i32" },
  dup3: { parameters: ["i32", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
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

/** The local address of socket `fd` as the runtime would report it, or null. */
function localAddress(fd: number): Deno.NetAddr | Deno.UnixAddr | null {
  const lib = libc();
  if (!lib) return null;
  const buf = new Uint8Array(128);
  const length = new Uint8Array(4);
  new DataView(length.buffer).setUint32(0, buf.length, true);
  if (lib.symbols.getsockname(fd, buf, length) !== 0) return null;
  const view = new DataView(buf.buffer);
  const size = view.getUint32(0, true);
  const family = view.getUint16(0, true);
  if (family === AF_INET) {
    return { transport: "tcp", hostname: buf.subarray(4, 8).join("."), port: view.getUint16(2) };
  }
  if (family === AF_INET6) {
    const groups = Array.from({ length: 8 }, (_, i) => view.getUint16(8 + 2 * i).toString(16));
    return { transport: "tcp", hostname: ipv6Text(groups), port: view.getUint16(2) };
  }
  if (family === AF_UNIX) {
    const raw = buf.subarray(2, Math.min(size, buf.length));
    const end = raw.indexOf(0);
    const path = new TextDecoder().decode(end < 0 ? raw : raw.subarray(0, end));
    return { transport: "unix", path };
  }
  return null;
}

/** The compressed text form of an IPv6 address given as 8 hexadecimal groups. */
function ipv6Text(groups: string[]): string {
  let best = -1, bestLength = 1;
  for (let i = 0; i < 8;) {
    let j = i;
    while (j < 8 && groups[j] === "0") j++;
    if (j - i > bestLength) [best, bestLength] = [i, j - i];
    i = j === i ? i + 1 : j;
  }
  if (best < 0) return groups.join(":");
  return `${groups.slice(0, best).join(":")}::${groups.slice(best + bestLength).join(":")}`;
}

/** Whether `fd` is a listening stream socket. */
function isListeningStream(fd: number): boolean {
  const lib = libc()!;
  const value = new Uint8Array(4);
  const length = new Uint8Array(4);
  new DataView(length.buffer).setUint32(0, 4, true);
  if (lib.symbols.getsockopt(fd, SOL_SOCKET, SO_TYPE, value, length) !== 0) return false;
  return new DataView(value.buffer).getInt32(0, true) === SOCK_STREAM && isListening(fd) === true;
}

/** Where descriptor `fd` (socket `inode`) is registered with an epoll instance of this process. */
interface EpollEntry {
  epoll: number;
  events: number;
  data: bigint;
}

/** Finds the epoll instance watching `fd` (and that socket, not an earlier one with its number). */
function epollEntry(fd: number, inode: string): EpollEntry | null {
  const ino = /socket:\[(\d+)\]/.exec(inode)?.[1];
  if (ino === undefined) return null;
  const wanted = BigInt(ino);
  for (const entry of Deno.readDirSync("/proc/self/fd")) {
    let target: string;
    try {
      target = Deno.readLinkSync(`/proc/self/fd/${entry.name}`);
    } catch {
      continue;
    }
    if (target !== "anon_inode:[eventpoll]") continue;
    let info: string;
    try {
      info = Deno.readTextFileSync(`/proc/self/fdinfo/${entry.name}`);
    } catch {
      continue;
    }
    for (const line of info.split("\n")) {
      const m = /^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+).*\bino:([0-9a-f]+)/
        .exec(line);
      if (!m || Number(m[1]) !== fd || BigInt(`0x${m[4]}`) !== wanted) continue;
      return { epoll: Number(entry.name), events: parseInt(m[2]!, 16), data: BigInt(`0x${m[3]}`) };
    }
  }
  return null;
}

/** An `epoll_event` as the kernel reads it (packed on x86-64, padded elsewhere). */
function epollEvent(events: number, data: bigint): Uint8Array {
  const packed = Deno.build.arch === "x86_64";
  const buf = new Uint8Array(packed ? 12 : 16);
  const view = new DataView(buf.buffer);
  view.setUint32(0, events >>> 0, true);
  view.setBigUint64(packed ? 4 : 8, data, true);
  return buf;
}

/** A listener of the runtime's own on a throwaway socket of the same kind as `address`. */
function throwawayListener(
  address: Deno.NetAddr | Deno.UnixAddr,
): { listener: Deno.Listener; dir?: string } {
  if (address.transport === "unix") {
    const dir = Deno.makeTempDirSync({ prefix: "nbd-adopt" });
    const listener = Deno.listen({ transport: "unix", path: `${dir}/s` });
    return { listener, dir };
  }
  return { listener: Deno.listen({ hostname: "127.0.0.1", port: 0 }) };
}

/**
 * Turns `fd`, a listening stream socket this process already has (inherited
 * through socket activation, or handed to a serve worker), into a listener
 * of the runtime's own, so that accepted connections are ordinary
 * `Deno.Conn`s. The runtime cannot listen on a given descriptor, so a
 * throwaway listener is opened and `fd` is duplicated over its descriptor;
 * the runtime's poller forgets the throwaway socket when it goes, and the
 * adopted one is registered in its place under the same key. The
 * listener's `addr` is that of `fd`.
 *
 * On success `fd` itself is closed (the listener owns the socket); null
 * (and `fd` untouched) where this cannot be done: not Linux, FFI denied,
 * `NBD_PORTABLE=1`, no /proc, or `fd` is not a listening TCP or Unix
 * stream socket.
 */
export function adoptListeningSocket(fd: number): Deno.Listener | null {
  const lib = libc();
  if (!lib) return null;
  try {
    if (!isListeningStream(fd)) return null;
    const address = localAddress(fd);
    if (address === null) return null;
    const before = socketDescriptors();
    const { listener, dir } = throwawayListener(address);
    if (dir) Deno.removeSync(dir, { recursive: true });
    const own = findThrowaway(listener, before);
    const entry = own && epollEntry(own.fd, own.inode);
    const flags = lib.symbols.fcntl(fd, F_GETFL, 0);
    if (
      !own || !entry || flags < 0 ||
      lib.symbols.fcntl(fd, F_SETFL, flags | O_NONBLOCK) !== 0 ||
      lib.symbols.dup3(fd, own.fd, O_CLOEXEC) !== own.fd
    ) {
      listener.close();
      return null;
    }
    // The throwaway socket is gone, and with it its registration: register the adopted one.
    const event = epollEvent(entry.events, entry.data);
    if (lib.symbols.epoll_ctl(entry.epoll, EPOLL_CTL_ADD, own.fd, event) !== 0) {
      listener.close();
      return null;
    }
    lib.symbols.close(fd);
    Object.defineProperty(listener, "addr", { value: address });
    return listener;
  } catch {
    return null;
  }
}

/** The descriptor of `listener`'s socket: the one listening socket opened since `before` at its address. */
function findThrowaway(
  listener: Deno.Listener,
  before: Map<number, string>,
): { fd: number; inode: string } | null {
  const want = listener.addr;
  let found: { fd: number; inode: string } | null = null;
  for (const [fd, inode] of socketDescriptors()) {
    if (before.get(fd) === inode || !isListening(fd)) continue;
    const addr = localAddress(fd);
    if (!addr || addr.transport !== want.transport) continue;
    const same = "path" in addr
      ? addr.path === (want as Deno.UnixAddr).path
      : addr.port === (want as Deno.NetAddr).port &&
        addr.hostname === (want as Deno.NetAddr).hostname;
    if (!same) continue;
    if (found) return null;
    found = { fd, inode };
  }
  return found;
}
