/**
 * The transmission phase on the server: a request loop that parses every
 * buffered request, runs them concurrently (bounded), and sends replies in
 * completion order through the connection's corked writer.
 *
 * @module
 */

import {
  commandName,
  errnoName,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_PAYLOAD_LEN,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_FLAG_BLOCK_STATUS_PAYLOAD,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
} from "../protocol/constants.ts";
import { NbdError, toWireErrno } from "../protocol/errors.ts";
import { getU64, setU64 } from "../protocol/handshake.ts";
import {
  chunkHeaderSize,
  COMPACT_REQUEST_SIZE,
  decodeRequest,
  encodeBlockStatusPayload,
  encodeErrorPayload,
  EXTENDED_REQUEST_SIZE,
  type Extent,
  type RequestHeader,
  SIMPLE_REPLY_SIZE,
  writeChunkHeader,
  writeSimpleReply,
} from "../protocol/transmission.ts";
import { UnexpectedEofError } from "../io/buffered_reader.ts";
import type { Backend, Capabilities, FileRange, ReadSegment } from "../core/backend.ts";
import { ZERO_BUFFER } from "../util/zero_buffer.ts";
import type { ConnectionContext } from "./context.ts";
import type { IoCounters } from "./stats.ts";
import { BASE_ALLOCATION_ID, type MetaContext, type Negotiated } from "./negotiate.ts";
import { PayloadPool } from "./payload_pool.ts";

/**
 * READ replies at least this large go out in writes of their own: copying
 * one into the writer's staging buffer to save a system call costs more
 * than the call (docs/performance.md).
 */
const WHOLE_REPLY = 64 * 1024;

/**
 * WRITE payloads at least this large are spliced from the socket into the
 * file where the backend offers one (`writeTarget`): below it the pair of
 * splice calls costs more than the copy it saves.
 */
const SPLICE_PAYLOAD = 64 * 1024;
/** Payload bytes that are not spliced are received in pieces of up to this size. */
const SPLICE_SCRATCH = 256 * 1024;
/** A WRITE payload beyond twice the accepted maximum is not drained: the connection is dropped. */
const HARD_PAYLOAD_FACTOR = 2;
/** Zero runs at least this long become OFFSET_HOLE chunks in structured READ replies. */
const MIN_HOLE_CHUNK = 4096;
/** At most this many descriptors in one block-status reply. */
const MAX_EXTENTS = 1 << 20;
/** WRITE payload and READ reply bytes in flight on one connection before the loop waits. */
export const MAX_IN_FLIGHT_BYTES = 256 * 1024 * 1024;

/** Runs the transmission phase until the client disconnects or the server stops it. */
export class Transmission {
  readonly #conn: ConnectionContext;
  readonly #backend: Backend;
  readonly #caps: Capabilities;
  readonly #size: number;
  readonly #flags: number;
  readonly #structured: boolean;
  readonly #extended: boolean;
  readonly #baseAllocation: boolean;
  /** Other metadata contexts negotiated. */
  readonly #contexts: MetaContext[];
  /** Context ids chosen by a BLOCK_STATUS payload, per request (absent = all negotiated). */
  readonly #chosenContexts = new WeakMap<RequestHeader, number[]>();
  readonly #maxInFlight: number;
  readonly #maxRequest: number;
  readonly #counters: IoCounters;
  /** The backend's ranges in files, where READ replies can be sent from them (plain sockets). */
  readonly #fileRange: ((offset: number, length: number) => FileRange | undefined) | undefined;
  /** The backend's files that WRITE payloads can be spliced into (plain sockets, no filters). */
  readonly #writeTarget: ((offset: number, length: number) => FileRange | undefined) | undefined;
  /** Where payload bytes that cannot be spliced are received before `pwrite`. */
  #spliceScratch: Uint8Array | undefined;
  #idleTimer: ReturnType<typeof setTimeout> | undefined;
  #inFlight = 0;
  #inFlightBytes = 0;
  readonly #payloads = new PayloadPool();
  /** READ reply buffers (header and data), given back once written to the socket. */
  readonly #replies = new PayloadPool();
  #slotWaiter: (() => void) | undefined;
  #idleWaiters: Array<() => void> = [];

