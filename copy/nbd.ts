/**
 * The NBD endpoint: an export named by any URI the client understands,
 * over one connection or several (when the server advertises multi-conn).
 * Holes come from `base:allocation` block status; zero runs become
 * WRITE_ZEROES (with NO_HOLE when the copy must stay allocated), or plain
 * writes of zeroes when the server cannot zero.
 *
 * @module
 */

import { toNbdUri } from "../client/connect.ts";
import { NbdConnectionError, NbdRequestError } from "../client/errors.ts";
import { ProtocolError } from "../protocol/errors.ts";
import { terminationSignal } from "../util/signals.ts";
import { NbdClientPool } from "../client/pool.ts";
import { BASE_ALLOCATION, NBD_STATE_ZERO } from "../protocol/constants.ts";
import type { BlockSize } from "../protocol/handshake.ts";
import { enlargeNewSocketBuffers } from "../io/socket_buffers.ts";
import { ZERO_BUFFER } from "../util/zero_buffer.ts";
import {
  BaseEndpoint,
  type CopyExtent,
  type NbdTimeouts,
  type Role,
  type ShareSpec,
} from "./endpoint.ts";
import { RangeSet } from "./resume.ts";

/**
 * Connections opened when none were asked for: 4, which hides network
 * latency; but to a server on this machine (a Unix socket, or TCP at a
 * loopback or local address: `onThisMachine`), one. Such a server runs on
 * our own processors, has no latency to hide, and each connection more only
 * made it and the copy work harder (figures in docs/performance.md).
 * Threads have one each.
 */
export function defaultConnections(uri: string): number {
  return onThisMachine(uri) ? 1 : 4;
}

/** Whether `uri` names a server on a Unix socket, and so on this machine. */
export function onUnixSocket(uri: string): boolean {
  try {
    return toNbdUri(uri).transport === "unix";
  } catch {
    return false;
  }
}

/**
 * Whether `uri` names a server on this machine: on a Unix socket, or over
 * TCP at a loopback address ("localhost", 127.0.0.0/8, ::1) or at an
 * address of one of this machine's interfaces. Host names other than
 * localhost are not resolved: they count as remote.
 */
export function onThisMachine(uri: string): boolean {
  let parsed;
  try {
    parsed = toNbdUri(uri);
  } catch {
    return false;
  }
  if (parsed.transport === "unix") return true;
  if (parsed.transport !== "tcp" || parsed.host === undefined) return false;
  const host = parsed.host.toLowerCase().replace(/\.$/, "");
  if (host === "localhost" || host.endsWith(".localhost")) return true;
  if (/^127\.\d+\.\d+\.\d+$/.test(host) || host === "::1" || host === "0.0.0.0" || host === "::") {
    return true;
  }
  try {
    // Asked only when allowed already: a library user must not get a permission prompt.
    const allowed = Deno.permissions.querySync({ name: "sys", kind: "networkInterfaces" });
    if (allowed.state !== "granted") return false;
    return Deno.networkInterfaces().some((entry) => entry.address.toLowerCase() === host);
  } catch {
    return false;
  }
}

/** Connections (or threads) worth running against work on our own processors: their number, at most 4. */
export function localConnections(): number {
  return Math.max(1, Math.min(4, navigator.hardwareConcurrency || 4));
}

/** How an NBD endpoint reconnects after losing its connection (`nbd copy --retry`). */
export interface RetryOptions {
  /** Reconnection attempts after each loss, and re-sends of one request, at most. */
  attempts: number;
  /** Wait after the first attempt (made at once), doubled after each failed one (default 250 ms). */
  firstDelayMs?: number;
  /** Longest wait between attempts (default 10 s). */
  maxDelayMs?: number;
  /** Where reconnection notes go. */
  log?: (message: string) => void;
}

/**
 * A failure that a new connection may cure: the connection broke or timed
 * out, or the server is shutting down (ESHUTDOWN, which the protocol has
 * for a request to be sent again after reconnecting).
 */
function isConnectionLoss(error: unknown): boolean {
  return error instanceof NbdConnectionError || error instanceof ProtocolError ||
    (error instanceof NbdRequestError && error.errno === "ESHUTDOWN");
}

