/**
 * The client side of the handshake. `NbdHandshake` is the "option mode" of
 * a connection: it has read the greeting and negotiated structured replies
 * (or extended headers), and can then list exports, query them with
 * NBD_OPT_INFO and list metadata contexts without choosing one, before
 * `select()` enters transmission; `NbdClient.fromHandshake` wraps it in a client.
 *
 * @module
 */

import { BufferedReader, UnexpectedEofError } from "../io/buffered_reader.ts";
import type { ByteStream } from "../io/byte_stream.ts";
import { CorkedWriter } from "../io/corked_writer.ts";
import {
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_INIT_MAGIC,
  NBD_OLD_MAGIC,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPTS_MAGIC,
  NBD_REP_ACK,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  optionName,
  replyTypeName,
} from "../protocol/constants.ts";
import { ProtocolError } from "../protocol/errors.ts";
import {
  type BlockSize,
  decodeInfoReply,
  decodeMetaContextReply,
  decodeOptionReplyHeader,
  decodeServerReply,
  encodeInfoRequest,
  encodeMetaContextQuery,
  encodeOptionRequest,
  encodeString,
  getU64,
  OPTION_REPLY_HEADER_SIZE,
} from "../protocol/handshake.ts";
import type { NbdUri } from "../protocol/uri.ts";
import { describeServer, openStream, seconds, toNbdUri } from "./connect.ts";
import { abortError, terminationSignal } from "../util/signals.ts";
import type { ClientTlsSettings } from "./tls.ts";
import { NbdConnectionError, NbdOptionError } from "./errors.ts";

/**
 * A client's large chunks are write payloads, often sent with their header
 * in front in one piece (`WriteOptions.headroom`): written as they are, not
 * copied into the writer's staging buffer. Headers alone are still batched.
 */
const CLIENT_SMALL_CHUNK = 64 * 1024;

/** How the server greeted us: libnbd's names for the three handshake styles. */
export type HandshakeStyle = "oldstyle" | "newstyle" | "newstyle-fixed";

/** What the server said about one export (from NBD_OPT_INFO, NBD_OPT_GO or EXPORT_NAME). */
export interface ExportDetails {
  /** The name the client asked for. */
  name: string;
  /** The server's canonical name for the export (NBD_INFO_NAME), when sent. */
  canonicalName?: string;
  /** Human-readable description (NBD_INFO_DESCRIPTION), when sent. */
  description?: string;
  /** Size in bytes. */
  size: number;
  /** Transmission flags (NBD_FLAG_*). */
  flags: number;
  /** Block-size constraints, when the server advertised them. */
  blockSize?: BlockSize;
}

/** One entry of the server's export list (NBD_OPT_LIST). */
export interface ExportListing {
  /** Export name. */
  name: string;
  /** Description, "" when the server sent none. */
  description: string;
}

/** Options of the handshake itself. */
export interface HandshakeOptions {
  /** Ask for structured replies (default true). */
  structuredReplies?: boolean;
  /** Ask for extended (64-bit) headers (default true); falls back when refused. */
  extendedHeaders?: boolean;
  /**
   * For TLS, use the runtime's own TLS when it can make the connection,
   * directly or through a loopback bridge (default true; see
   * `clientTlsPath` in tls.ts): it receives about twice as fast as node:tls.
   * node:tls sends large writes in fewer system calls, so a connection that
   * mostly writes may prefer false (docs/performance.md).
   */
  nativeTls?: boolean;
  /**
   * Seconds that opening the connection, and then each wait for the
   * server during the handshake (the greeting, each option's reply, the
   * TLS handshake), may take (default `DEFAULT_CONNECT_TIMEOUT`; 0 = no
   * limit). A server that does not greet in time is probed once, so that
   * the error can say what answered instead (HTTP, TLS, SSH...).
   */
  timeout?: number;
  /**
   * Stops connecting and the handshake with the signal's reason (default:
   * the process's termination signal, see util/signals.ts).
   */
  signal?: AbortSignal;
}