  /** Prepares transmission for a negotiated export. */
  constructor(conn: ConnectionContext, negotiated: Negotiated) {
    this.#conn = conn;
    this.#backend = negotiated.backend;
    this.#caps = negotiated.backend.capabilities();
    this.#size = negotiated.backend.size();
    this.#flags = negotiated.flags;
    this.#structured = negotiated.structured || negotiated.extended;
    this.#extended = negotiated.extended;
    this.#baseAllocation = negotiated.baseAllocation;
    this.#contexts = negotiated.contexts;
    this.#maxInFlight = Math.max(1, conn.server.maxInFlight);
    this.#maxRequest = conn.server.maxRequest;
    this.#counters = conn.server.stats.exportCounters(negotiated.export.name);
    const backend = negotiated.backend;
    this.#fileRange = backend.fileRange && !conn.tls && conn.writer.sendsFiles
      ? (offset, length) => backend.fileRange!(offset, length)
      : undefined;
    this.#writeTarget = backend.writeTarget && !conn.tls && conn.reader.splices
      ? (offset, length) => backend.writeTarget!(offset, length)
      : undefined;
  }

  /** Requests currently being processed. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Resolves when no request is in flight. */
  idle(): Promise<void> {
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /** The request loop. Resolves when the connection is done; in-flight requests have finished. */
  async run(): Promise<void> {
    const conn = this.#conn;
    const headerSize = this.#extended ? EXTENDED_REQUEST_SIZE : COMPACT_REQUEST_SIZE;
    try {
      while (true) {
        if (this.#inFlight >= this.#maxInFlight) {
          if (conn.verbose) conn.log(`${this.#inFlight} requests in flight: reading no more yet`);
          conn.writer.uncork();
          await this.#slot();
        }
        if (conn.writer.full) await conn.writer.drain();
        if (conn.writer.error !== undefined) break;
        const reader = conn.reader;
        this.#armIdleTimer();
        // Replies to the requests already received go out together, once the
        // loop has to wait for the client: one write and one wake-up of the
        // client for the batch, not one per reply.
        if (reader.buffered < headerSize) conn.writer.uncork();
        if (!(await reader.ensure(headerSize, "a request header"))) break;
        conn.writer.cork();
        const request = decodeRequest(reader.view, reader.position, this.#extended);
        if (!request) {
          conn.log(
            `request with a bad magic 0x${
              reader.view.getUint32(reader.position).toString(16)
            }: closing`,
          );
          break;
        }
        reader.consume(headerSize);
        if (request.type === NBD_CMD_DISC) {
          if (conn.verbose) conn.log("DISC");
          break;
        }
        if (!(await this.#accept(request))) break;
      }
    } catch (error) {
      if (error instanceof UnexpectedEofError) conn.log(error.message);
      else if (!conn.closing) conn.log(`connection error: ${(error as Error).message}`);
    }
    conn.writer.uncork();
    clearTimeout(this.#idleTimer);
    await this.idle();
  }

  /** (Re)starts the idle timer: it fires only when no request is in flight. */
  #armIdleTimer(): void {
    const ms = this.#conn.server.idleTimeoutMs;
    if (ms <= 0) return;
    clearTimeout(this.#idleTimer);
    this.#idleTimer = setTimeout(() => {
      if (this.#inFlight > 0) return this.#armIdleTimer();
      this.#conn.log(`idle for ${ms / 1000} s: closing`);
      this.#conn.abort();
    }, ms);
  }

  /** Reads the payload of a request, validates it and starts it. Returns false to close. */
  async #accept(request: RequestHeader): Promise<boolean> {
    const conn = this.#conn;
    let payloadLength = 0;
    if (this.#extended) {
      if (request.flags & NBD_CMD_FLAG_PAYLOAD_LEN) payloadLength = request.length;
      else if (request.type === NBD_CMD_WRITE) {
        conn.log("extended WRITE without NBD_CMD_FLAG_PAYLOAD_LEN: closing");
        return false;
      }
    } else if (request.type === NBD_CMD_WRITE) {
      payloadLength = request.length;
    }
    if (
      payloadLength > HARD_PAYLOAD_FACTOR * this.#maxRequest || !Number.isSafeInteger(payloadLength)
    ) {
      conn.log(`${commandName(request.type)} with a ${payloadLength}-byte payload: closing`);
      return false;
    }

    let failure = this.#validate(request, payloadLength);
    if (conn.server.shuttingDown && !failure) {
      failure = [NBD_ESHUTDOWN, "the server is shutting down"];
    }
    // A READ's reply buffer counts like a WRITE's payload: a client that
    // pipelines big READs and never reads the replies must not make the
    // server allocate maxInFlight times maxRequest bytes.
    const cost = failure ? 0 : payloadLength + (request.type === NBD_CMD_READ ? request.length : 0);
    while (cost > 0 && this.#inFlight > 0 && this.#inFlightBytes + cost > MAX_IN_FLIGHT_BYTES) {
      if (conn.verbose) {
        conn.log(`${this.#inFlightBytes} bytes of requests in flight: reading no more yet`);
      }
      conn.writer.uncork();
      await this.#slot();
    }
    // A payload not yet received means waiting for the client: let the replies go first.
    if (payloadLength > conn.reader.buffered) conn.writer.uncork();
    let payload: Uint8Array | undefined;
    let inPlace = false;
    /** Why a WRITE received into its file failed, if it did. */
    let writeFailure: unknown;
    if (payloadLength > 0) {
      const write = !failure && request.type === NBD_CMD_WRITE;
      const views = write ? this.#writeViews(request.offset, payloadLength) : undefined;
      const target = write && !views && payloadLength >= SPLICE_PAYLOAD &&
          (request.flags & NBD_CMD_FLAG_FUA) === 0
        ? this.#writeTarget?.(request.offset, payloadLength)
        : undefined;
      if (failure) {
        await conn.reader.skip(payloadLength, "a request payload");
      } else if (target) {
        this.#spliceScratch ??= new Uint8Array(SPLICE_SCRATCH);
        const backend = this.#backend;
        writeFailure = await conn.reader.receiveToFile(
          target.fd,
          target.offset,
          payloadLength,
          (buf, at) => backend.pwrite(buf, at - target.offset + request.offset, { fua: false }),
          this.#spliceScratch,
          "a request payload",
        );
        inPlace = true;
      } else if (views) {
        // Straight into the store: no payload buffer, no second copy.
        for (const view of views) await conn.reader.readInto(view, "a request payload");
        inPlace = true;
      } else {
        payload = request.type === NBD_CMD_WRITE
          ? this.#payloads.take(payloadLength)
          : new Uint8Array(payloadLength);
        await conn.reader.readInto(payload, "a request payload");
        if (request.type === NBD_CMD_BLOCK_STATUS) {
          failure = this.#blockStatusPayload(request, payload);
          payload = undefined;
        }
      }
    }
    const stats = conn.server.stats;
    const startedAt = stats.start(conn.info, this.#counters, request.type);
    if (failure) {
      if (conn.verbose) this.#logRequest(request, failure[0], failure[1]);
      this.#sendError(request, failure[0], failure[1]);
      stats.finish(
        conn.info,
        this.#counters,
        request.type,
        request.offset,
        request.length,
        false,
        startedAt,
      );
      return true;
    }
    this.#inFlight++;
    this.#inFlightBytes += cost;
    this.#execute(request, payload, inPlace, writeFailure).then((ok) => {
      // Only a write that succeeded is known to have let go of its buffer.
      if (ok && payload && request.type === NBD_CMD_WRITE) this.#payloads.give(payload);
      stats.finish(
        conn.info,
        this.#counters,
        request.type,
        request.offset,
        request.length,
        ok,
        startedAt,
      );
      this.#done(cost);
    });
    return true;
  }

  /** Where a WRITE's payload can be received in place, if the backend offers it. */
  #writeViews(offset: number, length: number): Uint8Array[] | undefined {
    try {
      return this.#backend.writeView?.(offset, length);
    } catch {
      // pwrite reports whatever is wrong, as a reply.
      return undefined;
    }
  }

  /** Applies the BLOCK_STATUS payload (extended headers): effect length plus context ids. */
  #blockStatusPayload(request: RequestHeader, payload: Uint8Array): [number, string] | undefined {
    if (payload.length < 8 || (payload.length - 8) % 4 !== 0) {
      return [NBD_EINVAL, "BLOCK_STATUS payload must be 8 + 4n bytes"];
    }
    const view = new DataView(payload.buffer);
    request.length = getU64(view, 0);
    const ids: number[] = [];
    for (let pos = 8; pos < payload.length; pos += 4) {
      const id = view.getUint32(pos);
      const known = id === BASE_ALLOCATION_ID
        ? this.#baseAllocation
        : this.#contexts.some((c) => c.id === id);
      if (!known || ids.includes(id)) {
        return [NBD_EINVAL, "BLOCK_STATUS payload names an unknown or repeated context"];
      }
      ids.push(id);
    }
    if (ids.length === 0) return [NBD_EINVAL, "BLOCK_STATUS payload names no context"];
    this.#chosenContexts.set(request, ids);
    return this.#validateRange(request);
  }