/** What the protocol shows of an export, to check that a new connection reaches the same one. */
function exportIdentity(pool: NbdClientPool): string {
  const c = pool.primary;
  return JSON.stringify([c.exportName, c.size(), c.flags, c.description ?? null]);
}

/** Options of `NbdEndpoint.open`. */
export interface NbdEndpointOptions {
  /** Connections to open when the server allows several (default: `defaultConnections`). */
  connections?: number;
  /** Runs after the connections are closed (e.g. stopping a server we started), once open. */
  cleanup?: () => Promise<void>;
  /** Connect, handshake and request timeouts (the client's defaults when absent). */
  timeouts?: NbdTimeouts;
  /** Stops connecting (default: the process's termination signal). */
  signal?: AbortSignal;
  /** Reconnect after a lost connection and send the unanswered requests again. */
  retry?: RetryOptions;
}

/** An NBD export as a copy source or destination. */
export class NbdEndpoint extends BaseEndpoint {
  readonly name: string;
  readonly kind = "nbd";
  readonly size: number;
  readonly blockSize: BlockSize;
  override readonly canExtents: boolean;
  #pool: NbdClientPool;
  readonly #canZero: boolean;
  readonly #canFlush: boolean;
  readonly #cleanup: (() => Promise<void>) | undefined;
  readonly #uri: string;
  readonly #role: Role;
  readonly #timeouts: NbdTimeouts | undefined;
  readonly #options: NbdEndpointOptions;
  #closed: Promise<void> | undefined;
  #reconnecting: Promise<void> | undefined;
  /** Reconnections made after lost connections. */
  reconnections = 0;
  /**
   * Writes and zeroes acknowledged and not yet covered by a flush (kept
   * when retrying to a server that flushes): a server restarted behind a
   * lost connection may have dropped them.
   */
  #unflushed: RangeSet | undefined;
  /** What each flush in flight covers. */
  readonly #flushing = new Set<RangeSet>();
  /** Ranges written on a lost connection and never flushed there: to be written again. */
  readonly #lost = new RangeSet();

  private constructor(
    name: string,
    uri: string,
    role: Role,
    pool: NbdClientPool,
    options: NbdEndpointOptions,
  ) {
    super();
    this.#timeouts = options.timeouts;
    this.#options = options;
    this.name = name;
    this.#uri = uri;
    this.#role = role;
    this.#pool = pool;
    const client = pool.primary;
    this.size = client.size();
    this.blockSize = { ...client.blockSize };
    this.canExtents = client.canMetaContext(BASE_ALLOCATION);
    this.#canZero = client.canZero;
    this.#canFlush = client.canFlush;
    this.#cleanup = options.cleanup;
    if (options.retry && role === "destination" && this.#canFlush) {
      this.#unflushed = new RangeSet();
    }
  }

  /** Whether this destination keeps what it acknowledged until a flush (retrying, flushable). */
  get tracksUnflushed(): boolean {
    return this.#unflushed !== undefined;
  }

  /**
   * Ranges this destination acknowledged on a connection that was lost
   * before a flush covered them (live); `takeLost` empties it.
   */
  get lost(): RangeSet {
    return this.#lost;
  }

  /** The lost ranges, which the caller will write again; the set is emptied. */
  takeLost(): Array<[number, number]> {
    const ranges = this.#lost.toArray();
    this.#lost.clear();
    return ranges;
  }

  /** Notes a write or zero acknowledged on `pool`. */
  #acknowledged(pool: NbdClientPool, offset: number, length: number): void {
    if (!this.#unflushed) return;
    if (pool === this.#pool) this.#unflushed.add(offset, length);
    else this.#lost.add(offset, length);
  }

  /** The connections (replaced after a reconnection). */
  get pool(): NbdClientPool {
    return this.#pool;
  }

  /**
   * Runs `request` on the connections; with retries, a lost connection is
   * replaced and the request sent again, at most `attempts` times.
   */
  async #call<T>(request: (pool: NbdClientPool) => Promise<T>): Promise<T> {
    const retry = this.#options.retry;
    for (let resent = 0;; resent++) {
      const pool = this.#pool;
      try {
        return await request(pool);
      } catch (error) {
        const signal = this.#options.signal ?? terminationSignal();
        if (
          !retry || !isConnectionLoss(error) || this.#closed || signal.aborted ||
          resent >= retry.attempts
        ) throw error;
        await this.#reconnect(pool, error as Error);
      }
    }
  }

