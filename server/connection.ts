/**
 * One client connection: its streams, the handshake, then transmission,
 * and an orderly end (in-flight requests finish, data is flushed).
 *
 * @module
 */

import { GRACE_MS, within } from "../util/signals.ts";
import { BufferedReader } from "../io/buffered_reader.ts";
import type { ByteStream } from "../io/byte_stream.ts";
import { CorkedWriter } from "../io/corked_writer.ts";
import type { Backend } from "../core/backend.ts";
import { negotiate } from "./negotiate.ts";
import type { ConnectionContext, ServerState } from "./context.ts";
import type { ConnectionInfo } from "./stats.ts";
import { Transmission } from "./transmission.ts";

/** A client connection being served. */
export class Connection implements ConnectionContext {
  /** Connection number. */
  readonly id: number;
  /** Peer address, for logs. */
  readonly peer: string;
  reader: BufferedReader;
  writer: CorkedWriter;
  readonly server: ServerState;
  tls = false;
  closing = false;
  readonly verbose: boolean;
  readonly info: ConnectionInfo;
  #stream: ByteStream;
  #transmission: Transmission | undefined;
  /** The plaintext stream while a TLS handshake is running (closed on shutdown). */
  #upgrading: ByteStream | undefined;
  #backend: Backend | undefined;

  /** Wraps an accepted stream. */
  constructor(server: ServerState, stream: ByteStream, id: number, peer: string) {
    this.server = server;
    this.id = id;
    this.peer = peer;
    this.verbose = server.verbose;
    this.#stream = stream;
    this.reader = new BufferedReader(stream);
    this.writer = new CorkedWriter(stream);
    this.info = server.stats.open(id, peer);
  }

  /** Closes the stream, ending the request loop (used by the idle timeout). */
  abort(): void {
    this.closing = true;
    this.#stream.close();
  }

  /** Whether this transport can be upgraded to TLS. */
  get canStartTls(): boolean {
    return this.server.tls !== undefined && this.server.tls.canUpgrade(this.#stream);
  }

  log(message: string): void {
    this.server.log(`conn ${this.id}: ${message}`);
  }

  async startTls(ack: Uint8Array): Promise<void> {
    if (this.reader.buffered > 0) throw new Error("the client sent data before the STARTTLS reply");
    const plain = this.#stream;
    this.#upgrading = plain;
    let upgraded: ByteStream;
    try {
      upgraded = await this.server.tls!.upgrade(plain, ack);
    } finally {
      this.#upgrading = undefined;
    }
    this.#stream = upgraded;
    this.reader = new BufferedReader(upgraded);
    this.writer = new CorkedWriter(upgraded);
    this.tls = true;
    this.info.tls = true;
  }

  openBackend(exportName: string): Promise<Backend> {
    return this.server.exports.open({
      exportName,
      readonly: this.server.readonly,
      tls: this.tls,
      connectionId: this.id,
    });
  }

  /** Runs the whole connection: handshake, transmission, clean-up. Never rejects. */
  async serve(): Promise<void> {
    if (this.verbose) this.log(`connected from ${this.peer}`);
    try {
      const timeoutMs = this.server.handshakeTimeoutMs;
      const timer = timeoutMs > 0
        ? setTimeout(() => {
          this.log(`handshake not finished after ${timeoutMs / 1000} s: closing`);
          this.closing = true;
          this.#upgrading?.detach?.().socket.destroy();
          this.#stream.close();
        }, timeoutMs)
        : undefined;
      let negotiated;
      try {
        negotiated = await negotiate(this);
      } finally {
        clearTimeout(timer);
      }
      if (negotiated) {
        this.#backend = negotiated.backend;
        this.info.exportName = negotiated.export.name;
        this.server.stats.noteExportSize(negotiated.export.name, negotiated.backend.size());
        this.info.features = [
          negotiated.extended
            ? "extended headers"
            : negotiated.structured
            ? "structured replies"
            : "simple replies",
          ...(negotiated.baseAllocation ? ["base:allocation"] : []),
          ...negotiated.contexts.map((c) => c.name),
        ];
        if (this.verbose) {
          this.log(
            `serving export "${negotiated.export.name}" (flags 0x${
              negotiated.flags.toString(16)
            }, ` +
              `${
                negotiated.extended
                  ? "extended headers"
                  : negotiated.structured
                  ? "structured replies"
                  : "simple replies"
              })`,
          );
        }
        this.#transmission = new Transmission(this, negotiated);
        await this.#transmission.run();
      }
      await this.writer.flush().catch(() => {});
    } catch (error) {
      // A peer that hangs up without a word (a port probe, a killed client) is not worth a log line.
      const code = (error as { code?: unknown })?.code;
      const hungUp = error instanceof Deno.errors.BrokenPipe ||
        error instanceof Deno.errors.ConnectionReset ||
        code === "EPIPE" || code === "ECONNRESET";
      if (!this.closing && (!hungUp || this.verbose)) {
        this.log(`closed: ${(error as Error).message}`);
      }
    } finally {
      if (this.#backend) {
        const backend = this.#backend;
        this.#backend = undefined;
        await backend.close().catch((e) =>
          this.log(`closing the export failed: ${(e as Error).message}`)
        );
      }
      this.#stream.close();
      this.server.stats.close(this.id);
      if (this.verbose) this.log("disconnected");
    }
  }

  /**
   * Stops the connection for a server shutdown: requests in flight finish
   * and their replies are sent, written data is flushed, then the stream is
   * closed (which ends the request loop).
   */
  async shutdown(): Promise<void> {
    this.closing = true;
    this.#upgrading?.detach?.().socket.destroy();
    const transmission = this.#transmission;
    if (transmission) {
      // Bounded: a backend that never answers (a silent upstream) must not
      // hold the server up; what is unanswered after the grace is dropped.
      const deadline = Date.now() + GRACE_MS;
      const left = () => Math.max(0, deadline - Date.now());
      await within(left(), transmission.idle());
      await within(left(), this.writer.flush().catch(() => {}));
      const backend = this.#backend;
      if (backend?.capabilities().flush) await within(left(), backend.flush().catch(() => {}));
    }
    this.#stream.close();
  }
}
