/**
 * `NbdClient`: one connection in transmission. Requests are pipelined
 * (any number in flight, matched to replies by cookie); READ data is read
 * straight from the socket into the caller's buffer and holes are filled
 * with zeroes in place; large requests are split at the server's maximum
 * payload. The client also implements the server's `Backend` interface so
 * the nbd plugin, the proxy and copy can use it as a backend.
 *
 * @module
 */

import { type BufferedReader, UnexpectedEofError } from "../io/buffered_reader.ts";
import type { ByteStream } from "../io/byte_stream.ts";
import type { CorkedWriter } from "../io/corked_writer.ts";
import {
  BASE_ALLOCATION,
  commandName,
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
  NBD_ENOTSUP,
  NBD_EPERM,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_ROTATIONAL,
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
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
} from "../protocol/constants.ts";
import { ProtocolError } from "../protocol/errors.ts";
import { type BlockSize, getU64 } from "../protocol/handshake.ts";
import {
  COMPACT_REQUEST_SIZE,
  decodeBlockStatusPayload,
  decodeErrorPayload,
  decodeReplyHeader,
  encodeRequest,
  EXTENDED_REQUEST_SIZE,
  type Extent,
  isErrorChunk,
  replyHeaderSize,
  WRITE_HEADROOM,
} from "../protocol/transmission.ts";
import type { NbdUri } from "../protocol/uri.ts";
import type {
  Backend,
  Capabilities,
  ExtentsFlags,
  WriteFlags,
  ZeroFlags,
} from "../core/backend.ts";
import {
  describeRequest,
  NbdConnectionError,
  NbdRequestError,
  type RequestDescription,
} from "./errors.ts";
import type {
  ExportDetails,
  GoOptions,
  HandshakeOptions,
  HandshakeStyle,
  Negotiation,
} from "./handshake.ts";
import { NbdHandshake } from "./handshake.ts";
import { DEFAULT_BLOCK_SIZE } from "../core/backend.ts";
import { describeServer, seconds } from "./connect.ts";
import { GRACE_MS, terminationSignal } from "../util/signals.ts";

/** Largest READ/WRITE sent in one request, whatever the server advertises. */
const MAX_REQUEST_SIZE = 64 * 1024 * 1024;

/** Largest block-status chunk accepted (2^20 descriptors of the extended kind, plus slack). */
const MAX_STATUS_CHUNK = 16 * 1024 * 1024 + 64;
/** Largest error chunk accepted (a 4096-byte message plus fixed fields, with slack). */
const MAX_ERROR_CHUNK = 64 * 1024;

/** Options of a client in transmission. */
export interface ClientOptions {
  /**
   * Seconds a connection may leave its requests unanswered (counted from
   * the last reply, or from when it became busy) before it is declared
   * dead: the requests in flight fail with an `NbdTimeoutError` (EIO on
   * the wire, ETIMEDOUT as `code`) and later ones are refused. 0 or
   * undefined: wait as long as it takes.
   */
  requestTimeout?: number;
  /**
   * Once aborted, requests still in flight after `GRACE_MS` are abandoned
   * and the connection closed (default: the process's termination signal).
   */
  signal?: AbortSignal;
}

/** Options of `NbdClient.connect`: the handshake's, `go()`'s and the client's. */
export interface ConnectOptions extends HandshakeOptions, GoOptions, ClientOptions {}

/** A request got no reply within the request timeout (`code` is "ETIMEDOUT"). */
export class NbdTimeoutError extends NbdConnectionError {
  /** Always "ETIMEDOUT". */
  readonly code = "ETIMEDOUT";
  /** Creates the error. */
  constructor(message: string) {
    super(message);
    this.name = "NbdTimeoutError";
  }
}

/** Options of a read. */
export interface ReadOptions {
  /** Ask the server not to fragment the reply (NBD_CMD_FLAG_DF; needs `canDf`). */
  df?: boolean;
}

/** Options of a write, trim or flush. */
export interface WriteOptions {
  /** Force unit access: reply only once durable (needs `canFua`). */
  fua?: boolean;
  /**
   * For `pwrite`: the `WRITE_HEADROOM` bytes before `buf` in its buffer are
   * the client's to overwrite until the write completes, so the request
   * header is written there and header and data go to the socket as one
   * piece, without a copy. Writes in flight at the same time must not share
   * those bytes.
   */
  headroom?: boolean;
  /**
   * For `pwrite` with `headroom`: called once the request has been handed
   * to the socket, after which `buf` (and its headroom) may be reused while
   * the reply is awaited. Not called when the write is split or fails.
   */
  sent?: () => void;
}

