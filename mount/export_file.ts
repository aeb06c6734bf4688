/**
 * The contents of a mounted file: an NBD export behind one or more
 * connections (several only when the server advertises multi-conn). File
 * operations become NBD commands: read → READ, write → WRITE, fsync →
 * FLUSH, fallocate ZERO_RANGE → WRITE_ZEROES, PUNCH_HOLE → TRIM (checked
 * with block status, and zeroed where the server kept data, because a
 * punched hole must read back as zeroes while TRIM promises nothing).
 *
 * A connection that stops answering is declared stale after a timeout and
 * closed, so the requests waiting on it fail with EIO instead of hanging;
 * a connection the server drops fails the same way.
 *
 * @module
 */

import { NbdClient } from "../client/client.ts";
import { openStream, toNbdUri } from "../client/connect.ts";
import { NbdHandshake } from "../client/handshake.ts";
import { NbdClientPool } from "../client/pool.ts";
import { clientTlsSettings } from "../client/tls.ts";
import type { ByteStream } from "../io/byte_stream.ts";
import { BASE_ALLOCATION, NBD_EIO, NBD_STATE_ZERO } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";
import { formatNbdUri } from "../protocol/uri.ts";
import type { FileContents } from "./fuse_file_server.ts";
import { type ConnectionStatus, IoCounters, type IoStats } from "./io_counters.ts";
import { EOPNOTSUPP, EROFS } from "../io/libc.ts";
import { enlargeNewSocketBuffers } from "../io/socket_buffers.ts";

/** Options of `ExportFile.open`. */
export interface ExportFileOptions {
  /** Connections to open when the server allows multi-conn (default 4). */
  connections?: number;
  /** Refuse writes even if the export is writable. */
  readOnly?: boolean;
  /**
   * Milliseconds a connection may leave requests unanswered before it is
   * declared stale and closed (default 60000; 0 = never).
   */
  timeoutMs?: number;
  /** Seconds for connecting and each handshake step (0 = none; default 10). */
  connectTimeout?: number;
  /** Receives one-line reports of connections lost, declared stale, or made again. */
  onEvent?: (message: string) => void;
  /**
   * Connect again in the background after losing a connection (default
   * true), so the file works again once the server is back. Requests in
   * flight at the loss, or made while no connection works, still fail.
   */
  reconnect?: boolean;
}

/** Default stale-connection timeout. */
export const DEFAULT_TIMEOUT_MS = 60_000;

const ZERO_CHUNK = 1 << 20;
/** First and longest pause between reconnection attempts. */
const RECONNECT_FIRST_MS = 100;
const RECONNECT_MAX_MS = 10_000;

/** Send buffer for the NBD sockets: room for a whole 1 MiB WRITE, twice. */
const SEND_BUFFER = 2 << 20;

/** One NBD connection and what is known about its health. */
class Connection {
  /** The current client; replaced when the connection is made again. */
  client: NbdClient;
  inFlight = 0;
  /** When the connection last went from idle to busy. */
  busySince = 0;
  lastReply = 0;
  /** Why the connection is out of use, while it is. */
  dead: string | undefined;
  /** A reconnection loop is running for this slot. */
  reconnecting = false;

  constructor(client: NbdClient) {
    this.client = client;
  }
}

/** A tiny shared/exclusive lock for read-modify-write of partial blocks. */
class RangeGate {
  #shared = 0;
  #exclusive = false;
  #waiters: (() => void)[] = [];