  /** Checks a request against the negotiated flags and the export; returns [errno, message] on failure. */
  #validate(request: RequestHeader, payloadLength: number): [number, string] | undefined {
    const flags = this.#flags;
    const { type } = request;
    let allowed = flags & NBD_FLAG_SEND_FUA ? NBD_CMD_FLAG_FUA : 0;
    switch (type) {
      case NBD_CMD_READ:
        if (flags & NBD_FLAG_SEND_DF) allowed |= NBD_CMD_FLAG_DF;
        break;
      case NBD_CMD_WRITE:
        if (this.#extended) allowed |= NBD_CMD_FLAG_PAYLOAD_LEN;
        break;
      case NBD_CMD_WRITE_ZEROES:
        allowed |= NBD_CMD_FLAG_NO_HOLE;
        if (flags & NBD_FLAG_SEND_FAST_ZERO) allowed |= NBD_CMD_FLAG_FAST_ZERO;
        break;
      case NBD_CMD_BLOCK_STATUS:
        allowed |= NBD_CMD_FLAG_REQ_ONE;
        if (flags & NBD_FLAG_BLOCK_STATUS_PAYLOAD) allowed |= NBD_CMD_FLAG_PAYLOAD_LEN;
        break;
      case NBD_CMD_FLUSH:
      case NBD_CMD_TRIM:
      case NBD_CMD_CACHE:
        break;
      default:
        return [NBD_EINVAL, `unknown command ${type}`];
    }
    if (request.flags & ~allowed) {
      return [
        NBD_EINVAL,
        `unsupported flags 0x${request.flags.toString(16)} for ${commandName(type)}`,
      ];
    }
    if (payloadLength > 0 && type !== NBD_CMD_WRITE && type !== NBD_CMD_BLOCK_STATUS) {
      return [NBD_EINVAL, `${commandName(type)} takes no payload`];
    }
    const readOnly = (flags & NBD_FLAG_READ_ONLY) !== 0;
    switch (type) {
      case NBD_CMD_WRITE:
        if (readOnly) return [NBD_EPERM, "the export is read-only"];
        break;
      case NBD_CMD_TRIM:
        if (readOnly) return [NBD_EPERM, "the export is read-only"];
        if (!(flags & NBD_FLAG_SEND_TRIM)) {
          return [NBD_EINVAL, "TRIM is not supported by this export"];
        }
        break;
      case NBD_CMD_WRITE_ZEROES:
        if (readOnly) return [NBD_EPERM, "the export is read-only"];
        if (!(flags & NBD_FLAG_SEND_WRITE_ZEROES)) {
          return [NBD_EINVAL, "WRITE_ZEROES is not supported by this export"];
        }
        break;
      case NBD_CMD_FLUSH:
        if (!(flags & NBD_FLAG_SEND_FLUSH)) {
          return [NBD_EINVAL, "FLUSH is not supported by this export"];
        }
        if (request.offset !== 0 || request.length !== 0) {
          return [NBD_EINVAL, "FLUSH must have offset and length 0"];
        }
        return undefined;
      case NBD_CMD_CACHE:
        if (!(flags & NBD_FLAG_SEND_CACHE)) {
          return [NBD_EINVAL, "CACHE is not supported by this export"];
        }
        break;
      case NBD_CMD_BLOCK_STATUS:
        if (!this.#baseAllocation && this.#contexts.length === 0) {
          return [NBD_EINVAL, "no metadata context was negotiated for this export"];
        }
        if (request.flags & NBD_CMD_FLAG_PAYLOAD_LEN) {
          // The range is checked once the payload is read; without one there is no effect length.
          return payloadLength > 0 ? undefined : [NBD_EINVAL, "BLOCK_STATUS payload is empty"];
        }
        break;
    }
    return this.#validateRange(request);
  }

