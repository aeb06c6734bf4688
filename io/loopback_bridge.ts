/**
 * A one-connection TCP listener on the loopback interface that joins the
 * one connection this process opens to it with another socket, copying
 * bytes both ways. It lets the runtime's own TLS client (`Deno.connectTls`,
 * which only connects by itself) run over a socket opened earlier: a Unix
 * socket, or a TCP connection that has already spoken plaintext NBD.
 *
 * Only a connection from this process is joined: on Linux the accepted
 * peer's socket must be one of this process's descriptors (its inode, from
 * /proc/net/tcp or tcp6, among the targets of /proc/self/fd). Anything else
 * is closed unread. The listener closes once its connection is accepted.
 *
 * @module
 */

import { type ByteStream, fromDenoConn, writeAll } from "./byte_stream.ts";

/** The bridge's listening side, until the one connection is joined. */
export interface LoopbackBridge {
  /** The address to connect to (an IP address, or "localhost"). */
  readonly hostname: string;
  /** The listening port. */
  readonly port: number;
  /**
   * Resolves once a connection from this process was accepted and joined
   * with the other socket; rejects if the bridge was closed first.
   */
  readonly joined: Promise<void>;
  /** Resolves when both directions have stopped and both sockets are closed. */
  readonly finished: Promise<void>;
  /** Closes the listener, the accepted connection and the other socket. */
  close(): void;
}

/** Options of `openLoopbackBridge`. */
export interface LoopbackBridgeOptions {
  /** Where to listen: "127.0.0.1" (default), "::1" or "localhost". */
  hostname?: string;
  /**
   * Decides whether an accepted connection is this process's (default:
   * `ownConnection`). Exposed for tests.
   */
  isOwn?: (peer: Deno.NetAddr, local: Deno.NetAddr) => boolean;
  /** Bytes read at a time in each direction (default 256 KiB). */
  chunkBytes?: number;
}

/**
 * Listens on a loopback port and joins the first connection from this
 * process with `other` (a stream that the bridge owns from now on: it is
 * closed with the bridge).
 */
export function openLoopbackBridge(
  other: ByteStream,
  options: LoopbackBridgeOptions = {},
): LoopbackBridge {
  const listener = Deno.listen({ hostname: options.hostname ?? "127.0.0.1", port: 0 });
  const local = listener.addr as Deno.NetAddr;
  const isOwn = options.isOwn ?? ownConnection;
  const chunk = options.chunkBytes ?? 256 * 1024;
  let closed = false;
  let listening = true;
  let accepted: ByteStream | undefined;
  const stopListening = () => {
    if (!listening) return;
    listening = false;
    try {
      listener.close();
    } catch { /* already closed */ }
  };
  const close = () => {
    if (closed) return;
    closed = true;
    stopListening();
    accepted?.close();
    other.close();
  };
  let finish!: () => void;
  const finished = new Promise<void>((resolve) => finish = resolve);
  const joined = (async () => {
    try {
      for (;;) {
        const conn = await listener.accept();
        if (!closed && isOwn(conn.remoteAddr as Deno.NetAddr, conn.localAddr as Deno.NetAddr)) {
          stopListening();
          (conn as Deno.TcpConn).setNoDelay(true);
          accepted = fromDenoConn(conn);
          break;
        }
        try {
          conn.close();
        } catch { /* already closed */ }
      }
    } catch (error) {
      close();
      finish();
      throw closed ? new Deno.errors.Interrupted("the loopback bridge was closed") : error;
    }
    if (closed) {
      accepted.close();
      finish();
      throw new Deno.errors.Interrupted("the loopback bridge was closed");
    }
    const a = accepted;
    Promise.all([pump(a, other, chunk, close), pump(other, a, chunk, close)]).then(finish);
  })();
  // The caller learns of failures through its own connection; nothing else awaits this.
  joined.catch(() => {});
  return { hostname: local.hostname, port: local.port, joined, finished, close };
}

/**
 * Copies `from` to `to` until the end of `from` or an error on either
 * side; then stops both directions (`stop`): a half-open bridge has no use.
 */
