/**
 * A small pool of connections to one export, for servers that advertise
 * multi-conn (NBD_FLAG_CAN_MULTI_CONN). Without that flag the pool holds
 * one connection, because spreading writes over several connections is
 * only safe when the server keeps them coherent.
 *
 * @module
 */

import type { Capabilities, ExtentsFlags } from "../core/backend.ts";
import type { Extent } from "../protocol/transmission.ts";
import {
  type ConnectOptions,
  NbdClient,
  type ReadOptions,
  type WriteOptions,
  type ZeroOptions,
} from "./client.ts";
import type { Backend } from "../core/backend.ts";
import { toNbdUri } from "./connect.ts";
import type { NbdUri } from "../protocol/uri.ts";

/** Options of `NbdClientPool.connect`. */
export interface PoolOptions extends ConnectOptions {
  /** Connections to open when the server allows several (default 4). */
  connections?: number;
}

/**
 * Up to N connections to one export. Each request goes to the connection
 * with the fewest requests in flight.
 *
 * @example
 * ```ts
 * await using pool = await NbdClientPool.connect(uri, { connections: 4 });
 * await Promise.all([pool.pread(a, 0), pool.pread(b, 1 << 20)]);
 * ```
 */
export class NbdClientPool implements Backend, AsyncDisposable {
  readonly #clients: NbdClient[];
  readonly #uri: NbdUri;
  readonly #options: PoolOptions;

  private constructor(clients: NbdClient[], uri: NbdUri, options: PoolOptions) {
    this.#clients = clients;
    this.#uri = uri;
    this.#options = options;
  }

  /** The open connections; the first one decided the pool's size. */
  get clients(): readonly NbdClient[] {
    return this.#clients;
  }

  /**
   * Opens more connections, up to `connections` in all, if the server
   * advertises multi-conn. Connections that cannot be opened are left out:
   * the pool works with those it has.
   */
  async grow(connections: number): Promise<void> {
    await this.#addConnections(Math.floor(connections) - this.#clients.length);
  }

  /**
   * Opens up to `count` more connections (none without multi-conn) and keeps
   * those that opened; resolves to the first failure, if any.
   */
  async #addConnections(count: number): Promise<unknown> {
    if (count <= 0 || !this.primary.canMultiConn) return undefined;
    const opened = await Promise.allSettled(
      Array.from({ length: count }, () => NbdClient.connect(this.#uri, this.#options)),
    );
    let failure: unknown;
    for (const result of opened) {
      if (result.status === "fulfilled") this.#clients.push(result.value);
      else failure ??= result.reason;
    }
    return failure;
  }

  /**
   * Opens one connection, then more (up to `connections`) if the server
   * advertises multi-conn.
   */
  static async connect(uri: string | NbdUri, options: PoolOptions = {}): Promise<NbdClientPool> {
    const parsed = toNbdUri(uri);
    const wanted = Math.max(1, Math.floor(options.connections ?? 4));
    const pool = new NbdClientPool([await NbdClient.connect(parsed, options)], parsed, options);
    const failure = await pool.#addConnections(wanted - 1);
    if (failure !== undefined) {
      await Promise.all(pool.clients.map((c) => c.close().catch(() => {})));
      throw failure;
    }
    return pool;
  }

  /** The first connection (what the export looks like). */
  get primary(): NbdClient {
    return this.clients[0]!;
  }

  /** The connection with the fewest requests in flight. */
  pick(): NbdClient {
    let best = this.clients[0]!;
    for (let i = 1; i < this.clients.length; i++) {
      const client = this.clients[i]!;
      if (client.inFlight < best.inFlight) best = client;
    }
    return best;
  }

  /** Size of the export. */
  size(): number {
    return this.primary.size();
  }

  /** Capabilities of the export. */
  capabilities(): Capabilities {
    return this.primary.capabilities();
  }

  /** Reads into `buf` at `offset`. */
  pread(buf: Uint8Array, offset: number, options?: ReadOptions): Promise<void> {
    return this.pick().pread(buf, offset, options);
  }

  /** Writes `buf` at `offset`. */
  pwrite(buf: Uint8Array, offset: number, options?: WriteOptions): Promise<void> {
    return this.pick().pwrite(buf, offset, options);
  }

  /**
   * Flushes. With multi-conn a flush on one connection covers the writes
   * answered on all of them, so callers should await their writes first.
   */
  flush(): Promise<void> {
    return this.pick().flush();
  }

  /** Trims a range. */
  trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    return this.pick().trim(offset, length, options);
  }

  /** Zeroes a range. */
  zero(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.pick().zero(offset, length, options);
  }

  /** base:allocation extents from `offset`. */
  extents(offset: number, length: number, flags?: ExtentsFlags): Promise<Extent[]> {
    return this.pick().extents(offset, length, flags);
  }

  /** Prefetch hint. */
  cache(offset: number, length: number): Promise<void> {
    return this.pick().cache(offset, length);
  }

  /** Closes every connection. */
  async close(): Promise<void> {
    await Promise.all(this.clients.map((c) => c.close()));
  }

  /** Same as `close()`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
