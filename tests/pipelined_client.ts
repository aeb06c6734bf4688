/**
 * A minimal pipelined NBD driver for load, fuzz and durability tests: many
 * READ/WRITE/FLUSH requests in flight on one connection, replies matched by
 * cookie, and strict checking of every reply it receives. It is a test
 * instrument, not a client library: no TLS, no reconnection, no block status.
 *
 * @module
 */

import * as C from "../protocol/constants.ts";
import { getU64 } from "../protocol/handshake.ts";
import { encodeRequest } from "../protocol/transmission.ts";
import type { BufferedReader } from "../io/buffered_reader.ts";
import { CorkedWriter } from "../io/corked_writer.ts";
import { RawClient } from "./raw_client.ts";

/** The server answered a request with an error. */
export class NbdReplyError extends Error {
  /** The NBD error number. */
  readonly errno: number;
  /** Creates the error for a command and errno. */
  constructor(command: string, errno: number) {
    super(`${command} failed with ${C.errnoName(errno)} (${errno})`);
    this.name = "NbdReplyError";
    this.errno = errno;
  }
}

/** The server broke the protocol or the connection ended with requests outstanding. */
export class DriverError extends Error {
  /** Creates the error. */
  constructor(message: string) {
    super(message);
    this.name = "DriverError";
  }
}

/** How to negotiate. */
export interface PipelinedClientOptions {
  /** Export name (default ""). */
  exportName?: string;
  /** Negotiate structured replies (default true). */
  structured?: boolean;
  /** Negotiate extended headers (default false). */
  extended?: boolean;
}

interface Pending {
  type: number;
  offset: number;
  buf?: Uint8Array;
  covered: number;
  errno: number;
  resolve(): void;
  reject(error: Error): void;
}

/** One connection with requests pipelined over it. */
export class PipelinedClient {
  /** Export size. */
  readonly size: number;
  /** Transmission flags. */
  readonly flags: number;
  readonly #raw: RawClient;
  readonly #reader: BufferedReader;
  readonly #writer: CorkedWriter;
  readonly #extended: boolean;
  readonly #pending = new Map<number, Pending>();
  #nextCookie = 1;
  #idleWaiters: Array<() => void> = [];
  #failure: Error | undefined;
  #closing = false;
  /** Resolves when the reply loop ends (EOF, error or close). */
  readonly done: Promise<void>;

  private constructor(raw: RawClient, size: number, flags: number, extended: boolean) {
    this.#raw = raw;
    this.#reader = raw.reader;
    this.#writer = new CorkedWriter(raw.conn);
    this.#extended = extended;
    this.size = size;
    this.flags = flags;
    this.done = this.#replyLoop();
  }

  /** Connects to a Unix socket and negotiates with NBD_OPT_GO. */
  static async connect(
    path: string,
    options: PipelinedClientOptions = {},
  ): Promise<PipelinedClient> {
    const raw = await RawClient.connect(path);
    try {
      await raw.start();
      const extended = options.extended ?? false;
      const { size, flags } = await raw.go(options.exportName ?? "", {
        structured: options.structured ?? true,
        extended,
      });
      return new PipelinedClient(raw, size, flags, extended);
    } catch (error) {
      raw.close();
      throw error;
    }
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.#pending.size;
  }