  async run<T>(exclusive: boolean, work: () => Promise<T>): Promise<T> {
    while (this.#exclusive || (exclusive && this.#shared > 0)) {
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
    if (exclusive) this.#exclusive = true;
    else this.#shared++;
    try {
      return await work();
    } finally {
      if (exclusive) this.#exclusive = false;
      else this.#shared--;
      const waiters = this.#waiters;
      this.#waiters = [];
      for (const wake of waiters) wake();
    }
  }
}

/**
 * An NBD export as file contents, with IO counters and stale-connection
 * detection.
 *
 * @example
 * ```ts
 * const file = await ExportFile.open("nbd+unix:///?socket=/tmp/s", { connections: 4 });
 * const buf = new Uint8Array(4096);
 * await file.read(buf, 0);
 * console.log(file.stats());
 * await file.close();
 * ```
 */
export class ExportFile implements FileContents {
  readonly #connections: Connection[];
  readonly #primary: NbdClient;
  readonly #target: string;
  readonly #reconnect: boolean;
  /** Streams of reconnection attempts in progress, closed when closing. */
  readonly #attempts = new Set<ByteStream>();
  /** Reconnection loops waiting between attempts. */
  readonly #sleepers = new Set<() => void>();
  readonly #readOnly: boolean;
  readonly #timeoutMs: number;
  readonly #connectTimeout: number | undefined;
  readonly #onEvent: (message: string) => void;
  readonly #counters = new IoCounters();
  readonly #gate = new RangeGate();
  readonly #minimum: number;
  #watchdog: ReturnType<typeof setInterval> | undefined;
  #closed = false;

  private constructor(target: string, clients: readonly NbdClient[], options: ExportFileOptions) {
    this.#connections = clients.map((c) => new Connection(c));
    this.#primary = clients[0]!;
    this.#target = target;
    this.#reconnect = options.reconnect ?? true;
    this.#readOnly = (options.readOnly ?? false) || this.#primary.readOnly;
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.#connectTimeout = options.connectTimeout;
    this.#onEvent = options.onEvent ?? (() => {});
    this.#minimum = this.#primary.blockSize.minimum;
    if (this.#timeoutMs > 0) {
      const period = Math.max(100, Math.min(1000, this.#timeoutMs / 4));
      const timer = setInterval(() => this.#checkStale(), period);
      Deno.unrefTimer(timer);
      this.#watchdog = timer;
    }
  }

  /** Connects to the export a URI names. */
  static async open(uri: string, options: ExportFileOptions = {}): Promise<ExportFile> {
    const pool = await NbdClientPool.connect(uri, {
      connections: options.connections ?? 4,
      timeout: options.connectTimeout,
    });
    // A 1 MiB WRITE then leaves in one piece rather than five (see io/socket_buffers.ts).
    enlargeNewSocketBuffers({ bytes: SEND_BUFFER });
    return new ExportFile(uri, pool.clients, options);
  }

  /** Size of the export. */
  get size(): number {
    return this.#primary.size();
  }

  /** Whether writes are refused. */
  get readOnly(): boolean {
    return this.#readOnly;
  }

  /** The server's preferred block size. */
  get blockSize(): number {
    return this.#primary.blockSize.preferred;
  }

  /** The first connection: what was negotiated. */
  get primary(): NbdClient {
    return this.#primary;
  }

  /** Number of connections opened. */
  get connectionCount(): number {
    return this.#connections.length;
  }

  /** The URI of the export. */
  get uri(): string {
    return formatNbdUri(this.#primary.uri);
  }

  /** IO counters and connection states now. */
  stats(): IoStats {
    const now = Date.now();
    const connections: ConnectionStatus[] = this.#connections.map((c) => ({
      inFlight: c.inFlight,
      state: c.dead ?? "connected",
      msSinceReply: c.lastReply ? now - c.lastReply : null,
    }));
    return this.#counters.snapshot(connections);
  }

  // ---- FileContents --------------------------------------------------------

  /** Reads `buf.length` bytes at `offset`. */
  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.#counters.count("read", buf.length, () => {
      if (this.#aligned(offset, buf.length)) return this.#call((c) => c.pread(buf, offset));
      return this.#readUnaligned(buf, offset);
    });
  }

