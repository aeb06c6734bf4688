/**
 * The byte-stream abstraction every connection goes through: Deno sockets,
 * node:net / node:tls sockets (socket activation and TLS) and stdin/stdout
 * all become a `ByteStream`.
 *
 * @module
 */

import type { Socket } from "node:net";
import { SocketFastPath } from "./socket_fast.ts";

/** A bidirectional byte stream: the subset of `Deno.Conn` the protocol code uses. */
export interface ByteStream {
  /** Reads into `buf`; resolves to the count read, or null at end of stream. */
  read(buf: Uint8Array): Promise<number | null>;
  /** Writes some of `buf`; resolves to the count written. */
  write(buf: Uint8Array): Promise<number>;
  /**
   * Where supported, reads only what is already there, without waiting:
   * the count (> 0), null at end of stream, or undefined when `read` must
   * be used (nothing there now, or an error for `read` to report).
   */
  tryRead?(buf: Uint8Array): number | null | undefined;
  /** Where supported, writes only what fits now, without waiting: the count (0 if none). */
  tryWrite?(buf: Uint8Array): number;
  /**
   * Where supported, like `tryWrite`, telling the kernel that more data
   * follows at once (a reply header before `trySendFile`).
   */
  tryWriteMore?(buf: Uint8Array): number;
  /**
   * Where supported (plain sockets on the Linux fast paths), sends up to
   * `length` bytes of the open file `file` from `offset` straight from the
   * page cache, without waiting: the count, 0 at the end of the file, -1
   * when nothing fits now or the call failed (`write` then waits, or
   * reports the error).
   */
  trySendFile?(file: number, offset: number, length: number): number;
  /**
   * Where supported (plain sockets on the Linux fast paths, when allowed),
   * moves up to `length` bytes already received into the open file `file`
   * at `offset` without copying them through this process, without
   * waiting: the count, 0 at end of stream, -1 when nothing is there now
   * (`read` then waits, or reports the error). Bytes received and not
   * written (the file refused) are handed over by `takeStranded`.
   */
  trySpliceToFile?(file: number, offset: number, length: number): number;
  /** The bytes a `trySpliceToFile` received but could not write, once. */
  takeStranded?(): Uint8Array | undefined;
  /** Closes both directions. Safe to call more than once. */
  close(): void;
  /**
   * Where closing finishes in the background (TLS through a loopback
   * bridge, which still has to pass on the closure): resolves once it has.
   */
  closed?(): Promise<void>;
  /** Closes the write side only, where supported. */
  closeWrite?(): Promise<void>;
  /**
   * For streams over node:net sockets: stops reading and hands back the
   * socket with any bytes received but not yet read (to start TLS on it).
   */
  detach?(): { socket: Socket; unread: Uint8Array[] };
  /**
   * For plain connections (TCP or Unix) opened to be upgraded: stops this
   * wrapper (and its synchronous path) and hands back the connection and
   * its descriptor when known, to start TLS on it with the runtime's own
   * TLS (directly, or through a loopback bridge).
   */
  takeConn?(): { conn: Deno.Conn; fd: number | undefined };
}

/** Writes all of `buf` to `stream`, looping over partial writes. */
export async function writeAll(
  stream: Pick<ByteStream, "write" | "tryWrite">,
  buf: Uint8Array,
): Promise<void> {
  let done = stream.tryWrite?.(buf) ?? 0;
  while (done < buf.length) {
    done += await stream.write(done === 0 ? buf : buf.subarray(done));
  }
}

/**
 * Wraps a Deno connection (TCP or Unix) so that close() is idempotent.
 * Given the connection's descriptor (see `connectWithFd`), reads and
 * writes that need no waiting take a faster synchronous path; with
 * `files`, the stream can also send from files (`trySendFile`), and with
 * `files` alone (`syncReadWrite: false`) reads and writes stay the
 * runtime's.
 */