  /** Reads `length` bytes at `offset`. */
  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = new Uint8Array(length);
    await this.#submit(C.NBD_CMD_READ, 0, offset, length, undefined, buf);
    return buf;
  }

  /** Writes `data` at `offset`, optionally with FUA. */
  write(data: Uint8Array, offset: number, fua = false): Promise<void> {
    return this.#submit(C.NBD_CMD_WRITE, fua ? C.NBD_CMD_FLAG_FUA : 0, offset, data.length, data);
  }

  /** Writes zeroes over `length` bytes at `offset` (NO_HOLE unless `mayTrim`). */
  zero(offset: number, length: number, mayTrim = true): Promise<void> {
    return this.#submit(
      C.NBD_CMD_WRITE_ZEROES,
      mayTrim ? 0 : C.NBD_CMD_FLAG_NO_HOLE,
      offset,
      length,
    );
  }

  /** Flushes the export. */
  flush(): Promise<void> {
    return this.#submit(C.NBD_CMD_FLUSH, 0, 0, 0);
  }

  /** Resolves once no request is in flight. */
  idle(): Promise<void> {
    if (this.#pending.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /** Sends NBD_CMD_DISC once nothing is in flight, then waits for the server to hang up. */
  async disconnect(): Promise<void> {
    await this.idle();
    this.#closing = true;
    const out = new Uint8Array(this.#extended ? 32 : 28);
    encodeRequest(new DataView(out.buffer), 0, this.#extended, {
      flags: 0,
      type: C.NBD_CMD_DISC,
      cookieHi: 0,
      cookieLo: 0,
      offset: 0,
      length: 0,
    });
    this.#writer.write(out);
    await this.#writer.flush().catch(() => {});
    await this.done;
    this.#raw.close();
  }

  /** Closes the socket at once; requests in flight fail. */
  close(): void {
    this.#closing = true;
    this.#raw.close();
  }

  #submit(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Uint8Array,
    buf?: Uint8Array,
  ): Promise<void> {
    if (this.#failure) return Promise.reject(this.#failure);
    const cookie = this.#nextCookie;
    this.#nextCookie = this.#nextCookie >= 0xffffffff ? 1 : this.#nextCookie + 1;
    const extended = this.#extended;
    if (extended && payload) flags |= C.NBD_CMD_FLAG_PAYLOAD_LEN;
    const header = new Uint8Array(extended ? 32 : 28);
    encodeRequest(new DataView(header.buffer), 0, extended, {
      flags,
      type,
      cookieHi: 0,
      cookieLo: cookie,
      offset,
      length,
    });
    return new Promise<void>((resolve, reject) => {
      this.#pending.set(cookie, { type, offset, buf, covered: 0, errno: 0, resolve, reject });
      if (payload) this.#writer.write(header, payload);
      else this.#writer.write(header);
    });
  }

  #complete(cookie: number, p: Pending): void {
    this.#pending.delete(cookie);
    this.#wakeIdle();
    if (p.errno !== 0) {
      p.reject(new NbdReplyError(C.commandName(p.type), p.errno));
      return;
    }
    if (p.buf && p.covered !== p.buf.length) {
      this.#fail(`READ reply covered ${p.covered} of ${p.buf.length} bytes`);
      p.reject(this.#failure!);
      return;
    }
    p.resolve();
  }

  #fail(message: string): void {
    this.#failure ??= new DriverError(message);
  }

  #wakeIdle(): void {
    if (this.#pending.size > 0 || this.#idleWaiters.length === 0) return;
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const wake of waiters) wake();
  }

  #lookup(cookie: number): Pending {
    const p = this.#pending.get(cookie);
    if (!p) throw new DriverError(`reply for unknown cookie ${cookie}`);
    return p;
  }

  async #replyLoop(): Promise<void> {
    const r = this.#reader;
    try {
      while (true) {
        if (!(await r.ensure(4, "a reply"))) break;
        const magic = r.view.getUint32(r.position);
        if (magic === C.NBD_SIMPLE_REPLY_MAGIC) {
          await r.ensure(16, "a simple reply");
          const errno = r.view.getUint32(r.position + 4);
          const cookie = r.view.getUint32(r.position + 12);
          r.consume(16);
          const p = this.#lookup(cookie);
          p.errno = errno;
          if (errno === 0 && p.buf) {
            await r.readInto(p.buf, "READ data");
            p.covered = p.buf.length;
          }
          this.#complete(cookie, p);
          continue;
        }
        let flags: number, type: number, cookie: number, length: number;
        if (magic === C.NBD_STRUCTURED_REPLY_MAGIC && !this.#extended) {
          await r.ensure(20, "a reply chunk");
          flags = r.view.getUint16(r.position + 4);
          type = r.view.getUint16(r.position + 6);
          cookie = r.view.getUint32(r.position + 12);
          length = r.view.getUint32(r.position + 16);
          r.consume(20);
        } else if (magic === C.NBD_EXTENDED_REPLY_MAGIC && this.#extended) {
          await r.ensure(32, "a reply chunk");
          flags = r.view.getUint16(r.position + 4);
          type = r.view.getUint16(r.position + 6);
          cookie = r.view.getUint32(r.position + 12);
          length = getU64(r.view, r.position + 24);
          r.consume(32);
        } else {
          throw new DriverError(`unexpected reply magic 0x${magic.toString(16)}`);
        }
        const p = this.#lookup(cookie);
        await this.#chunk(p, type, length);
        if (flags & C.NBD_REPLY_FLAG_DONE) this.#complete(cookie, p);
      }
      if (this.#pending.size > 0 || !this.#closing) {
        this.#fail(
          `the server closed the connection with ${this.#pending.size} requests in flight`,
        );
      }
    } catch (error) {
      if (this.#closing && this.#pending.size === 0) return;
      this.#fail(error instanceof Error ? error.message : String(error));
    } finally {
      const failure = this.#failure ?? new DriverError("connection closed");
      for (const p of this.#pending.values()) p.reject(failure);
      this.#pending.clear();
      this.#wakeIdle();
    }
  }

  async #chunk(p: Pending, type: number, length: number): Promise<void> {
    const r = this.#reader;
    if (type & C.NBD_REPLY_TYPE_ERROR_BIT) {
      if (length < 6) throw new DriverError("error chunk shorter than 6 bytes");
      await r.ensure(4, "an error chunk");
      p.errno = r.view.getUint32(r.position) || C.NBD_EIO;
      r.consume(4);
      await r.skip(length - 4, "an error chunk");
      return;
    }
    switch (type) {
      case C.NBD_REPLY_TYPE_NONE:
        if (length !== 0) throw new DriverError("NONE chunk with a payload");
        return;
      case C.NBD_REPLY_TYPE_OFFSET_DATA:
      case C.NBD_REPLY_TYPE_OFFSET_HOLE: {
        const hole = type === C.NBD_REPLY_TYPE_OFFSET_HOLE;
        if (!p.buf || length < (hole ? 12 : 9) || (hole && length !== 12)) {
          throw new DriverError(`bad ${hole ? "hole" : "data"} chunk of ${length} bytes`);
        }
        await r.ensure(hole ? 12 : 8, "a read chunk");
        const at = getU64(r.view, r.position) - p.offset;
        const n = hole ? r.view.getUint32(r.position + 8) : length - 8;
        r.consume(hole ? 12 : 8);
        if (at < 0 || n === 0 || at + n > p.buf.length) {
          throw new DriverError(`read chunk ${at}+${n} outside the request`);
        }
        if (hole) p.buf.fill(0, at, at + n);
        else await r.readInto(p.buf.subarray(at, at + n), "READ data");
        p.covered += n;
        return;
      }
      default:
        throw new DriverError(`unexpected chunk type ${type}`);
    }
  }
}