  /** Writes `buf` at `offset`. */
  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.#counters.count("write", buf.length, () => {
      if (this.#readOnly) throw new NbdError(EROFS, "the export is read-only");
      if (this.#minimum === 1) return this.#call((c) => c.pwrite(buf, offset));
      const aligned = this.#aligned(offset, buf.length);
      return this.#gate.run(
        !aligned,
        () =>
          aligned ? this.#call((c) => c.pwrite(buf, offset)) : this.#writeUnaligned(buf, offset),
      );
    });
  }

  /** fsync: NBD FLUSH (nothing to do when the server has no FLUSH). */
  flush(): Promise<void> {
    return this.#counters.count("flush", 0, async () => {
      // With multi-conn, a FLUSH on one connection covers the writes answered on all.
      if (this.#primary.canFlush && !this.#readOnly) await this.#call((c) => c.flush());
    });
  }

  /**
   * PUNCH_HOLE: TRIM the range, then make sure it reads as zeroes: parts
   * that block status does not report as zero get WRITE_ZEROES.
   */
  punchHole(offset: number, length: number): Promise<void> {
    return this.#counters.count("zero", 0, async () => {
      this.#checkWritable();
      const client = this.#primary;
      if (!client.canTrim) {
        if (!client.canZero) throw new NbdError(EOPNOTSUPP, "the server cannot trim or zero");
        await this.#call((c) => c.zero(offset, length, { mayTrim: true }));
        return;
      }
      const [start, end] = this.#innerBlocks(offset, length);
      if (start < end) await this.#call((c) => c.trim(start, end - start));
      for (const [from, to] of await this.#nonZero(offset, length)) {
        await this.#zero(from, to - from, true);
      }
    });
  }

  /** ZERO_RANGE: WRITE_ZEROES that keeps the range allocated. */
  zeroRange(offset: number, length: number): Promise<void> {
    return this.#counters.count("zero", 0, () => {
      this.#checkWritable();
      return this.#zero(offset, length, false);
    });
  }

  /** SEEK_DATA from base:allocation. */
  seekData(offset: number): Promise<number> {
    return this.#seek(offset, false);
  }

  /** SEEK_HOLE from base:allocation. */
  seekHole(offset: number): Promise<number> {
    return this.#seek(offset, true);
  }

  /**
   * Waits for the requests in flight, flushes (when writable and the server
   * can) and closes every connection. Whatever is still unanswered after
   * `graceMs` is failed and its connection dropped, so closing never hangs
   * on a server that stopped answering.
   */
  async close(graceMs = 10_000): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#watchdog !== undefined) clearInterval(this.#watchdog);
    for (const stream of this.#attempts) stream.close();
    for (const wake of [...this.#sleepers]) wake();
    const timer = setTimeout(() => {
      for (const conn of this.#connections) {
        if (conn.dead) continue;
        const why = `closing: no reply from the server within ${graceMs / 1000} s`;
        this.#giveUp(conn, why);
        conn.client.abort(why);
      }
    }, graceMs);
    try {
      while (this.#connections.some((c) => !c.dead && c.inFlight > 0)) {
        await new Promise((r) => setTimeout(r, 20));
      }
      const live = this.#connections.some((c) => !c.dead);
      if (!this.#readOnly && this.#primary.canFlush && live) {
        try {
          await this.#call((c) => c.flush());
        } catch (error) {
          this.#onEvent(`final flush failed: ${(error as Error).message}`);
        }
      }
      await Promise.all(this.#connections.map((c) => c.client.close().catch(() => {})));
    } finally {
      clearTimeout(timer);
    }
  }

  // ---- connections -----------------------------------------------------------

  /** Runs an NBD request on the least busy working connection. */
  async #call<T>(op: (client: NbdClient) => Promise<T>): Promise<T> {
    let best: Connection | undefined;
    for (const c of this.#connections) {
      if (c.dead) continue;
      if (!best || c.inFlight < best.inFlight) best = c;
    }
    if (!best) {
      const why = this.#connections.find((c) => c.dead)?.dead ?? "closed";
      throw new NbdError(NBD_EIO, `no working connection to the server (${why})`);
    }
    const conn = best;
    const client = conn.client;
    if (conn.inFlight++ === 0) conn.busySince = Date.now();
    try {
      return await op(client);
    } catch (error) {
      const failure = client.failure;
      if (failure && !conn.dead && conn.client === client) this.#giveUp(conn, failure.message);
      throw error;
    } finally {
      conn.inFlight--;
      conn.lastReply = Date.now();
    }
  }

  #describe(conn: Connection): string {
    const index = this.#connections.indexOf(conn) + 1;
    return `connection ${index} of ${this.#connections.length} to ${this.uri}`;
  }

  #giveUp(conn: Connection, why: string): void {
    conn.dead = why;
    this.#onEvent(`${this.#describe(conn)}: ${why}`);
    if (this.#reconnect && !this.#closed) this.#startReconnect(conn);
  }

  /** Makes the connection again in the background, with growing pauses between attempts. */
  #startReconnect(conn: Connection): void {
    if (conn.reconnecting) return;
    conn.reconnecting = true;
    (async () => {
      let pause = RECONNECT_FIRST_MS;
      let reported = false;
      while (!this.#closed) {
        await this.#pause(pause);
        if (this.#closed) break;
        pause = Math.min(pause * 2, RECONNECT_MAX_MS);
        let client: NbdClient;
        try {
          client = await this.#connectOnce(
            Math.max(1000, Math.min(this.#timeoutMs || 10_000, 10_000)),
          );
        } catch (error) {
          if (!reported) {
            this.#onEvent(
              `${this.#describe(conn)}: cannot reconnect yet: ${(error as Error).message}`,
            );
            reported = true;
          }
          continue;
        }
        if (this.#closed) {
          await client.close().catch(() => {});
          break;
        }
        if (client.size() !== this.size || client.readOnly !== this.#primary.readOnly) {
          await client.close().catch(() => {});
          conn.dead =
            `the export changed (size ${client.size()}, was ${this.size}); not reconnecting`;
          this.#onEvent(`${this.#describe(conn)}: ${conn.dead}`);
          break;
        }
        conn.client = client;
        conn.lastReply = Date.now();
        conn.dead = undefined;
        this.#onEvent(`${this.#describe(conn)}: reconnected`);
        break;
      }
      conn.reconnecting = false;
    })();
  }

  /**
   * One connection attempt that gives up after `timeoutMs` (a stopped
   * server accepts the connection but never greets), or when closing.
   */
  async #connectOnce(timeoutMs: number): Promise<NbdClient> {
    const uri = toNbdUri(this.#target);
    const tls = uri.tls ? clientTlsSettings(uri) : undefined;
    const stream = await openStream(uri, { timeoutMs });
    enlargeNewSocketBuffers({ bytes: SEND_BUFFER });
    if (this.#closed) {
      stream.close();
      throw new Error("closing");
    }
    this.#attempts.add(stream);
    const timer = setTimeout(() => stream.close(), timeoutMs);
    try {
      const session = await NbdHandshake.fromStream(stream, {
        uri,
        tls,
        timeout: this.#connectTimeout,
      });
      return await NbdClient.fromHandshake(session);
    } catch (error) {
      stream.close();
      throw error;
    } finally {
      clearTimeout(timer);
      this.#attempts.delete(stream);
    }
  }

  /** A pause that `close()` cuts short. */
  #pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this.#sleepers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.#sleepers.add(wake);
    });
  }

  #checkStale(): void {
    const now = Date.now();
    for (const conn of this.#connections) {
      if (conn.dead || conn.inFlight === 0) continue;
      const quiet = now - Math.max(conn.busySince, conn.lastReply);
      if (quiet > this.#timeoutMs) {
        const why = `stale: no reply from the server for ${Math.round(quiet / 1000)} s`;
        this.#giveUp(conn, why);
        conn.client.abort(why);
      }
    }
  }

  #checkWritable(): void {
    if (this.#readOnly) throw new NbdError(EROFS, "the export is read-only");
  }

  // ---- helpers -----------------------------------------------------------------

  #aligned(offset: number, length: number): boolean {
    const m = this.#minimum;
    return m === 1 || (offset % m === 0 && (length % m === 0 || offset + length === this.size));
  }

  /** The whole minimum-size blocks inside a range, as [start, end). */
  #innerBlocks(offset: number, length: number): [number, number] {
    const m = this.#minimum;
    const start = Math.ceil(offset / m) * m;
    const end = offset + length === this.size ? this.size : Math.floor((offset + length) / m) * m;
    return [start, Math.max(start, end)];
  }

  /** The enclosing range aligned to the minimum block size. */
  #outerBlocks(offset: number, length: number): [number, number] {
    const m = this.#minimum;
    const start = Math.floor(offset / m) * m;
    const end = Math.min(this.size, Math.ceil((offset + length) / m) * m);
    return [start, end];
  }

  async #readUnaligned(buf: Uint8Array, offset: number): Promise<void> {
    const [start, end] = this.#outerBlocks(offset, buf.length);
    const tmp = new Uint8Array(end - start);
    await this.#call((c) => c.pread(tmp, start));
    buf.set(tmp.subarray(offset - start, offset - start + buf.length));
  }

  async #writeUnaligned(buf: Uint8Array, offset: number): Promise<void> {
    const [start, end] = this.#outerBlocks(offset, buf.length);
    const tmp = new Uint8Array(end - start);
    await this.#call((c) => c.pread(tmp, start));
    tmp.set(buf, offset - start);
    await this.#call((c) => c.pwrite(tmp, start));
  }

  /** Zeroes a range with WRITE_ZEROES, or by writing zeroes when the server has none. */
  async #zero(offset: number, length: number, mayTrim: boolean): Promise<void> {
    const [start, end] = this.#innerBlocks(offset, length);
    if (start < end) {
      if (this.#primary.canZero) {
        await this.#call((c) => c.zero(start, end - start, { mayTrim }));
      } else {
        const zeroes = new Uint8Array(Math.min(ZERO_CHUNK, end - start));
        for (let at = start; at < end; at += zeroes.length) {
          const n = Math.min(zeroes.length, end - at);
          await this.#call((c) => c.pwrite(zeroes.subarray(0, n), at));
        }
      }
    }
    // Partial blocks at the edges (only with a minimum block size above 1).
    const edges: [number, number][] = [];
    if (start >= end) edges.push([offset, offset + length]);
    else {
      if (offset < start) edges.push([offset, start]);
      if (end < offset + length) edges.push([end, offset + length]);
    }
    for (const [from, to] of edges) {
      await this.#gate.run(true, () => this.#writeUnaligned(new Uint8Array(to - from), from));
    }
  }

  /** Parts of a range that block status does not promise to read as zeroes. */
  async #nonZero(offset: number, length: number): Promise<[number, number][]> {
    if (!this.#primary.canMetaContext(BASE_ALLOCATION)) return [[offset, offset + length]];
    const ranges: [number, number][] = [];
    await this.#call(async (client) => {
      for await (const extent of client.iterateExtents(offset, length)) {
        if (extent.flags & NBD_STATE_ZERO) continue;
        const last = ranges[ranges.length - 1];
        if (last && last[1] === extent.offset) last[1] += extent.length;
        else ranges.push([extent.offset, extent.offset + extent.length]);
      }
    });
    return ranges;
  }

  async #seek(offset: number, hole: boolean): Promise<number> {
    const size = this.size;
    if (!this.#primary.canMetaContext(BASE_ALLOCATION)) return hole ? size : offset;
    return await this.#call(async (client) => {
      for await (const extent of client.iterateExtents(offset, size - offset)) {
        const isHole = (extent.flags & NBD_STATE_ZERO) !== 0;
        if (isHole === hole) return extent.offset;
      }
      return size;
    });
  }
}