  #validateRange(request: RequestHeader): [number, string] | undefined {
    const { type, offset, length } = request;
    if (length === 0) return [NBD_EINVAL, `zero-length ${commandName(type)}`];
    const pastEnd = !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) ||
      offset + length > this.#size;
    if (pastEnd) {
      const errno = type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES
        ? NBD_ENOSPC
        : NBD_EINVAL;
      return [errno, `${commandName(type)} beyond the end of the export (size ${this.#size})`];
    }
    const minimum = this.#caps.blockSize.minimum;
    if (
      minimum > 1 &&
      (offset % minimum !== 0 || (length % minimum !== 0 && offset + length !== this.#size))
    ) {
      return [
        NBD_EINVAL,
        `${commandName(type)} is not aligned to the ${minimum}-byte minimum block size`,
      ];
    }
    if ((type === NBD_CMD_READ || type === NBD_CMD_WRITE) && length > this.#maxRequest) {
      return [
        NBD_EINVAL,
        `${commandName(type)} of ${length} bytes is larger than ${this.#maxRequest}`,
      ];
    }
    return undefined;
  }

  /**
   * Runs a validated request and sends its reply; resolves to whether it
   * succeeded. Never rejects. A WRITE `received` in place is already done
   * (or failed with `receiveFailure`).
   */
  async #execute(
    request: RequestHeader,
    payload: Uint8Array | undefined,
    received = false,
    receiveFailure?: unknown,
  ): Promise<boolean> {
    const backend = this.#backend;
    const { offset, length } = request;
    const fua = (request.flags & NBD_CMD_FLAG_FUA) !== 0;
    try {
      switch (request.type) {
        case NBD_CMD_READ:
          await this.#read(request);
          break;
        case NBD_CMD_WRITE:
          if (receiveFailure !== undefined) throw receiveFailure;
          if (!received) await backend.pwrite(payload!, offset, { fua });
          this.#sendOk(request);
          break;
        case NBD_CMD_FLUSH:
          await backend.flush();
          this.#sendOk(request);
          break;
        case NBD_CMD_TRIM:
          await backend.trim(offset, length, { fua });
          this.#sendOk(request);
          break;
        case NBD_CMD_CACHE:
          await backend.cache(offset, length);
          this.#sendOk(request);
          break;
        case NBD_CMD_WRITE_ZEROES:
          await backend.zero(offset, length, {
            fua,
            mayTrim: (request.flags & NBD_CMD_FLAG_NO_HOLE) === 0,
            fast: (request.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0,
          });
          this.#sendOk(request);
          break;
        case NBD_CMD_BLOCK_STATUS:
          await this.#blockStatus(request);
          break;
      }
      if (this.#conn.verbose) this.#logRequest(request, 0);
      return true;
    } catch (error) {
      const [errno, message] = this.#failureOf(request, error);
      if (this.#conn.verbose) this.#logRequest(request, errno, message);
      this.#sendError(request, errno, message);
      return false;
    }
  }

  /** The errno and message a failed request is answered with; unexpected errors are logged. */
  #failureOf(request: RequestHeader, error: unknown): [number, string] {
    const errno = toWireErrno(error);
    if (!(error instanceof NbdError)) {
      this.#conn.log(`${commandName(request.type)} failed: ${(error as Error)?.stack ?? error}`);
    }
    const message = error instanceof NbdError
      ? error.detail
      : error instanceof Error
      ? error.message
      : String(error);
    return [errno, message];
  }

  #done(cost: number): void {
    this.#inFlight--;
    this.#inFlightBytes -= cost;
    const waiter = this.#slotWaiter;
    this.#slotWaiter = undefined;
    waiter?.();
    if (this.#inFlight === 0 && this.#idleWaiters.length > 0) {
      const waiters = this.#idleWaiters;
      this.#idleWaiters = [];
      for (const wake of waiters) wake();
    }
  }

  #slot(): Promise<void> {
    return new Promise((resolve) => this.#slotWaiter = resolve);
  }

  #logRequest(request: RequestHeader, errno: number, message?: string): void {
    const flags = request.flags ? ` flags=0x${request.flags.toString(16)}` : "";
    const result = errno === 0 ? "ok" : `${errnoName(errno)}${message ? ` (${message})` : ""}`;
    this.#conn.log(
      `${
        commandName(request.type)
      } offset=${request.offset} length=${request.length}${flags} → ${result}`,
    );
  }

  #sendOk(request: RequestHeader): void {
    if (this.#extended) {
      const out = new Uint8Array(chunkHeaderSize(true));
      writeChunkHeader(
        new DataView(out.buffer),
        0,
        true,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_NONE,
        request,
        0,
      );
      this.#conn.writer.write(out);
      return;
    }
    const out = new Uint8Array(SIMPLE_REPLY_SIZE);
    writeSimpleReply(new DataView(out.buffer), 0, 0, request.cookieHi, request.cookieLo);
    this.#conn.writer.write(out);
  }

  #sendError(request: RequestHeader, errno: number, message: string): void {
    if (errno === 0) errno = NBD_EIO;
    if (this.#structured) {
      const payload = encodeErrorPayload(errno, message);
      const header = chunkHeaderSize(this.#extended);
      const out = new Uint8Array(header + payload.length);
      writeChunkHeader(
        new DataView(out.buffer),
        0,
        this.#extended,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        request,
        payload.length,
      );
      out.set(payload, header);
      this.#conn.writer.write(out);
      return;
    }
    const out = new Uint8Array(SIMPLE_REPLY_SIZE);
    writeSimpleReply(new DataView(out.buffer), 0, errno, request.cookieHi, request.cookieLo);
    this.#conn.writer.write(out);
  }

  async #read(request: RequestHeader): Promise<void> {
    const { offset, length } = request;
    const segments = this.#backend.readView?.(offset, length);
    if (segments) {
      this.#sendSegments(request, segments);
      return;
    }
    const header = this.#structured ? chunkHeaderSize(this.#extended) + 8 : SIMPLE_REPLY_SIZE;
    // Large replies whose data is in the page cache go straight from there to the socket.
    const range = length >= WHOLE_REPLY ? this.#fileRange?.(offset, length) : undefined;
    if (range) {
      const out = new Uint8Array(header);
      this.#writeReadHeader(out, request);
      this.#conn.writer.writeFile(out, range.fd, range.offset, length);
      return;
    }
    // One buffer holds the reply header and the data, so one write sends both.
    // Zeroed, as a new buffer would be, so that a backend that leaves part of it alone
    // sends zeroes, never an earlier reply's data; unless the backend fills it all.
    const out = this.#replies.take(header + length, this.#backend.preadFills !== true);
    await this.#backend.pread(out.subarray(header), offset);
    this.#writeReadHeader(out, request);
    this.#conn.writer.writeReleasing(out, () => this.#replies.give(out), {
      whole: out.length >= WHOLE_REPLY,
    });
  }

  /** Writes the header of a successful READ reply at the start of `out`. */
  #writeReadHeader(out: Uint8Array, request: RequestHeader): void {
    const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
    if (this.#structured) {
      const h = writeChunkHeader(
        view,
        0,
        this.#extended,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_OFFSET_DATA,
        request,
        8 + request.length,
      );
      setU64(view, h, request.offset);
    } else {
      writeSimpleReply(view, 0, 0, request.cookieHi, request.cookieLo);
    }
  }

  /** Sends a READ reply from zero-copy segments: views are written as they are, zero runs as holes. */
  #sendSegments(request: RequestHeader, segments: ReadSegment[]): void {
    const pieces: Uint8Array[] = [];
    const zeroes = (n: number) => {
      for (let left = n; left > 0; left -= ZERO_BUFFER.length) {
        pieces.push(left >= ZERO_BUFFER.length ? ZERO_BUFFER : ZERO_BUFFER.subarray(0, left));
      }
    };
    const addData = (segs: ReadSegment[]) => {
      for (const seg of segs) {
        if (typeof seg === "number") zeroes(seg);
        else pieces.push(seg);
      }
    };
    const df = (request.flags & NBD_CMD_FLAG_DF) !== 0;
    if (!this.#structured) {
      const header = new Uint8Array(SIMPLE_REPLY_SIZE);
      writeSimpleReply(new DataView(header.buffer), 0, 0, request.cookieHi, request.cookieLo);
      pieces.push(header);
      addData(segments);
      this.#conn.writer.write(...pieces);
      return;
    }
    // Group the segments into chunks: runs of data (small zero runs included) and long holes.
    type Chunk = { hole: boolean; offset: number; length: number; segs: ReadSegment[] };
    const chunks: Chunk[] = [];
    let pos = request.offset;
    for (const seg of segments) {
      const n = typeof seg === "number" ? seg : seg.length;
      if (n === 0) continue;
      const hole = typeof seg === "number" && n >= MIN_HOLE_CHUNK && !df;
      const last = chunks[chunks.length - 1];
      if (last && last.hole === hole) {
        last.length += n;
        last.segs.push(seg);
      } else {
        chunks.push({ hole, offset: pos, length: n, segs: [seg] });
      }
      pos += n;
    }
    const headerSize = chunkHeaderSize(this.#extended);
    chunks.forEach((chunk, i) => {
      const flags = i === chunks.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      const header = new Uint8Array(headerSize + (chunk.hole ? 12 : 8));
      const view = new DataView(header.buffer);
      if (chunk.hole) {
        writeChunkHeader(view, 0, this.#extended, flags, NBD_REPLY_TYPE_OFFSET_HOLE, request, 12);
        setU64(view, headerSize, chunk.offset);
        view.setUint32(headerSize + 8, chunk.length);
        pieces.push(header);
      } else {
        writeChunkHeader(
          view,
          0,
          this.#extended,
          flags,
          NBD_REPLY_TYPE_OFFSET_DATA,
          request,
          8 + chunk.length,
        );
        setU64(view, headerSize, chunk.offset);
        pieces.push(header);
        addData(chunk.segs);
      }
    });
    this.#conn.writer.write(...pieces);
  }

  async #blockStatus(request: RequestHeader): Promise<void> {
    const { offset, length } = request;
    const reqOne = (request.flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
    const chosen = this.#chosenContexts.get(request);
    const wanted = (id: number) => !chosen || chosen.includes(id);
    // Every context's answer is gathered first, so a failure sends only the error.
    const chunks: Uint8Array[] = [];
    if (this.#baseAllocation && wanted(BASE_ALLOCATION_ID)) {
      // Without extents the answer is known without asking: all of it is allocated data.
      const raw = this.#caps.extents
        ? await this.#backend.extents(offset, length, { reqOne })
        : [{ length, flags: 0 }];
      chunks.push(this.#statusPayload(BASE_ALLOCATION_ID, raw, length, reqOne, 3));
    }
    for (const context of this.#contexts) {
      if (!wanted(context.id)) continue;
      const raw = await this.#backend.contextExtents!(context.name, offset, length, { reqOne });
      chunks.push(this.#statusPayload(context.id, raw, length, reqOne, 0xffffffff));
    }
    const headerSize = chunkHeaderSize(this.#extended);
    chunks.forEach((payload, i) => {
      const header = new Uint8Array(headerSize);
      writeChunkHeader(
        new DataView(header.buffer),
        0,
        this.#extended,
        i === chunks.length - 1 ? NBD_REPLY_FLAG_DONE : 0,
        this.#extended ? NBD_REPLY_TYPE_BLOCK_STATUS_EXT : NBD_REPLY_TYPE_BLOCK_STATUS,
        request,
        payload.length,
      );
      this.#conn.writer.write(header, payload);
    });
  }

  /** One context's extents, normalised and encoded as a block-status payload. */
  #statusPayload(
    id: number,
    raw: Extent[],
    length: number,
    reqOne: boolean,
    mask: number,
  ): Uint8Array {
    // Normalise: drop empty extents, merge equal neighbours, stop at the end of the request.
    const extents: Extent[] = [];
    let covered = 0;
    for (const e of raw) {
      if (e.length <= 0) continue;
      const flags = (e.flags & mask) >>> 0;
      const take = Math.min(e.length, length - covered);
      const last = extents[extents.length - 1];
      if (last && last.flags === flags) last.length += take;
      else if (extents.length >= MAX_EXTENTS) break;
      else extents.push({ length: take, flags });
      covered += take;
      if (covered >= length) break;
    }
    if (extents.length === 0) throw new NbdError("EIO", "the backend returned no extents");
    if (reqOne) extents.length = 1;
    if (!this.#extended) {
      // Compact descriptors have 32-bit lengths.
      for (let i = 0; i < extents.length; i++) {
        if (extents[i]!.length > 0xffffffff) {
          extents[i]!.length = 0x100000000 - 4096;
          extents.length = i + 1;
        }
      }
    }
    return encodeBlockStatusPayload(id, extents, this.#extended);
  }
}
