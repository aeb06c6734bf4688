/**
 * An NBD server: an export table, the connections being served, and an
 * orderly shutdown. Listeners (TCP, Unix, socket activation, stdio) hand
 * accepted streams to `NbdServer.serve`.
 *
 * @module
 */

import { GRACE_MS, within } from "../util/signals.ts";
import type { ByteStream } from "../io/byte_stream.ts";
import { Connection } from "./connection.ts";
import type { Exports } from "./exports.ts";
import { ServerStats } from "./stats.ts";
import type { ServerState, TlsMode, TlsUpgrader } from "./context.ts";

export type { ServerState, TlsMode, TlsUpgrader } from "./context.ts";

/** Options of an `NbdServer`. */
export interface NbdServerOptions {
  /** The exports to serve. */
  exports: Exports;
  /** Serve read-only. */
  readonly?: boolean;
  /** TLS mode (default off). */
  tlsMode?: TlsMode;
  /** TLS upgrader; required unless the mode is off. */
  tls?: TlsUpgrader;
  /** Log options and requests. */
  verbose?: boolean;
  /** Requests in flight per connection (default 64). */
  maxInFlight?: number;
  /** Connections served at once (default 1024); more are closed at once. */
  maxConnections?: number;
  /** Largest payload advertised (default 32 MiB). */
  maxPayload?: number;
  /** Largest READ/WRITE accepted (default: 64 MiB, or maxPayload when that is given). */
  maxRequest?: number;
  /** Seconds allowed for the handshake (default 60; 0 = no limit). */
  handshakeTimeout?: number;
  /** Seconds of inactivity before a connection is closed (default 0 = never). */
  idleTimeout?: number;
  /** Log sink (default: stderr with an "nbd: " prefix). */
  log?: (message: string) => void;
}

/** Default bound on requests in flight per connection. */
export const DEFAULT_MAX_IN_FLIGHT = 64;
/** Default bound on concurrent connections. */
export const DEFAULT_MAX_CONNECTIONS = 1024;
/** Default advertised maximum payload (the protocol's conventional 32 MiB). */
const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
/** Default largest READ/WRITE accepted: 64 MiB, as real clients send such requests. */
const DEFAULT_MAX_REQUEST = 64 * 1024 * 1024;
/** Default handshake timeout in seconds. */
export const DEFAULT_HANDSHAKE_TIMEOUT = 60;

/**
 * Serves NBD on whatever streams it is given.
 *
 * @example
 * ```ts
 * const server = new NbdServer({ exports: new Exports({ plugin }) });
 * for await (const conn of Deno.listen({ port: 10809 })) server.serve(fromDenoConn(conn), "tcp");
 * ```
 */
export class NbdServer {
  /** The state connections share. */
  readonly state: ServerState;
  #connections = new Set<Connection>();
  #nextId = 1;
  #maxConnections: number;
  #refusing = false;
  #idleWaiters: Array<() => void> = [];

  /** Creates a server. */
  constructor(options: NbdServerOptions) {
    const log = options.log ?? ((message: string) => console.error(`nbd: ${message}`));
    this.#maxConnections = options.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    this.state = {
      exports: options.exports,
      readonly: options.readonly ?? false,
      tlsMode: options.tlsMode ?? "off",
      tls: options.tls,
      verbose: options.verbose ?? false,
      maxInFlight: options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT,
      maxPayload: options.maxPayload ?? DEFAULT_MAX_PAYLOAD,
      maxRequest: options.maxRequest ?? (options.maxPayload ?? DEFAULT_MAX_REQUEST),
      handshakeTimeoutMs: (options.handshakeTimeout ?? DEFAULT_HANDSHAKE_TIMEOUT) * 1000,
      idleTimeoutMs: (options.idleTimeout ?? 0) * 1000,
      shuttingDown: false,
      stats: new ServerStats(),
      log,
    };
  }

  /** Number of open connections. */
  get connectionCount(): number {
    return this.#connections.size;
  }

  /** Serves one accepted stream until it closes. Never rejects. */
  async serve(stream: ByteStream, peer: string): Promise<void> {
    if (this.state.shuttingDown) {
      stream.close();
      return;
    }
    if (this.#connections.size >= this.#maxConnections) {
      // Logged once per burst of refusals, not once per refused client.
      if (!this.#refusing) {
        this.state.log(`connection limit (${this.#maxConnections}) reached: refusing new clients`);
      }
      this.#refusing = true;
      stream.close();
      return;
    }
    this.#refusing = false;
    const connection = new Connection(this.state, stream, this.#nextId++, peer);
    this.#connections.add(connection);
    try {
      await connection.serve();
    } finally {
      this.#connections.delete(connection);
      if (this.#connections.size === 0) {
        const waiters = this.#idleWaiters;
        this.#idleWaiters = [];
        for (const wake of waiters) wake();
      }
    }
  }

  /** Resolves when no connection is open. */
  idle(): Promise<void> {
    if (this.#connections.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /**
   * Stops serving: new options get ERR_SHUTDOWN and new requests ESHUTDOWN,
   * requests in flight finish (within GRACE_MS), data is flushed, connections close, and the
   * plugin and filters are closed.
   */
  async shutdown(): Promise<void> {
    this.state.shuttingDown = true;
    // Each connection gives its requests in flight GRACE_MS, then is closed;
    // requests a backend never answers are abandoned, not waited for.
    await Promise.all([...this.#connections].map((c) => c.shutdown()));
    await within(1000, this.idle());
    await within(GRACE_MS, this.state.exports.close());
  }
}