async function pump(
  from: ByteStream,
  to: ByteStream,
  chunkBytes: number,
  stop: () => void,
): Promise<void> {
  const buf = new Uint8Array(chunkBytes);
  try {
    for (;;) {
      let n = from.tryRead?.(buf);
      if (n === undefined) n = await from.read(buf);
      if (n === null) break;
      await writeAll(to, buf.subarray(0, n));
    }
  } catch {
    // A closed socket ends the copy; the TLS layer reports what went wrong.
  } finally {
    stop();
  }
}

/**
 * Whether the TCP connection that `peer` (the remote end of an accepted
 * connection on `local`) names is a socket of this process: its inode,
 * looked up in /proc/net/tcp or /proc/net/tcp6, is the target of one of
 * /proc/self/fd. False when /proc cannot tell.
 */
export function ownConnection(peer: Deno.NetAddr, local: Deno.NetAddr): boolean {
  const inode = socketInode(peer, local);
  if (inode === undefined) return false;
  const wanted = `socket:[${inode}]`;
  try {
    for (const entry of Deno.readDirSync("/proc/self/fd")) {
      try {
        if (Deno.readLinkSync(`/proc/self/fd/${entry.name}`) === wanted) return true;
      } catch {
        // closed meanwhile
      }
    }
  } catch {
    return false;
  }
  return false;
}

/** The inode of the socket bound to `source` and connected to `destination`, from /proc/net. */
function socketInode(source: Deno.NetAddr, destination: Deno.NetAddr): string | undefined {
  const v6 = source.hostname.includes(":");
  let table: string;
  try {
    table = Deno.readTextFileSync(v6 ? "/proc/net/tcp6" : "/proc/net/tcp");
  } catch {
    return undefined;
  }
  const want = [procAddress(source), procAddress(destination)];
  if (want.includes(undefined)) return undefined;
  for (const line of table.split("\n").slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields.length < 10) continue;
    if (fields[1] === want[0] && fields[2] === want[1]) {
      return fields[9] === "0" ? undefined : fields[9];
    }
  }
  return undefined;
}

/**
 * An address as /proc/net/tcp{,6} writes it: the address as 32-bit words
 * in host (little-endian) order, in hex, then ":" and the port in hex.
 */
export function procAddress(address: Deno.NetAddr): string | undefined {
  const port = address.port.toString(16).toUpperCase().padStart(4, "0");
  const words = ipWords(address.hostname);
  if (!words) return undefined;
  const hex = words.map((w) => {
    // The kernel prints each 32-bit word as the machine stores it (little-endian here).
    const swapped = ((w & 0xff) << 24 | (w & 0xff00) << 8 | (w >>> 8) & 0xff00 | w >>> 24) >>> 0;
    return swapped.toString(16).toUpperCase().padStart(8, "0");
  });
  return `${hex.join("")}:${port}`;
}

/** An IPv4 or IPv6 address as big-endian 32-bit words (1 or 4); undefined if not one. */
function ipWords(host: string): number[] | undefined {
  const v4 = /^(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(host);
  if (v4) {
    const b = v4.slice(1).map(Number);
    if (b.some((x) => x > 255)) return undefined;
    return [((b[0]! << 24) | (b[1]! << 16) | (b[2]! << 8) | b[3]!) >>> 0];
  }
  if (!host.includes(":")) return undefined;
  let h = host.replace(/^\[|\]$/g, "");
  // An IPv4-mapped tail (::ffff:127.0.0.1) becomes two groups.
  const tail = /(\d+\.\d+\.\d+\.\d+)$/.exec(h);
  if (tail) {
    const w = ipWords(tail[1]!)![0]!;
    h = h.slice(0, -tail[1]!.length) + `${(w >>> 16).toString(16)}:${(w & 0xffff).toString(16)}`;
  }
  const [head, rest] = h.split("::") as [string, string | undefined];
  const left = head ? head.split(":") : [];
  const right = rest ? rest.split(":") : [];
  const groups = rest === undefined
    ? left
    : [...left, ...Array(8 - left.length - right.length).fill("0"), ...right];
  if (groups.length !== 8 || groups.some((g) => !/^[0-9a-fA-F]{1,4}$/.test(g))) return undefined;
  const n = groups.map((g) => parseInt(g, 16));
  return [0, 2, 4, 6].map((i) => ((n[i]! << 16) | n[i + 1]!) >>> 0);
}