export function fromDenoConn(
  conn: Deno.Conn,
  fd?: number,
  options: {
    upgradable?: boolean;
    files?: boolean;
    syncReadWrite?: boolean;
    splice?: boolean;
  } = {},
): ByteStream {
  let closed = false;
  const fast = SocketFastPath.create(fd);
  const takeConn = options.upgradable
    ? {
      takeConn(): { conn: Deno.Conn; fd: number | undefined } {
        // The TLS connection owns the socket from now on: no raw reads or writes through here.
        fast?.disable();
        closed = true;
        return { conn, fd };
      },
    }
    : {};
  return {
    ...takeConn,
    read: (buf) => conn.read(buf),
    write: (buf) => conn.write(buf),
    ...(fast && options.syncReadWrite !== false
      ? { tryRead: (buf) => fast.read(buf), tryWrite: (buf) => fast.write(buf) }
      : {}),
    ...(fast && options.files
      ? {
        tryWriteMore: (buf) => fast.writeMore(buf),
        trySendFile: (file, offset, length) => fast.sendFile(file, offset, length),
      }
      : {}),
    ...(fast && options.splice
      ? {
        trySpliceToFile: (file, offset, length) => fast.spliceToFile(file, offset, length),
        takeStranded: () => fast.takeStranded(),
      }
      : {}),
    close() {
      if (closed) return;
      closed = true;
      fast?.disable();
      try {
        conn.close();
      } catch {
        // already closed by the peer
      }
    },
    closeWrite: () => conn.closeWrite(),
  };
}

/**
 * Adapts a node:net or node:tls socket. Incoming chunks are queued and the
 * socket is paused while more than `highWater` bytes wait to be read, so a
 * fast peer cannot make us buffer without bound.
 */
export function fromNodeSocket(socket: Socket, highWater = 4 << 20): ByteStream {
  const chunks: Uint8Array[] = [];
  let queued = 0;
  let ended = false;
  let failure: Error | undefined;
  let wake: (() => void) | undefined;
  let closed = false;
  const notify = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  const onData = (chunk: Uint8Array) => {
    chunks.push(chunk);
    queued += chunk.length;
    if (queued > highWater) socket.pause();
    notify();
  };
  const onEnd = () => {
    ended = true;
    notify();
  };
  const onError = (error: Error) => {
    failure = error;
    ended = true;
    notify();
  };
  socket.on("data", onData);
  socket.on("end", onEnd);
  socket.on("close", onEnd);
  socket.on("error", onError);
  return {
    async read(buf: Uint8Array): Promise<number | null> {
      while (chunks.length === 0) {
        if (ended) {
          if (failure && !closed) throw failure;
          return null;
        }
        await new Promise<void>((resolve) => wake = resolve);
      }
      let n = 0;
      while (n < buf.length && chunks.length > 0) {
        const head = chunks[0]!;
        const take = Math.min(head.length, buf.length - n);
        buf.set(take === head.length ? head : head.subarray(0, take), n);
        n += take;
        if (take === head.length) chunks.shift();
        else chunks[0] = head.subarray(take);
      }
      queued -= n;
      if (queued <= highWater && socket.isPaused()) socket.resume();
      return n;
    },
    write(buf: Uint8Array): Promise<number> {
      if (failure) return Promise.reject(failure);
      if (closed || socket.destroyed) {
        return Promise.reject(new Deno.errors.BrokenPipe("socket is closed"));
      }
      return new Promise((resolve, reject) => {
        socket.write(buf, (error?: Error | null) => error ? reject(error) : resolve(buf.length));
      });
    },
    close() {
      if (closed) return;
      closed = true;
      socket.destroy();
    },
    closeWrite(): Promise<void> {
      return new Promise((resolve) => socket.end(resolve));
    },
    detach() {
      socket.pause();
      socket.off("data", onData);
      socket.off("end", onEnd);
      socket.off("close", onEnd);
      socket.off("error", onError);
      const unread = chunks.splice(0);
      queued = 0;
      closed = true;
      return { socket, unread };
    },
  };
}

/** A stream over this process's stdin and stdout (single-connection mode). */
export function fromStdio(): ByteStream {
  let closed = false;
  return {
    read: (buf) => Deno.stdin.read(buf),
    write: (buf) => Deno.stdout.write(buf),
    close() {
      if (closed) return;
      closed = true;
      try {
        Deno.stdin.close();
      } catch { /* already closed */ }
      try {
        Deno.stdout.close();
      } catch { /* already closed */ }
    },
  };
}