  /**
   * Replaces `failed` (once, whichever request noticed first) with new
   * connections to the same export, waiting longer after each failed attempt.
   */
  #reconnect(failed: NbdClientPool, cause: Error): Promise<void> {
    if (this.#pool !== failed) return Promise.resolve();
    this.#reconnecting ??= (async () => {
      const retry = this.#options.retry!;
      const log = retry.log ?? ((m: string) => console.error(`nbd: ${m}`));
      // Requests still in flight on the other connections are sent again on the new ones.
      for (const client of failed.clients) client.abort(`replaced after: ${cause.message}`);
      // What the old connections acknowledged without a flush may be gone with the server.
      if (this.#unflushed) {
        this.#lost.addAll(this.#unflushed);
        this.#unflushed.clear();
        for (const covered of this.#flushing) {
          this.#lost.addAll(covered);
          covered.clear();
        }
      }
      failed.close().catch(() => {});
      const identity = exportIdentity(failed);
      const connections = failed.clients.length;
      let delay = retry.firstDelayMs ?? 250;
      let last: unknown = cause;
      for (let attempt = 1; attempt <= retry.attempts; attempt++) {
        const signal = this.#options.signal ?? terminationSignal();
        if (attempt > 1) {
          // A stop signal ends the wait: the copy is stopping.
          await new Promise<void>((resolve) => {
            const done = () => {
              clearTimeout(timer);
              signal.removeEventListener("abort", done);
              resolve();
            };
            const timer = setTimeout(done, delay);
            signal.addEventListener("abort", done, { once: true });
          });
          delay = Math.min(delay * 2, retry.maxDelayMs ?? 10_000);
        }
        if (signal.aborted || this.#closed) break;
        let pool: NbdClientPool;
        try {
          pool = await NbdClientPool.connect(this.#uri, {
            connections,
            nativeTls: this.#role === "source",
            ...this.#timeouts,
            signal,
          });
        } catch (error) {
          last = error;
          continue;
        }
        if (exportIdentity(pool) !== identity) {
          await pool.close().catch(() => {});
          throw new Error(`${this.name} is not the same export after reconnecting`);
        }
        this.#pool = pool;
        this.reconnections++;
        log(`${this.name}: reconnected (attempt ${attempt}) after: ${cause.message}`);
        return;
      }
      throw new NbdConnectionError(
        `lost ${this.name} and could not reconnect in ${retry.attempts} attempts: ${
          (last as Error).message
        }`,
        { cause: last },
      );
    })().finally(() => this.#reconnecting = undefined);
    return this.#reconnecting;
  }

  /** Connects to `uri`; a destination must be writable. */
  static async open(
    name: string,
    uri: string,
    role: Role,
    options: NbdEndpointOptions,
  ): Promise<NbdEndpoint> {
    // When connecting fails, the clean-up is the caller's: it knows why better.
    const connections = options.connections ?? defaultConnections(uri);
    // Over TLS a destination mostly writes, which node:tls does in fewer system calls.
    const pool = await NbdClientPool.connect(uri, {
      connections,
      nativeTls: role === "source",
      ...options.timeouts,
      signal: options.signal,
    });
    const endpoint = new NbdEndpoint(name, uri, role, pool, options);
    // Writes of 256 KiB and their headers then leave in one piece: with the default
    // 208 KiB send buffer each one stalled for a wake-up from the server's read.
    if (role === "destination") enlargeNewSocketBuffers();
    if (role === "destination" && pool.primary.readOnly) {
      await endpoint.close();
      throw new Error(`Cannot write to ${name}: the export is read-only`);
    }
    return endpoint;
  }

  /**
   * The same export over another connection, when the server allows
   * several (multi-conn: what one connection flushes, all have).
   */
  override shareSpec(): ShareSpec | undefined {
    if (!this.pool.primary.canMultiConn) return undefined;
    return { kind: "nbd", name: this.name, uri: this.#uri, timeouts: this.#timeouts };
  }

  /**
   * Opens more connections, up to `connections` (default: `defaultConnections`),
   * when the server allows several: for a copy that cannot be shared between
   * threads, after all.
   */
  override async useConnections(connections?: number): Promise<void> {
    await this.pool.grow(connections ?? defaultConnections(this.#uri));
    if (this.#role === "destination") enlargeNewSocketBuffers();
  }

  /** Number of connections in use. */
  get connections(): number {
    return this.pool.clients.length;
  }

  /** Reads the whole buffer. */
  override async read(buf: Uint8Array, offset: number): Promise<number> {
    await this.#call((pool) => pool.pread(buf, offset));
    return buf.length;
  }

  /** base:allocation: a run reads as zero when the server says NBD_STATE_ZERO. */
  override async extents(offset: number, length: number): Promise<CopyExtent[]> {
    const extents = await this.#call((pool) => pool.extents(offset, length, { reqOne: false }));
    const out: CopyExtent[] = [];
    let position = offset;
    for (const extent of extents) {
      out.push({
        offset: position,
        length: extent.length,
        zero: (extent.flags & NBD_STATE_ZERO) !== 0,
      });
      position += extent.length;
    }
    return out;
  }

  /**
   * Writes the buffer; with `headroom`, its request header goes in front of
   * it, and `sent` is called once both have been handed to the socket.
   */
  override write(
    buf: Uint8Array,
    offset: number,
    headroom = false,
    sent?: () => void,
  ): Promise<void> {
    // A write that may be sent again keeps its buffer until the reply.
    if (this.#options.retry) {
      return this.#call(async (pool) => {
        await pool.pwrite(buf, offset, headroom ? { headroom } : undefined);
        this.#acknowledged(pool, offset, buf.length);
      });
    }
    return this.pool.pwrite(buf, offset, headroom ? { headroom, sent } : undefined);
  }

  /** WRITE_ZEROES, or writes of zeroes when the server has no WRITE_ZEROES. */
  override async zero(offset: number, length: number, allocate: boolean): Promise<void> {
    if (this.#canZero) {
      return await this.#call(async (pool) => {
        await pool.zero(offset, length, { mayTrim: !allocate });
        this.#acknowledged(pool, offset, length);
      });
    }
    const step = Math.min(ZERO_BUFFER.length, this.blockSize.maximum);
    const writes: Promise<void>[] = [];
    for (let done = 0; done < length; done += step) {
      const n = Math.min(step, length - done);
      const at = offset + done;
      writes.push(this.#call(async (pool) => {
        await pool.pwrite(ZERO_BUFFER.subarray(0, n), at);
        this.#acknowledged(pool, at, n);
      }));
    }
    const results = await Promise.allSettled(writes);
    for (const result of results) if (result.status === "rejected") throw result.reason;
  }

  /** FLUSH, when the server supports it (otherwise its writes are as durable as they get). */
  override async flush(): Promise<void> {
    if (!this.#canFlush) return;
    const unflushed = this.#unflushed;
    if (!unflushed) return await this.#call((pool) => pool.flush());
    // This flush covers what was acknowledged before it was sent.
    const covered = new RangeSet();
    covered.addAll(unflushed);
    unflushed.clear();
    this.#flushing.add(covered);
    try {
      await this.#call((pool) => pool.flush());
    } catch (error) {
      unflushed.addAll(covered);
      throw error;
    } finally {
      this.#flushing.delete(covered);
    }
  }

  /** Closes the connections, then runs the clean-up. Safe to call more than once. */
  override close(): Promise<void> {
    this.#closed ??= (async () => {
      try {
        await this.#reconnecting?.catch(() => {});
        await this.#pool.close();
      } finally {
        await this.#cleanup?.();
      }
    })();
    return this.#closed;
  }
}