export { WRITE_HEADROOM };

/** Options of a zero request; the names follow the `Backend` interface. */
export interface ZeroOptions extends WriteOptions {
  /** The server may punch a hole (default true); false sends NBD_CMD_FLAG_NO_HOLE. */
  mayTrim?: boolean;
  /** Fail with ENOTSUP unless zeroing is fast (NBD_CMD_FLAG_FAST_ZERO; needs `canFastZero`). */
  fast?: boolean;
}

/** Options of a block-status query. */
export interface BlockStatusOptions {
  /** Ask for one extent per context (NBD_CMD_FLAG_REQ_ONE). */
  reqOne?: boolean;
}

/** One extent with its position, as produced by `iterateExtents`. */
export interface MappedExtent {
  /** Offset of the extent. */
  offset: number;
  /** Length in bytes. */
  length: number;
  /** Status flags of the context (NBD_STATE_HOLE / NBD_STATE_ZERO for base:allocation). */
  flags: number;
}

/**
 * Waits for every part of a split request, then fails with the first error:
 * returning early would let the caller reuse a buffer that later parts are
 * still being read into.
 */
async function settleAll(parts: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(parts);
  for (const result of results) if (result.status === "rejected") throw result.reason;
}

/** A request waiting for its reply. */
class Pending {
  readonly type: number;
  readonly offset: number;
  readonly length: number;
  readonly buffer: Uint8Array | undefined;
  /** READ: bytes covered by data and hole chunks so far. */
  received = 0;
  /** First error the server reported (0 = none). */
  errno = 0;
  message: string | undefined;
  /** BLOCK_STATUS: extents by context id. */
  statuses: Map<number, Extent[]> | undefined;
  resolve!: () => void;
  reject!: (error: unknown) => void;
  readonly promise: Promise<void>;

  constructor(type: number, offset: number, length: number, buffer?: Uint8Array) {
    this.type = type;
    this.offset = offset;
    this.length = length;
    this.buffer = buffer;
    this.promise = new Promise<void>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
  }

  describe(): RequestDescription {
    return describeRequest(this.type, this.offset, this.length);
  }
}

/**
 * A connection to one export, in transmission.
 *
 * @example
 * ```ts
 * await using client = await NbdClient.connect("nbd+unix:///?socket=/tmp/s.sock");
 * const buf = new Uint8Array(4096);
 * await client.pread(buf, 0);
 * for await (const e of client.iterateExtents(0, client.size())) console.log(e);
 * ```
 */
export class NbdClient implements Backend, AsyncDisposable {
  readonly #stream: ByteStream;
  readonly #reader: BufferedReader;
  readonly #writer: CorkedWriter;
  readonly #uri: NbdUri;
  readonly #protocol: HandshakeStyle;
  readonly #structured: boolean;
  readonly #extended: boolean;
  readonly #tls: boolean;
  readonly #export: ExportDetails;
  readonly #contextIds: Map<number, string>;
  readonly #blockSize: BlockSize;
  readonly #splitSize: number;
  readonly #maxEffectLength: number;
  readonly #headerSize: number;
  readonly #inFlight = new Map<number, Pending>();
  #nextCookie = 1;
  #failure: Error | undefined;
  #closing = false;
  #closed: Promise<void> | undefined;
  #idleWaiters: Array<() => void> = [];
  readonly #receiving: Promise<void>;
  /** When the connection last went from idle to busy, and last received a reply. */
  #busySince = 0;
  #lastReply = 0;
  #watchdog: ReturnType<typeof setInterval> | undefined;
  readonly #signal: AbortSignal;
  #onAbort: (() => void) | undefined;