/** Seconds allowed to connect and for each step of the handshake when not told otherwise. */
export const DEFAULT_CONNECT_TIMEOUT = 10;

/** Milliseconds to wait for an answer to the probe sent to a server that did not greet. */
const PROBE_MS = 1000;

/**
 * Sent to a server that stayed silent instead of greeting: servers that
 * wait for the client to speak first (HTTP, TLS...) then answer, and the
 * answer says what they are. Harmless to HTTP servers (a HEAD request).
 */
const PROBE = new TextEncoder().encode("HEAD / HTTP/1.0\r\n\r\n");

/** The peer is not an NBD server: the message says what it seems to be instead. */
export class NotNbdServerError extends ProtocolError {
  /** Creates the error. */
  constructor(message: string) {
    super(message);
    this.name = "NotNbdServerError";
  }
}

/**
 * What a server that is not an NBD server sent instead of a greeting, as
 * a one-line error: HTTP, TLS and SSH are named, other text is quoted.
 */
export function foreignGreeting(bytes: Uint8Array, server: string): string {
  if (bytes.length >= 2 && (bytes[0] === 0x15 || bytes[0] === 0x16) && bytes[1] === 0x03) {
    return `${server} answered with TLS, not NBD (is it an https or other TLS port?)`;
  }
  const text = String.fromCharCode(...bytes.subarray(0, 80));
  if (/^HTTP\/\d/.test(text)) return `${server} answered with HTTP, not NBD`;
  if (text.startsWith("SSH-")) return `${server} answered with SSH, not NBD`;
  const line = text.split(/\r?\n/)[0]!.slice(0, 60);
  if (line.length >= 4 && /^[\x20-\x7e]+$/.test(line)) {
    return `${server} is not an NBD server: it sent "${line}"`;
  }
  const hex = [...bytes.subarray(0, 8)].map((b) => b.toString(16).padStart(2, "0")).join(" ");
  return `${server} is not an NBD server: its first bytes are ${hex}`;
}

/** Options of `select()`. */
export interface GoOptions {
  /** Export to open (default: the one the URI names). */
  exportName?: string;
  /** Metadata contexts to select (default `["base:allocation"]`; `[]` for none). */
  metaContexts?: string[];
}

/** Largest option reply accepted; anything bigger is treated as a broken server. */
const MAX_OPTION_REPLY = 64 * 1024 * 1024;
const GREETING_SIZE = 16;
const OLDSTYLE_REST = 8 + 4 + 124;

const lenientDecoder = new TextDecoder();

/** Reads a server message (error text); never throws on bad UTF-8. */
function messageOf(data: Uint8Array): string | undefined {
  const text = lenientDecoder.decode(data).trim();
  return text === "" ? undefined : text;
}

/** The parts of a negotiated connection an `NbdClient` takes over. */
export interface Negotiation {
  /** The connection. */
  stream: ByteStream;
  /** Buffered reader over it. */
  reader: BufferedReader;
  /** Corked writer over it. */
  writer: CorkedWriter;
  /** The URI the connection was made from, with the chosen export name. */
  uri: NbdUri;
  /** Handshake style. */
  protocol: HandshakeStyle;
  /** Structured replies are in use. */
  structuredReplies: boolean;
  /** Extended headers are in use. */
  extendedHeaders: boolean;
  /** TLS is in use. */
  tls: boolean;
  /** The export. */
  export: ExportDetails;
  /** Selected metadata contexts, by the id the server gave them. */
  metaContexts: Map<number, string>;
}

/**
 * A connection in option mode: the greeting is done, nothing is selected
 * yet. Create one with `NbdHandshake.open`, then call `list`, `info`,
 * `listMetaContexts` as often as needed, and finally `go` (transmission) or
 * `abort`.
 *
 * @example
 * ```ts
 * await using session = await NbdHandshake.open("nbd+unix:///?socket=/tmp/s.sock");
 * for (const e of await session.list()) console.log(e.name, (await session.info(e.name)).size);
 * ```
 */
