/**
 * The state the server's layers share: what every connection sees of its
 * server, and what the handshake and the request loop see of their
 * connection. Kept apart from the classes that implement them so that the
 * server, connection, negotiation and transmission modules import each
 * other in one direction only.
 *
 * @module
 */

import type { BufferedReader } from "../io/buffered_reader.ts";
import type { ByteStream } from "../io/byte_stream.ts";
import type { CorkedWriter } from "../io/corked_writer.ts";
import type { Backend } from "../core/backend.ts";
import type { Exports } from "./exports.ts";
import type { ConnectionInfo, ServerStats } from "./stats.ts";

/** How TLS is offered: off, optional, or required before anything else. */
export type TlsMode = "off" | "on" | "require";

/** Upgrades accepted streams to TLS (server side of STARTTLS). */
export interface TlsUpgrader {
  /** Whether this stream's transport can be upgraded. */
  canUpgrade(stream: ByteStream): boolean;
  /** Sends `ack` (the STARTTLS reply), performs the TLS handshake and returns the encrypted stream. */
  upgrade(stream: ByteStream, ack: Uint8Array): Promise<ByteStream>;
}

/** Shared state every connection of a server sees. */
export interface ServerState {
  /** The exports being served. */
  exports: Exports;
  /** Serve read-only whatever the backend can do. */
  readonly: boolean;
  /** TLS mode. */
  tlsMode: TlsMode;
  /** TLS upgrader, when TLS is enabled. */
  tls?: TlsUpgrader;
  /** Log options and requests. */
  verbose: boolean;
  /** Requests in flight per connection before the request loop stops reading. */
  maxInFlight: number;
  /** Largest payload advertised in NBD_INFO_BLOCK_SIZE. */
  maxPayload: number;
  /** Largest READ/WRITE accepted (real clients exceed the advertised maximum). */
  maxRequest: number;
  /** Milliseconds a client may take to finish the handshake (0 = no limit). */
  handshakeTimeoutMs: number;
  /** Milliseconds without requests before an idle connection is closed (0 = never). */
  idleTimeoutMs: number;
  /** Set once shutdown has started. */
  shuttingDown: boolean;
  /** IO counters. */
  stats: ServerStats;
  /** Writes a log line (to stderr by default). */
  log(message: string): void;
}

/** What the handshake and the request loop need from their connection. */
export interface ConnectionContext {
  /** Buffered reader over the current stream (replaced by STARTTLS). */
  reader: BufferedReader;
  /** Corked writer over the current stream (replaced by STARTTLS). */
  writer: CorkedWriter;
  /** The server this connection belongs to. */
  server: ServerState;
  /** TLS has been negotiated. */
  tls: boolean;
  /** STARTTLS is possible on this transport. */
  canStartTls: boolean;
  /** The connection is being closed by the server. */
  closing: boolean;
  /** Log requests and options. */
  verbose: boolean;
  /** Logs a line prefixed with the connection id. */
  log(message: string): void;
  /** Sends the STARTTLS ACK and upgrades the stream to TLS. */
  startTls(ack: Uint8Array): Promise<void>;
  /** Opens the backend stack for an export. */
  openBackend(exportName: string): Promise<Backend>;
  /** Closes the connection at once (limits, timeouts). */
  abort(): void;
  /** This connection's entry in the server's counters. */
  readonly info: ConnectionInfo;
}