  /**
   * Takes over a negotiated connection. Use `NbdClient.connect` or
   * `NbdClient.fromHandshake` rather than calling this directly.
   */
  constructor(negotiation: Negotiation, options: ClientOptions = {}) {
    this.#stream = negotiation.stream;
    this.#reader = negotiation.reader;
    this.#writer = negotiation.writer;
    this.#uri = negotiation.uri;
    this.#protocol = negotiation.protocol;
    this.#structured = negotiation.structuredReplies || negotiation.extendedHeaders;
    this.#extended = negotiation.extendedHeaders;
    this.#tls = negotiation.tls;
    this.#export = negotiation.export;
    this.#contextIds = negotiation.metaContexts;
    const advertised = negotiation.export.blockSize;
    const minimum = advertised && advertised.minimum > 0 ? advertised.minimum : 1;
    const maximum = Math.min(
      advertised && advertised.maximum > 0 ? advertised.maximum : DEFAULT_BLOCK_SIZE.maximum,
      MAX_REQUEST_SIZE,
    );
    this.#blockSize = {
      minimum,
      preferred: advertised?.preferred || DEFAULT_BLOCK_SIZE.preferred,
      maximum,
    };
    // Split points must keep every piece aligned to the minimum block size.
    this.#splitSize = Math.max(minimum, Math.floor(maximum / minimum) * minimum);
    this.#maxEffectLength = this.#extended
      ? Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % minimum)
      : 0x1_0000_0000 - Math.max(minimum, 1);
    this.#headerSize = this.#extended ? EXTENDED_REQUEST_SIZE : COMPACT_REQUEST_SIZE;
    this.#receiving = this.#receive();
    const timeoutMs = (options.requestTimeout ?? 0) * 1000;
    if (timeoutMs > 0) {
      const timer = setInterval(
        () => this.#checkStale(timeoutMs),
        Math.max(50, Math.min(1000, timeoutMs / 4)),
      );
      // The watchdog alone must not keep a process alive.
      Deno.unrefTimer(timer);
      this.#watchdog = timer;
    }
    this.#signal = options.signal ?? terminationSignal();
    this.#onAbort = () => {
      const timer = setTimeout(() => {
        if (this.#inFlight.size > 0) {
          this.abort(`abandoned: no reply from the server within ${seconds(GRACE_MS)} of stopping`);
        }
      }, GRACE_MS);
      Deno.unrefTimer(timer);
    };
    if (this.#signal.aborted) this.#onAbort();
    else this.#signal.addEventListener("abort", this.#onAbort, { once: true });
  }

  /** Declares the connection dead when its requests went unanswered for `timeoutMs`. */
  #checkStale(timeoutMs: number): void {
    if (this.#inFlight.size === 0 || this.#failure) return;
    const quiet = Date.now() - Math.max(this.#busySince, this.#lastReply);
    if (quiet < timeoutMs) return;
    this.#fail(
      new NbdTimeoutError(
        `no reply from ${describeServer(this.#uri)} within ${seconds(timeoutMs)}`,
      ),
    );
  }

  /** Stops the timers and the signal listener. */
  #stopWatching(): void {
    clearInterval(this.#watchdog);
    this.#watchdog = undefined;
    if (this.#onAbort) this.#signal.removeEventListener("abort", this.#onAbort);
    this.#onAbort = undefined;
  }

  /**
   * Connects to the export a URI names: handshake, structured replies or
   * extended headers, `base:allocation`, then transmission.
   */
  static async connect(uri: string | NbdUri, options: ConnectOptions = {}): Promise<NbdClient> {
    const session = await NbdHandshake.open(uri, options);
    try {
      return await NbdClient.fromHandshake(session, options);
    } catch (error) {
      await session.abort();
      throw error;
    }
  }

  /**
   * Selects an export on a session in option mode (NBD_OPT_GO, or
   * NBD_OPT_EXPORT_NAME for old servers) and returns the client for it.
   */
  static async fromHandshake(
    session: NbdHandshake,
    options: GoOptions & ClientOptions = {},
  ): Promise<NbdClient> {
    return new NbdClient(await session.select(options), options);
  }

  // ---- what was negotiated -------------------------------------------------

  /** The URI of this connection (with the export name that was selected). */
  get uri(): NbdUri {
    return this.#uri;
  }
  /** Handshake style: "newstyle-fixed", "newstyle" or "oldstyle". */
  get protocol(): HandshakeStyle {
    return this.#protocol;
  }
  /** Whether structured replies are in use. */
  get structuredReplies(): boolean {
    return this.#structured;
  }
  /** Whether extended headers are in use. */
  get extendedHeaders(): boolean {
    return this.#extended;
  }
  /** Whether TLS is in use. */
  get tls(): boolean {
    return this.#tls;
  }
  /** The export name that was requested. */
  get exportName(): string {
    return this.#export.name;
  }
  /** The server's canonical name of the export, when it sent one. */
  get canonicalName(): string | undefined {
    return this.#export.canonicalName;
  }
  /** The export's description, when the server sent one. */
  get description(): string | undefined {
    return this.#export.description;
  }
  /** Everything the server said about the export. */
  get details(): Readonly<ExportDetails> {
    return this.#export;
  }
  /** Transmission flags (NBD_FLAG_*). */
  get flags(): number {
    return this.#export.flags;
  }
  /** Block sizes in force: the advertised ones, or the protocol's defaults. */
  get blockSize(): Readonly<BlockSize> {
    return this.#blockSize;
  }
  /** Block sizes the server advertised, if it did. */
  get advertisedBlockSize(): Readonly<BlockSize> | undefined {
    return this.#export.blockSize;
  }
  /** The export is read-only. */
  get readOnly(): boolean {
    return (this.flags & NBD_FLAG_READ_ONLY) !== 0;
  }
  /** FLUSH is supported. */
  get canFlush(): boolean {
    return (this.flags & NBD_FLAG_SEND_FLUSH) !== 0;
  }
  /** The FUA flag is supported. */
  get canFua(): boolean {
    return (this.flags & NBD_FLAG_SEND_FUA) !== 0;
  }
  /** TRIM is supported. */
  get canTrim(): boolean {
    return (this.flags & NBD_FLAG_SEND_TRIM) !== 0;
  }
  /** WRITE_ZEROES is supported. */
  get canZero(): boolean {
    return (this.flags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
  }
  /** Fast zeroing (NBD_CMD_FLAG_FAST_ZERO) is supported. */
  get canFastZero(): boolean {
    return (this.flags & NBD_FLAG_SEND_FAST_ZERO) !== 0;
  }
  /** Unfragmented reads (NBD_CMD_FLAG_DF) are supported. */
  get canDf(): boolean {
    return (this.flags & NBD_FLAG_SEND_DF) !== 0;
  }
  /** Several connections to this export are safe (cache-coherent). */
  get canMultiConn(): boolean {
    return (this.flags & NBD_FLAG_CAN_MULTI_CONN) !== 0;
  }
  /** CACHE is supported. */
  get canCache(): boolean {
    return (this.flags & NBD_FLAG_SEND_CACHE) !== 0;
  }
  /** The export behaves like spinning media. */
  get isRotational(): boolean {
    return (this.flags & NBD_FLAG_ROTATIONAL) !== 0;
  }
  /** Names of the metadata contexts the server selected. */
  get metaContexts(): string[] {
    return [...this.#contextIds.values()];
  }
  /** Whether a metadata context was selected, e.g. "base:allocation". */
  canMetaContext(name: string): boolean {
    for (const selected of this.#contextIds.values()) if (selected === name) return true;
    return false;
  }
  /** Why the connection became unusable, or undefined while it works. */
  get failure(): Error | undefined {
    return this.#failure;
  }
  /** Number of requests sent and not yet answered. */
  get inFlight(): number {
    return this.#inFlight.size;
  }

  /**
   * Ends the connection now: requests in flight fail with a connection
   * error carrying `reason`, later ones are refused, and the socket is
   * closed. For callers that decide a server is stale (e.g. no reply
   * within a timeout), where waiting in `close()` would hang.
   */
  abort(reason: string): void {
    this.#fail(new NbdConnectionError(reason));
  }

  // ---- Backend ---------------------------------------------------------------

  /** Size of the export in bytes. */
  size(): number {
    return this.#export.size;
  }

  /** The export's abilities in the form the server's backends use. */
  capabilities(): Capabilities {
    return {
      writable: !this.readOnly,
      flush: this.canFlush,
      trim: this.canTrim,
      zero: this.canZero,
      fastZero: this.canFastZero,
      fua: this.canFua ? "native" : "none",
      cache: this.canCache ? "native" : "none",
      extents: this.canMetaContext(BASE_ALLOCATION),
      multiConn: this.canMultiConn,
      rotational: this.isRotational,
      blockSize: { ...this.#blockSize },
    };
  }

  /** Reads `buf.length` bytes at `offset` into `buf`; splits requests larger than the maximum. */
  pread(buf: Uint8Array, offset: number, options: ReadOptions = {}): Promise<void> {
    let flags = 0;
    if (options.df) {
      if (!this.canDf) return this.#refuse(NBD_CMD_READ, offset, buf.length, "DF");
      flags |= NBD_CMD_FLAG_DF;
    }
    const invalid = this.#validate(NBD_CMD_READ, offset, buf.length);
    if (invalid) return Promise.reject(invalid);
    return this.#split(buf.length, (start, n) =>
      this.#submit(
        new Pending(NBD_CMD_READ, offset + start, n, buf.subarray(start, start + n)),
        flags,
      ));
  }

  /** Writes `buf` at `offset`; splits requests larger than the maximum. */
  pwrite(buf: Uint8Array, offset: number, options: WriteOptions | WriteFlags = {}): Promise<void> {
    const flags = this.#fuaFlag(options.fua);
    if (flags < 0) return this.#refuse(NBD_CMD_WRITE, offset, buf.length, "FUA");
    const invalid = this.#validate(NBD_CMD_WRITE, offset, buf.length);
    if (invalid) return Promise.reject(invalid);
    if (
      (options as WriteOptions).headroom && buf.byteOffset >= WRITE_HEADROOM &&
      buf.length > 0 && buf.length <= this.#splitSize
    ) {
      // One request: its header can go in front of the data, in the caller's buffer.
      return this.#submit(
        new Pending(NBD_CMD_WRITE, offset, buf.length),
        flags,
        buf,
        true,
        (options as WriteOptions).sent,
      );
    }
    return this.#split(buf.length, (start, n) =>
      this.#submit(
        new Pending(NBD_CMD_WRITE, offset + start, n),
        flags,
        buf.subarray(start, start + n),
      ));
  }

  /** Makes every write the server has answered durable (NBD_CMD_FLUSH). */
  flush(): Promise<void> {
    if (!this.canFlush) return this.#refuse(NBD_CMD_FLUSH, 0, 0, "FLUSH");
    return this.#submit(new Pending(NBD_CMD_FLUSH, 0, 0), 0);
  }

  /** Discards a range (NBD_CMD_TRIM, a hint). */
  trim(offset: number, length: number, options: WriteOptions | WriteFlags = {}): Promise<void> {
    if (!this.canTrim) return this.#refuse(NBD_CMD_TRIM, offset, length, "TRIM");
    return this.#effect(NBD_CMD_TRIM, offset, length, this.#fuaFlag(options.fua));
  }

  /** Makes a range read as zeroes (NBD_CMD_WRITE_ZEROES). */
  zero(offset: number, length: number, options: ZeroOptions | ZeroFlags = {}): Promise<void> {
    if (!this.canZero) return this.#refuse(NBD_CMD_WRITE_ZEROES, offset, length, "WRITE_ZEROES");
    let flags = this.#fuaFlag(options.fua);
    if (flags >= 0 && options.mayTrim === false) flags |= NBD_CMD_FLAG_NO_HOLE;
    if (flags >= 0 && options.fast) {
      if (!this.canFastZero) {
        return Promise.reject(
          new NbdRequestError(
            NBD_ENOTSUP,
            this.#describe(NBD_CMD_WRITE_ZEROES, offset, length),
            "the server does not support fast zeroing",
            true,
          ),
        );
      }
      flags |= NBD_CMD_FLAG_FAST_ZERO;
    }
    return this.#effect(NBD_CMD_WRITE_ZEROES, offset, length, flags);
  }

  /** Asks the server to prefetch a range (NBD_CMD_CACHE). */
  cache(offset: number, length: number): Promise<void> {
    if (!this.canCache) return this.#refuse(NBD_CMD_CACHE, offset, length, "CACHE");
    return this.#effect(NBD_CMD_CACHE, offset, length, 0);
  }

  /**
   * base:allocation extents from `offset` (the `Backend` form): consecutive
   * extents covering at least one byte. Without the context, the whole range
   * is reported as allocated data, which is always a safe answer.
   */
  async extents(
    offset: number,
    length: number,
    flags: ExtentsFlags = { reqOne: false },
  ): Promise<Extent[]> {
    if (!this.canMetaContext(BASE_ALLOCATION)) return [{ length, flags: 0 }];
    const statuses = await this.blockStatus(offset, length, flags);
    const extents = statuses.get(BASE_ALLOCATION);
    if (!extents) {
      throw new ProtocolError("the server's block status reply has no base:allocation extents");
    }
    return extents;
  }

  /**
   * One NBD_CMD_BLOCK_STATUS request: extents from `offset` for every
   * selected context, by context name. The server may describe less than
   * `length` (ask again from where it stopped) or a little more.
   */
  async blockStatus(
    offset: number,
    length: number,
    options: BlockStatusOptions = {},
  ): Promise<Map<string, Extent[]>> {
    const effect = Math.min(length, this.#maxEffectLength);
    if (this.#contextIds.size === 0) {
      throw this.#unsupported(NBD_CMD_BLOCK_STATUS, offset, effect, "any metadata context");
    }
    const invalid = this.#validate(NBD_CMD_BLOCK_STATUS, offset, effect);
    if (invalid) throw invalid;
    const pending = new Pending(NBD_CMD_BLOCK_STATUS, offset, effect);
    pending.statuses = new Map();
    await this.#submit(pending, options.reqOne ? NBD_CMD_FLAG_REQ_ONE : 0);
    const byName = new Map<string, Extent[]>();
    for (const [id, extents] of pending.statuses) {
      const name = this.#contextIds.get(id);
      if (name === undefined) {
        throw new ProtocolError(`block status for context id ${id}, which was never selected`);
      }
      byName.set(name, extents);
    }
    return byName;
  }

  /**
   * Iterates the extents of one metadata context over a range, asking the
   * server as many times as needed; extents are clipped to the range.
   */
  async *iterateExtents(
    offset: number,
    length: number,
    context: string = BASE_ALLOCATION,
  ): AsyncGenerator<MappedExtent> {
    if (!this.canMetaContext(context)) {
      throw new Error(`Cannot map the export: the server did not select context "${context}"`);
    }
    const end = offset + length;
    let position = offset;
    while (position < end) {
      const statuses = await this.blockStatus(position, end - position);
      const extents = statuses.get(context);
      if (!extents || extents.length === 0) {
        throw new ProtocolError(`the server returned no extents for "${context}"`);
      }
      for (const extent of extents) {
        if (position >= end) break;
        const n = Math.min(extent.length, end - position);
        yield { offset: position, length: n, flags: extent.flags };
        position += n;
      }
    }
  }

  /**
   * Waits for the requests in flight, sends NBD_CMD_DISC and closes the
   * connection. Safe to call more than once.
   */
  close(): Promise<void> {
    this.#closed ??= this.#close();
    return this.#closed;
  }

  /** Same as `close()`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  async #close(): Promise<void> {
    await this.#idle();
    if (!this.#failure) {
      this.#closing = true;
      const disc = new Uint8Array(this.#headerSize);
      encodeRequest(new DataView(disc.buffer), 0, this.#extended, {
        flags: 0,
        type: NBD_CMD_DISC,
        cookieHi: 0,
        cookieLo: 0,
        offset: 0,
        length: 0,
      });
      this.#writer.write(disc);
      await this.#writer.flush().catch(() => {});
    }
    this.#closing = true;
    this.#stopWatching();
    this.#stream.close();
    await this.#receiving;
    await this.#stream.closed?.();
  }

  // ---- sending ---------------------------------------------------------------

  #describe(type: number, offset: number, length: number): RequestDescription {
    return describeRequest(type, offset, length);
  }

  #unsupported(type: number, offset: number, length: number, feature: string): NbdRequestError {
    return new NbdRequestError(
      NBD_EINVAL,
      this.#describe(type, offset, length),
      `the server does not support ${feature}`,
      true,
    );
  }

  #refuse(type: number, offset: number, length: number, feature: string): Promise<never> {
    return Promise.reject(this.#unsupported(type, offset, length, feature));
  }

  /** FUA flag bits, or -1 when FUA was asked for but the server lacks it. */
  #fuaFlag(fua: boolean | undefined): number {
    if (!fua) return 0;
    return this.canFua ? NBD_CMD_FLAG_FUA : -1;
  }

  /** Checks range, alignment and writability; returns the error when the request is bad. */
  #validate(type: number, offset: number, length: number): Error | undefined {
    const size = this.#export.size;
    const fail = (errno: number, why: string) =>
      new NbdRequestError(errno, this.#describe(type, offset, length), why, true);
    if (this.#failure) return this.#lost(type, offset, length);
    if (this.#closed) return fail(NBD_EINVAL, "the client is closed");
    if (
      !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0
    ) {
      return fail(NBD_EINVAL, "offset and length must be non-negative integers");
    }
    const writing = type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES;
    if ((writing || type === NBD_CMD_TRIM) && this.readOnly) {
      return fail(NBD_EPERM, "the export is read-only");
    }
    if (offset + length > size) {
      return fail(writing ? NBD_ENOSPC : NBD_EINVAL, `beyond the end of the export (size ${size})`);
    }
    const minimum = this.#blockSize.minimum;
    if (
      minimum > 1 &&
      (offset % minimum !== 0 || (length % minimum !== 0 && offset + length !== size))
    ) {
      return fail(
        NBD_EINVAL,
        `not aligned to the server's ${minimum}-byte minimum block size`,
      );
    }
    return undefined;
  }

  /** Runs `send` over pieces of at most the split size; zero-length requests are not sent. */
  #split(length: number, send: (start: number, n: number) => Promise<void>): Promise<void> {
    if (length === 0) return Promise.resolve();
    if (length <= this.#splitSize) return send(0, length);
    const parts: Promise<void>[] = [];
    for (let start = 0; start < length; start += this.#splitSize) {
      parts.push(send(start, Math.min(this.#splitSize, length - start)));
    }
    return settleAll(parts);
  }

  /** TRIM, WRITE_ZEROES and CACHE: no payload, split only at the header's length limit. */
  #effect(type: number, offset: number, length: number, flags: number): Promise<void> {
    if (flags < 0) return this.#refuse(type, offset, length, "FUA");
    const invalid = this.#validate(type, offset, length);
    if (invalid) return Promise.reject(invalid);
    if (length === 0) return Promise.resolve();
    const parts: Promise<void>[] = [];
    for (let start = 0; start < length; start += this.#maxEffectLength) {
      const n = Math.min(this.#maxEffectLength, length - start);
      parts.push(this.#submit(new Pending(type, offset + start, n), flags));
    }
    return parts.length === 1 ? parts[0]! : settleAll(parts);
  }

  #cookie(): number {
    let cookie = this.#nextCookie;
    while (this.#inFlight.has(cookie)) cookie = cookie >= 0xffffffff ? 1 : cookie + 1;
    this.#nextCookie = cookie >= 0xffffffff ? 1 : cookie + 1;
    return cookie;
  }

  /** Sends one request (and its payload) and resolves when its reply is complete. */
  #submit(
    pending: Pending,
    flags: number,
    payload?: Uint8Array,
    headerInFront = false,
    sent?: () => void,
  ): Promise<void> {
    if (this.#failure) {
      return Promise.reject(this.#lost(pending.type, pending.offset, pending.length));
    }
    const writer = this.#writer;
    if (writer.error !== undefined) {
      this.#fail(new NbdConnectionError("writing to the server failed", { cause: writer.error }));
      return Promise.reject(this.#lost(pending.type, pending.offset, pending.length));
    }
    const cookie = this.#cookie();
    const header = headerInFront
      ? new Uint8Array(payload!.buffer, payload!.byteOffset - this.#headerSize, this.#headerSize)
      : new Uint8Array(this.#headerSize);
    let length = pending.length;
    if (payload && this.#extended) {
      flags |= NBD_CMD_FLAG_PAYLOAD_LEN;
      length = payload.length;
    }
    encodeRequest(new DataView(header.buffer, header.byteOffset), 0, this.#extended, {
      flags,
      type: pending.type,
      cookieHi: 0,
      cookieLo: cookie,
      offset: pending.offset,
      length,
    });
    if (this.#inFlight.size === 0) this.#busySince = Date.now();
    this.#inFlight.set(cookie, pending);
    if (headerInFront) {
      const chunk = new Uint8Array(
        payload!.buffer,
        header.byteOffset,
        header.length + payload!.length,
      );
      if (sent) writer.writeReleasing(chunk, sent);
      else writer.write(chunk);
    } else if (payload) writer.write(header, payload);
    else writer.write(header);
    if (writer.full) {
      // Backpressure: the caller's promise also waits for the queue to drain,
      // so a writer that loops on awaited writes cannot queue without bound.
      return Promise.all([pending.promise, writer.drain()]).then(() => {});
    }
    return pending.promise;
  }

  // ---- receiving -------------------------------------------------------------

  async #receive(): Promise<void> {
    const reader = this.#reader;
    try {
      while (true) {
        if (!(await reader.ensure(4, "a reply"))) {
          if (this.#closing && this.#inFlight.size === 0) return;
          throw new NbdConnectionError("the server closed the connection");
        }
        const magic = reader.view.getUint32(reader.position);
        const headerSize = replyHeaderSize(magic);
        if (headerSize === 0) {
          throw new ProtocolError(`reply with an unknown magic 0x${magic.toString(16)}`);
        }
        await reader.ensure(headerSize, "a reply header");
        const header = decodeReplyHeader(reader.view, reader.position);
        reader.consume(headerSize);
        this.#lastReply = Date.now();
        const cookie = header.cookieLo;
        const pending = header.cookieHi === 0 ? this.#inFlight.get(cookie) : undefined;
        if (!pending) {
          throw new ProtocolError(
            `reply for cookie 0x${header.cookieHi.toString(16)}${
              cookie.toString(16).padStart(8, "0")
            }, which is not in flight`,
          );
        }
        if (header.kind === "simple") {
          if (this.#extended) throw new ProtocolError("simple reply after extended headers");
          if (header.errno !== 0) {
            pending.errno = header.errno;
          } else if (pending.type === NBD_CMD_READ) {
            await reader.readInto(pending.buffer!, "READ data");
            pending.received = pending.length;
          }
          this.#finish(cookie, pending);
          continue;
        }
        if (!this.#structured) {
          throw new ProtocolError("structured reply chunk without structured replies");
        }
        await this.#chunk(pending, header.type, header.length);
        if (header.flags & NBD_REPLY_FLAG_DONE) this.#finish(cookie, pending);
      }
    } catch (error) {
      if (this.#closing && this.#inFlight.size === 0) return;
      this.#fail(error);
    }
  }

  async #chunk(pending: Pending, type: number, length: number): Promise<void> {
    const reader = this.#reader;
    switch (type) {
      case NBD_REPLY_TYPE_NONE:
        if (length !== 0) throw new ProtocolError("NBD_REPLY_TYPE_NONE chunk with a payload");
        return;
      case NBD_REPLY_TYPE_OFFSET_DATA: {
        if (pending.type !== NBD_CMD_READ || length < 9) {
          throw new ProtocolError(`bad data chunk in reply to ${commandName(pending.type)}`);
        }
        await reader.ensure(8, "a data chunk");
        const offset = getU64(reader.view, reader.position);
        reader.consume(8);
        const n = length - 8;
        const start = this.#within(pending, offset, n);
        await reader.readInto(pending.buffer!.subarray(start, start + n), "READ data");
        pending.received += n;
        return;
      }
      case NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (pending.type !== NBD_CMD_READ || length !== 12) {
          throw new ProtocolError(`bad hole chunk in reply to ${commandName(pending.type)}`);
        }
        await reader.ensure(12, "a hole chunk");
        const offset = getU64(reader.view, reader.position);
        const n = reader.view.getUint32(reader.position + 8);
        reader.consume(12);
        const start = this.#within(pending, offset, n);
        pending.buffer!.fill(0, start, start + n);
        pending.received += n;
        return;
      }
      case NBD_REPLY_TYPE_BLOCK_STATUS:
      case NBD_REPLY_TYPE_BLOCK_STATUS_EXT: {
        if (pending.type !== NBD_CMD_BLOCK_STATUS || length > MAX_STATUS_CHUNK) {
          throw new ProtocolError(
            `bad block status chunk in reply to ${commandName(pending.type)}`,
          );
        }
        const data = await reader.readExact(length, "a block status chunk");
        const status = decodeBlockStatusPayload(data, type === NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
        pending.statuses!.set(status.contextId, status.extents);
        return;
      }
      default: {
        if (!isErrorChunk(type)) throw new ProtocolError(`unknown reply chunk type ${type}`);
        if (length > MAX_ERROR_CHUNK) throw new ProtocolError("error chunk is too large");
        const data = await reader.readExact(length, "an error chunk");
        const error = decodeErrorPayload(data);
        if (pending.errno === 0) {
          // An error of an unknown type still fails the request (the spec's rule).
          pending.errno = error.errno || NBD_EIO;
          pending.message = error.message || undefined;
        }
      }
    }
  }

  /** Position of a content chunk inside the request's buffer; throws if it falls outside. */
  #within(pending: Pending, offset: number, n: number): number {
    const start = offset - pending.offset;
    if (n === 0 || start < 0 || start + n > pending.length) {
      throw new ProtocolError(
        `READ reply chunk at offset ${offset} (${n} bytes) is outside the request`,
      );
    }
    return start;
  }

  #finish(cookie: number, pending: Pending): void {
    this.#inFlight.delete(cookie);
    if (pending.errno !== 0) {
      pending.reject(new NbdRequestError(pending.errno, pending.describe(), pending.message));
    } else if (pending.type === NBD_CMD_READ && pending.received !== pending.length) {
      pending.reject(
        new ProtocolError(
          `the server's READ reply covered ${pending.received} of ${pending.length} bytes`,
        ),
      );
    } else {
      pending.resolve();
    }
    if (this.#inFlight.size === 0) this.#wakeIdle();
  }

  #lost(type: number, offset: number, length: number): NbdConnectionError {
    const what = `${commandName(type)} of ${length} bytes at offset ${offset}`;
    const message = `${what} failed: ${this.#failure!.message}`;
    if (this.#failure instanceof NbdTimeoutError) return new NbdTimeoutError(message);
    return new NbdConnectionError(message, { cause: this.#failure });
  }

  /** The connection is unusable: every request in flight fails and later ones are refused. */
  #fail(error: unknown): void {
    if (!this.#failure) {
      let failure: Error;
      if (error instanceof NbdConnectionError || error instanceof ProtocolError) failure = error;
      else if (error instanceof UnexpectedEofError) {
        failure = new NbdConnectionError("the server closed the connection in mid-reply", {
          cause: error,
        });
      } else {
        const message = error instanceof Error ? error.message : String(error);
        failure = new NbdConnectionError(`the connection failed: ${message}`, { cause: error });
      }
      this.#failure = failure;
    }
    const pending = [...this.#inFlight.values()];
    this.#inFlight.clear();
    for (const p of pending) p.reject(this.#lost(p.type, p.offset, p.length));
    this.#wakeIdle();
    this.#stopWatching();
    this.#stream.close();
  }

  #idle(): Promise<void> {
    if (this.#inFlight.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  #wakeIdle(): void {
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const wake of waiters) wake();
  }
}