export class NbdHandshake implements AsyncDisposable {
  #stream: ByteStream;
  #reader: BufferedReader;
  #writer: CorkedWriter;
  #uri: NbdUri;
  #style: HandshakeStyle = "newstyle-fixed";
  #noZeroes = false;
  #structured = false;
  #extended = false;
  #oldstyleExport: ExportDetails | undefined;
  #finished = false;
  #tls = false;
  /** Milliseconds each wait for the server may take (0 = no limit). */
  readonly #timeoutMs: number;
  readonly #signal: AbortSignal;
  /** Why the handshake was cut short (a timeout or the signal), once it was. */
  #cutShort: Error | undefined;
  readonly #onAbort = () =>
    this.#cut(abortError(this.#signal, `during the NBD handshake with ${this.#server}`));

  private constructor(stream: ByteStream, uri: NbdUri, options: HandshakeOptions) {
    this.#stream = stream;
    this.#reader = new BufferedReader(stream);
    this.#writer = new CorkedWriter(stream, undefined, CLIENT_SMALL_CHUNK);
    this.#uri = uri;
    this.#timeoutMs = (options.timeout ?? DEFAULT_CONNECT_TIMEOUT) * 1000;
    this.#signal = options.signal ?? terminationSignal();
  }

  get #server(): string {
    return describeServer(this.#uri);
  }

  /** Ends the handshake now: the wait in progress fails with `why`. */
  #cut(why: Error): void {
    this.#cutShort ??= why;
    this.#stream.close();
  }

  /** Stops watching the signal: the session is over or handed to a client. */
  #unwatch(): void {
    this.#signal.removeEventListener("abort", this.#onAbort);
  }

  /**
   * Runs one wait for the server, which fails with "stalled" after the
   * timeout, or with the signal's reason; `what` names what is awaited.
   */
  async #step<T>(what: string, work: () => Promise<T>): Promise<T> {
    if (this.#cutShort) throw this.#cutShort;
    const timer = this.#timeoutMs > 0
      ? setTimeout(
        () =>
          this.#cut(
            new NbdConnectionError(
              `NBD handshake with ${this.#server} stalled: no ${what} within ${
                seconds(this.#timeoutMs)
              }`,
            ),
          ),
        this.#timeoutMs,
      )
      : undefined;
    try {
      return await work();
    } catch (error) {
      throw this.#cutShort ?? error;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Connects to the server a URI names and performs the greeting, then asks
   * for extended headers or structured replies (unless told not to).
   * Oldstyle servers are recognised; they only allow `select()`.
   */
  static async open(uri: string | NbdUri, options: HandshakeOptions = {}): Promise<NbdHandshake> {
    const parsed = toNbdUri(uri);
    // Credential problems are reported before anything is sent. The TLS
    // module is loaded only when needed: it costs every start-up otherwise.
    const tlsModule = parsed.tls ? await import("./tls.ts") : undefined;
    const tls = tlsModule?.clientTlsSettings(parsed);
    const nativeTls = tls !== undefined && (options.nativeTls ?? true) &&
      tlsModule!.nativeTlsPossible(parsed, tls);
    const stream = await openStream(parsed, {
      nativeTls,
      timeoutMs: (options.timeout ?? DEFAULT_CONNECT_TIMEOUT) * 1000,
      signal: options.signal ?? terminationSignal(),
    });
    return await NbdHandshake.fromStream(stream, {
      ...options,
      uri: parsed,
      tls,
    });
  }

  /**
   * Performs the greeting over a stream that is already connected (a
   * socketpair, a subprocess's stdio, an accepted socket). `uri` only
   * supplies the default export name and what `uri` reports.
   */
  static async fromStream(
    stream: ByteStream,
    options: HandshakeOptions & { uri?: string | NbdUri; tls?: ClientTlsSettings } = {},
  ): Promise<NbdHandshake> {
    const parsed = options.uri === undefined
      ? { tls: false, transport: "unix" as const, socket: "-", exportName: "" }
      : toNbdUri(options.uri);
    const session = new NbdHandshake(stream, parsed, options);
    try {
      if (session.#signal.aborted) session.#onAbort();
      session.#signal.addEventListener("abort", session.#onAbort, { once: true });
      await session.#greet(options);
    } catch (error) {
      session.#unwatch();
      stream.close();
      if (session.#cutShort) throw session.#cutShort;
      if (error instanceof NotNbdServerError) throw error;
      // A server that wants a client certificate can only say so by hanging up right after TLS.
      throw session.#explain(
        error,
        session.#tls
          ? "right after the TLS handshake (does it require a client certificate? put client-cert.pem and client-key.pem in tls-certificates=DIR)"
          : "during the greeting",
      );
    }
    return session;
  }

  /** The URI this session was opened with. */
  get uri(): NbdUri {
    return this.#uri;
  }

  /** Handshake style: "newstyle-fixed", "newstyle" (no options) or "oldstyle". */
  get protocol(): HandshakeStyle {
    return this.#style;
  }

  /** Whether structured replies were negotiated (always true with extended headers). */
  get structuredReplies(): boolean {
    return this.#structured;
  }

  /** Whether extended headers were negotiated. */
  get extendedHeaders(): boolean {
    return this.#extended;
  }

  /** Whether TLS is in use. */
  get tls(): boolean {
    return this.#tls;
  }

  /** Whether options (LIST, INFO, meta contexts) can be sent: fixed newstyle only. */
  get canSendOptions(): boolean {
    return this.#style === "newstyle-fixed";
  }

  /**
   * Waits for the 16 bytes that start the greeting. A server silent for
   * the whole timeout gets one probe (see `PROBE`), so that the error can
   * name what it is; false when the server closed the connection first.
   */
  async #awaitGreeting(): Promise<boolean> {
    const reader = this.#reader;
    const arrived = reader.ensure(GREETING_SIZE, "the greeting");
    arrived.catch(() => {});
    if (this.#timeoutMs <= 0) return await this.#step("greeting", () => arrived);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = Symbol("late");
    let outcome: boolean | typeof late;
    try {
      outcome = await Promise.race([
        arrived,
        new Promise<typeof late>((resolve) =>
          timer = setTimeout(() => resolve(late), this.#timeoutMs)
        ),
      ]);
    } catch (error) {
      throw this.#cutShort ?? error;
    } finally {
      clearTimeout(timer);
    }
    if (outcome !== late) return outcome;
    const silent = new NbdConnectionError(
      `no NBD greeting from ${this.#server} within ${
        seconds(this.#timeoutMs)
      }: is this an NBD server?`,
    );
    if (this.#cutShort) throw this.#cutShort;
    try {
      await this.#stream.write(PROBE);
      await Promise.race([
        arrived,
        new Promise((resolve) => timer = setTimeout(resolve, PROBE_MS)),
      ]);
    } catch {
      // Whatever came back (or nothing) is judged below.
    } finally {
      clearTimeout(timer);
    }
    if (this.#cutShort) throw this.#cutShort;
    if (reader.buffered > 0) {
      throw new NotNbdServerError(foreignGreeting(reader.peek(reader.buffered), this.#server));
    }
    throw silent;
  }

  async #greet(options: HandshakeOptions & { tls?: ClientTlsSettings }): Promise<void> {
    const reader = this.#reader;
    if (!(await this.#awaitGreeting())) {
      if (reader.buffered > 0) {
        throw new NotNbdServerError(foreignGreeting(reader.peek(reader.buffered), this.#server));
      }
      throw new NbdConnectionError(
        "the server closed the connection before sending a greeting (is it an NBD server?)",
      );
    }
    const view = reader.view;
    const pos = reader.position;
    if (view.getBigUint64(pos) !== NBD_INIT_MAGIC) {
      throw new NotNbdServerError(foreignGreeting(reader.peek(reader.buffered), this.#server));
    }
    const second = view.getBigUint64(pos + 8);
    reader.consume(GREETING_SIZE);
    if (second === NBD_OLD_MAGIC) {
      await this.#step(
        "oldstyle greeting",
        () => reader.ensure(OLDSTYLE_REST, "the oldstyle greeting"),
      );
      const size = getU64(reader.view, reader.position);
      const flags = reader.view.getUint32(reader.position + 8) & 0xffff;
      reader.consume(OLDSTYLE_REST);
      if (!Number.isSafeInteger(size)) {
        throw new ProtocolError("export size is larger than 2^53 bytes, which is not supported");
      }
      this.#style = "oldstyle";
      this.#oldstyleExport = { name: "", size, flags };
      return;
    }
    if (second !== NBD_OPTS_MAGIC) {
      throw new ProtocolError("the server's greeting has an unknown second magic");
    }
    await this.#step("handshake flags", () => reader.ensure(2, "the handshake flags"));
    const serverFlags = reader.view.getUint16(reader.position);
    reader.consume(2);
    const fixed = (serverFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
    this.#noZeroes = (serverFlags & NBD_FLAG_NO_ZEROES) !== 0;
    this.#style = fixed ? "newstyle-fixed" : "newstyle";
    const clientFlags = (fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) |
      (this.#noZeroes ? NBD_FLAG_C_NO_ZEROES : 0);
    const out = new Uint8Array(4);
    new DataView(out.buffer).setUint32(0, clientFlags);
    this.#writer.write(out);
    if (this.#uri.tls) {
      // An nbds URI never falls back to plaintext.
      if (!fixed) {
        throw new NbdConnectionError("the server cannot do TLS (it does not speak fixed newstyle)");
      }
      await this.#startTls(options.tls ?? (await import("./tls.ts")).clientTlsSettings(this.#uri));
    }
    if (!fixed) return;
    if (options.extendedHeaders ?? true) {
      const reply = await this.#simpleOption(NBD_OPT_EXTENDED_HEADERS);
      if (reply === NBD_REP_ACK) {
        this.#extended = true;
        this.#structured = true;
        return;
      }
    }
    if (options.structuredReplies ?? true) {
      const reply = await this.#simpleOption(NBD_OPT_STRUCTURED_REPLY);
      this.#structured = reply === NBD_REP_ACK;
    }
  }

  /** NBD_OPT_STARTTLS, then the TLS handshake on the same socket. */
  async #startTls(settings: ClientTlsSettings): Promise<void> {
    this.#send(NBD_OPT_STARTTLS);
    const reply = await this.#receive(NBD_OPT_STARTTLS);
    if (reply.type !== NBD_REP_ACK) {
      const said = messageOf(reply.data);
      throw new NbdConnectionError(
        `the server refused TLS (${replyTypeName(reply.type)}${
          said ? `: ${said}` : ""
        }); not connecting in plaintext`,
      );
    }
    if (this.#reader.buffered > 0) {
      throw new NbdConnectionError(
        "the server sent data after its STARTTLS reply before the TLS handshake",
      );
    }
    const { startClientTls } = await import("./tls.ts");
    const secure = await this.#step(
      "TLS handshake",
      () =>
        startClientTls(
          this.#stream,
          settings,
          describeServer(this.#uri),
          this.#timeoutMs > 0 ? this.#timeoutMs : undefined,
        ),
    );
    this.#stream = secure;
    this.#reader = new BufferedReader(secure);
    this.#writer = new CorkedWriter(secure, undefined, CLIENT_SMALL_CHUNK);
    this.#tls = true;
  }

  /** Sends an option without data and returns the reply type (ACK or an error). */
  async #simpleOption(option: number): Promise<number> {
    this.#send(option);
    const reply = await this.#receive(option);
    if (reply.type !== NBD_REP_ACK && (reply.type & NBD_REP_FLAG_ERROR) === 0) {
      throw new ProtocolError(
        `unexpected reply ${replyTypeName(reply.type)} to ${optionName(option)}`,
      );
    }
    return reply.type;
  }

  #send(option: number, data?: Uint8Array): void {
    this.#writer.write(encodeOptionRequest(option, data));
  }

  #receive(option: number): Promise<{ type: number; data: Uint8Array }> {
    return this.#step(`reply to NBD_OPT_${optionName(option)}`, () => this.#receiveNow(option));
  }

  async #receiveNow(option: number): Promise<{ type: number; data: Uint8Array }> {
    await this.#writer.flush();
    const reader = this.#reader;
    if (!(await reader.ensure(OPTION_REPLY_HEADER_SIZE, "an option reply"))) {
      throw new UnexpectedEofError(`the reply to ${optionName(option)}`);
    }
    const header = decodeOptionReplyHeader(reader.peek(OPTION_REPLY_HEADER_SIZE));
    reader.consume(OPTION_REPLY_HEADER_SIZE);
    if (!header.magicOk) throw new ProtocolError("option reply with a bad magic");
    if (header.option !== option) {
      throw new ProtocolError(
        `reply to option ${optionName(header.option)} while waiting for ${optionName(option)}`,
      );
    }
    if (header.length > MAX_OPTION_REPLY) {
      throw new ProtocolError(`option reply of ${header.length} bytes is too large`);
    }
    const data = await reader.readExact(header.length, `the reply to ${optionName(option)}`);
    return { type: header.type, data };
  }

  /** Turns an error reply into an exception with a message a user can act on. */
  #refused(option: number, type: number, data: Uint8Array, exportName?: string): NbdOptionError {
    const serverMessage = messageOf(data);
    const detail = serverMessage ? ` (server said: ${serverMessage})` : "";
    let message: string | undefined;
    if (type === NBD_REP_ERR_UNKNOWN && exportName !== undefined) {
      message = `the server has no export named "${exportName}"${detail}`;
    } else if (type === NBD_REP_ERR_TLS_REQD) {
      message =
        `the server requires TLS: connect with an nbds:// URI (and tls-certificates=DIR)${detail}`;
    } else if (type === NBD_REP_ERR_POLICY) {
      message = `the server refused option ${optionName(option)} by policy${detail}`;
    } else if ((type & NBD_REP_FLAG_ERROR) === 0) {
      return new NbdOptionError(
        option,
        type,
        serverMessage,
        `unexpected reply ${replyTypeName(type)} to option ${optionName(option)}`,
      );
    }
    return new NbdOptionError(option, type, serverMessage, message);
  }

  /** Wraps low-level failures (EOF, protocol violations) in a message that names the phase. */
  #explain(error: unknown, phase: string): unknown {
    // The runtime's TLS reports a close without close_notify as its own kind of end of stream.
    if (error instanceof UnexpectedEofError || error instanceof Deno.errors.UnexpectedEof) {
      return new NbdConnectionError(`the server closed the connection ${phase}`, {
        cause: error,
      });
    }
    if (error instanceof ProtocolError) {
      return new ProtocolError(`${error.message} (${phase})`, { cause: error });
    }
    const code = (error as { code?: unknown })?.code;
    if (
      error instanceof Deno.errors.ConnectionReset || error instanceof Deno.errors.BrokenPipe ||
      code === "EPIPE" || code === "ECONNRESET"
    ) {
      return new NbdConnectionError(`the connection was reset ${phase}`, { cause: error });
    }
    return error;
  }

  #requireOptions(option: number): void {
    if (this.#finished) throw new Error("Cannot send options: the handshake is over");
    if (this.#style !== "newstyle-fixed") {
      throw new NbdOptionError(
        option,
        NBD_REP_ERR_UNSUP,
        undefined,
        `the server uses the ${this.#style} handshake, which has no ${optionName(option)} option`,
      );
    }
  }

  /** Runs `body`, explaining EOF and protocol errors as failures of `option`. */
  async #guard<T>(option: number, body: () => Promise<T>): Promise<T> {
    try {
      return await body();
    } catch (error) {
      if (error instanceof UnexpectedEofError || error instanceof ProtocolError) {
        this.#finished = true;
        this.#stream.close();
      }
      throw this.#explain(error, `in reply to option ${optionName(option)}`);
    }
  }

  /** Lists the server's exports (NBD_OPT_LIST). */
  async list(): Promise<ExportListing[]> {
    this.#requireOptions(NBD_OPT_LIST);
    return await this.#guard(NBD_OPT_LIST, async () => {
      this.#send(NBD_OPT_LIST);
      const exports: ExportListing[] = [];
      while (true) {
        const reply = await this.#receive(NBD_OPT_LIST);
        if (reply.type === NBD_REP_ACK) return exports;
        if (reply.type === NBD_REP_SERVER) {
          exports.push(decodeServerReply(reply.data));
          continue;
        }
        throw this.#refused(NBD_OPT_LIST, reply.type, reply.data);
      }
    });
  }

  /**
   * Asks about an export without selecting it (NBD_OPT_INFO): size, flags,
   * canonical name, description and block sizes.
   */
  async info(exportName: string = this.#uri.exportName): Promise<ExportDetails> {
    this.#requireOptions(NBD_OPT_INFO);
    return await this.#guard(NBD_OPT_INFO, () => this.#infoOrGo(NBD_OPT_INFO, exportName));
  }

  async #infoOrGo(option: number, exportName: string): Promise<ExportDetails> {
    this.#send(
      option,
      encodeInfoRequest({
        name: exportName,
        infos: [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
      }),
    );
    const details: Partial<ExportDetails> & { name: string } = { name: exportName };
    while (true) {
      const reply = await this.#receive(option);
      if (reply.type === NBD_REP_INFO) {
        const info = decodeInfoReply(reply.data);
        // Unknown information types are ignored, as the protocol requires.
        if (info.type === NBD_INFO_EXPORT && "size" in info) {
          details.size = info.size;
          details.flags = info.flags;
        } else if (info.type === NBD_INFO_NAME && "name" in info) {
          details.canonicalName = info.name;
        } else if (info.type === NBD_INFO_DESCRIPTION && "description" in info) {
          details.description = info.description;
        } else if (info.type === NBD_INFO_BLOCK_SIZE && "blockSize" in info) {
          details.blockSize = info.blockSize;
        }
        continue;
      }
      if (reply.type === NBD_REP_ACK) {
        if (details.size === undefined || details.flags === undefined) {
          throw new ProtocolError(
            `the server accepted ${optionName(option)} without sending NBD_INFO_EXPORT`,
          );
        }
        return details as ExportDetails;
      }
      throw this.#refused(option, reply.type, reply.data, exportName);
    }
  }

  /**
   * Lists the metadata contexts the server offers for an export
   * (NBD_OPT_LIST_META_CONTEXT); with no queries, all of them.
   */
  async listMetaContexts(
    exportName: string = this.#uri.exportName,
    queries: string[] = [],
  ): Promise<string[]> {
    this.#requireOptions(NBD_OPT_LIST_META_CONTEXT);
    return await this.#guard(
      NBD_OPT_LIST_META_CONTEXT,
      async () => [...(await this.#metaContexts(NBD_OPT_LIST_META_CONTEXT, exportName, queries))
        .values()],
    );
  }

  async #metaContexts(
    option: number,
    exportName: string,
    queries: string[],
  ): Promise<Map<number, string>> {
    this.#send(option, encodeMetaContextQuery({ exportName, queries }));
    const contexts = new Map<number, string>();
    let index = 0;
    while (true) {
      const reply = await this.#receive(option);
      if (reply.type === NBD_REP_ACK) return contexts;
      if (reply.type === NBD_REP_META_CONTEXT) {
        const context = decodeMetaContextReply(reply.data);
        // LIST replies may all carry id 0, so key those by position instead.
        contexts.set(option === NBD_OPT_SET_META_CONTEXT ? context.id : index++, context.name);
        continue;
      }
      throw this.#refused(option, reply.type, reply.data, exportName);
    }
  }

  /**
   * Selects an export and enters transmission (NBD_OPT_GO, or
   * NBD_OPT_EXPORT_NAME for servers without GO), after selecting the
   * metadata contexts. Returns what was negotiated, which
   * `NbdClient.fromHandshake` turns into a client; this session is then
   * finished.
   */
  async select(options: GoOptions = {}): Promise<Negotiation> {
    if (this.#finished) throw new Error("Cannot select an export: the handshake is over");
    const exportName = options.exportName ?? this.#uri.exportName;
    const uri = { ...this.#uri, exportName };
    if (this.#oldstyleExport) {
      this.#finished = true;
      return (this.#negotiation(uri, this.#oldstyleExport, new Map()));
    }
    if (this.#style === "newstyle") {
      return await this.#guard(NBD_OPT_EXPORT_NAME, () => this.#exportName(uri));
    }
    const wanted = options.metaContexts ?? ["base:allocation"];
    return await this.#guard(NBD_OPT_GO, async () => {
      let contexts = new Map<number, string>();
      if (this.#structured && wanted.length > 0) {
        try {
          contexts = await this.#metaContexts(NBD_OPT_SET_META_CONTEXT, exportName, wanted);
        } catch (error) {
          // A server without metadata contexts still serves data; only an
          // unknown export is worth stopping for, and GO reports that itself.
          if (!(error instanceof NbdOptionError)) throw error;
        }
      }
      let details: ExportDetails;
      try {
        details = await this.#infoOrGo(NBD_OPT_GO, exportName);
      } catch (error) {
        if (
          error instanceof NbdOptionError && error.replyType === NBD_REP_ERR_UNSUP &&
          !this.#extended
        ) {
          return await this.#exportName(uri);
        }
        throw error;
      }
      this.#finished = true;
      return (this.#negotiation(uri, details, contexts));
    });
  }

  async #exportName(uri: NbdUri): Promise<Negotiation> {
    const name = uri.exportName;
    this.#send(NBD_OPT_EXPORT_NAME, encodeString(name));
    const length = this.#noZeroes ? 10 : 134;
    this.#finished = true;
    const arrived = await this.#step("reply to NBD_OPT_EXPORT_NAME", async () => {
      await this.#writer.flush();
      return await this.#reader.ensure(length, "the export name reply");
    });
    if (!arrived) {
      this.#stream.close();
      throw new NbdConnectionError(
        `the server closed the connection after NBD_OPT_EXPORT_NAME: ` +
          `it probably has no export named "${name}"`,
      );
    }
    const size = getU64(this.#reader.view, this.#reader.position);
    const flags = this.#reader.view.getUint16(this.#reader.position + 8);
    this.#reader.consume(length);
    if (!Number.isSafeInteger(size)) {
      throw new ProtocolError("export size is larger than 2^53 bytes, which is not supported");
    }
    // Without GO the server cannot have sent metadata contexts or block sizes.
    return (this.#negotiation(uri, { name, size, flags }, new Map()));
  }

  #negotiation(
    uri: NbdUri,
    details: ExportDetails,
    metaContexts: Map<number, string>,
  ): Negotiation {
    this.#unwatch();
    return {
      stream: this.#stream,
      reader: this.#reader,
      writer: this.#writer,
      uri,
      protocol: this.#style,
      structuredReplies: this.#structured,
      extendedHeaders: this.#extended,
      tls: this.#tls,
      export: details,
      metaContexts,
    };
  }

  /**
   * Ends the session without entering transmission (NBD_OPT_ABORT) and
   * closes the connection. Servers that hang up instead of acknowledging
   * (nbd-server does) are fine.
   */
  async abort(): Promise<void> {
    if (this.#finished) return;
    this.#finished = true;
    this.#unwatch();
    try {
      if (this.#style === "newstyle-fixed") {
        this.#send(NBD_OPT_ABORT);
        await this.#receive(NBD_OPT_ABORT);
      }
    } catch {
      // The server may close without replying; either way we are done.
    } finally {
      this.#stream.close();
    }
  }

  /** Aborts the session unless `select()` already took the connection over. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.abort();
  }
}
