/**
 * A scripted NBD server for client unit tests: it listens on a private
 * Unix socket, accepts one connection and lets the test say exactly what
 * the server sends, so replies can be reordered, split, broken or quirky.
 *
 * @module
 */

import { BufferedReader } from "../io/buffered_reader.ts";
import { writeAll } from "../io/byte_stream.ts";
import {
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INIT_MAGIC,
  NBD_OLD_MAGIC,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
} from "../protocol/constants.ts";
import {
  type BlockSize,
  decodeInfoRequest,
  decodeMetaContextQuery,
  decodeOptionHeader,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeMetaContextReply,
  encodeOptionReply,
  OPTION_HEADER_SIZE,
  setU64,
} from "../protocol/handshake.ts";
import {
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

/** What the scripted server answers during option haggling. */
export interface ExportScript {
  /** Export size (default 1 MiB). */
  size?: number;
  /** Transmission flags (default: HAS_FLAGS | SEND_FLUSH | SEND_FUA ...). */
  flags: number;
  /** Block sizes to advertise. */
  blockSize?: BlockSize;
  /** Accept NBD_OPT_STRUCTURED_REPLY (default true). */
  structured?: boolean;
  /** Accept NBD_OPT_EXTENDED_HEADERS (default false). */
  extended?: boolean;
  /** Contexts SET_META_CONTEXT selects (default: base:allocation as id 7). */
  contexts?: Array<[number, string]>;
}

/** A received request, with its payload when it carried one. */
export interface ReceivedRequest extends RequestHeader {
  /** WRITE payload. */
  payload?: Uint8Array;
}

/** The server end of the scripted connection. */
export class Peer {
  /** Buffered reader over the connection. */
  readonly reader: BufferedReader;
  /** Extended headers were negotiated by `serveOptions`. */
  extended = false;
  readonly #conn: Deno.Conn;

  /** Wraps an accepted connection. */
  constructor(conn: Deno.Conn) {
    this.#conn = conn;
    this.reader = new BufferedReader(conn);
  }

  /** Writes bytes to the client. */
  async write(...chunks: Uint8Array[]): Promise<void> {
    for (const chunk of chunks) await writeAll(this.#conn, chunk);
  }

  /** Closes the connection. */
  close(): void {
    try {
      this.#conn.close();
    } catch { /* already closed */ }
  }

  /** Sends the newstyle greeting and returns the client's flags. */
  async greet(flags = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES): Promise<number> {
    await this.write(encodeGreeting(flags));
    return new DataView((await this.reader.readExact(4)).buffer).getUint32(0);
  }

  /** Sends an oldstyle greeting: magic, size, flags, 124 zeroes. */
  async oldstyle(size: number, flags: number): Promise<void> {
    const out = new Uint8Array(152);
    const view = new DataView(out.buffer);
    view.setBigUint64(0, NBD_INIT_MAGIC);
    view.setBigUint64(8, NBD_OLD_MAGIC);
    setU64(view, 16, size);
    view.setUint32(24, flags);
    await this.write(out);
  }

  /** Reads one option request. */
  async option(): Promise<{ option: number; data: Uint8Array }> {
    const header = decodeOptionHeader(await this.reader.readExact(OPTION_HEADER_SIZE));
    if (!header.magicOk) throw new Error("client sent an option with a bad magic");
    return { option: header.option, data: await this.reader.readExact(header.length) };
  }

  /** Sends an option reply. */
  async reply(option: number, type: number, data?: Uint8Array): Promise<void> {
    await this.write(encodeOptionReply(option, type, data));
  }

  /**
   * Answers options the usual way until GO (or INFO/EXPORT_NAME is left to
   * the test): structured replies, extended headers, meta contexts, GO.
   * Returns the export name GO asked for.
   */
  async serveOptions(script: ExportScript): Promise<string> {
    const size = script.size ?? 1024 * 1024;
    while (true) {
      const { option, data } = await this.option();
      switch (option) {
        case NBD_OPT_EXTENDED_HEADERS:
          if (script.extended) {
            this.extended = true;
            await this.reply(option, NBD_REP_ACK);
          } else await this.reply(option, NBD_REP_ERR_UNSUP);
          break;
        case NBD_OPT_STRUCTURED_REPLY:
          await this.reply(option, script.structured === false ? NBD_REP_ERR_UNSUP : NBD_REP_ACK);
          break;
        case NBD_OPT_SET_META_CONTEXT: {
          decodeMetaContextQuery(data);
          for (const [id, name] of script.contexts ?? [[7, "base:allocation"]]) {
            await this.reply(option, NBD_REP_META_CONTEXT, encodeMetaContextReply(id, name));
          }
          await this.reply(option, NBD_REP_ACK);
          break;
        }
        case NBD_OPT_INFO:
        case NBD_OPT_GO: {
          const request = decodeInfoRequest(data);
          await this.reply(option, NBD_REP_INFO, encodeInfoExport(size, script.flags));
          if (script.blockSize) {
            await this.reply(option, NBD_REP_INFO, encodeInfoBlockSize(script.blockSize));
          }
          await this.reply(option, NBD_REP_ACK);
          if (option === NBD_OPT_GO) return request.name;
          break;
        }
        default:
          throw new Error(`scripted server: unexpected option ${option}`);
      }
    }
  }

  /** Reads one request header (and a WRITE payload). */
  async request(): Promise<ReceivedRequest> {
    const size = this.extended ? EXTENDED_REQUEST_SIZE : COMPACT_REQUEST_SIZE;
    const bytes = await this.reader.readExact(size);
    const request: ReceivedRequest | undefined = decodeRequest(
      new DataView(bytes.buffer),
      0,
      this.extended,
    );
    if (!request) throw new Error("client sent a request with a bad magic");
    if (request.type === 1) request.payload = await this.reader.readExact(request.length);
    return request;
  }

  /** Sends a simple reply (with READ data when given). */
  async simple(request: RequestHeader, errno = 0, data?: Uint8Array): Promise<void> {
    const out = new Uint8Array(SIMPLE_REPLY_SIZE);
    writeSimpleReply(new DataView(out.buffer), 0, errno, request.cookieHi, request.cookieLo);
    await this.write(out, ...(data ? [data] : []));
  }

  /** Sends a structured (or extended) reply chunk. */
  async chunk(request: RequestHeader, type: number, payload: Uint8Array, done: boolean) {
    const header = new Uint8Array(32);
    const n = writeChunkHeader(
      new DataView(header.buffer),
      0,
      this.extended,
      done ? NBD_REPLY_FLAG_DONE : 0,
      type,
      request,
      payload.length,
    );
    await this.write(header.subarray(0, n), payload);
  }

  /** An OFFSET_DATA chunk. */
  async data(request: RequestHeader, offset: number, bytes: Uint8Array, done = false) {
    const payload = new Uint8Array(8 + bytes.length);
    setU64(new DataView(payload.buffer), 0, offset);
    payload.set(bytes, 8);
    await this.chunk(request, NBD_REPLY_TYPE_OFFSET_DATA, payload, done);
  }

  /** An OFFSET_HOLE chunk. */
  async hole(request: RequestHeader, offset: number, length: number, done = false) {
    const payload = new Uint8Array(12);
    const view = new DataView(payload.buffer);
    setU64(view, 0, offset);
    view.setUint32(8, length);
    await this.chunk(request, NBD_REPLY_TYPE_OFFSET_HOLE, payload, done);
  }

  /** An ERROR chunk. */
  async error(request: RequestHeader, errno: number, message: string, done = true) {
    await this.chunk(request, NBD_REPLY_TYPE_ERROR, encodeErrorPayload(errno, message), done);
  }

  /** A NONE chunk with DONE set. */
  async none(request: RequestHeader) {
    await this.chunk(request, NBD_REPLY_TYPE_NONE, new Uint8Array(), true);
  }

  /** A block-status chunk for one context. */
  async status(request: RequestHeader, contextId: number, extents: Extent[], done = true) {
    await this.chunk(
      request,
      this.extended ? NBD_REPLY_TYPE_BLOCK_STATUS_EXT : NBD_REPLY_TYPE_BLOCK_STATUS,
      encodeBlockStatusPayload(contextId, extents, this.extended),
      done,
    );
  }
}

/** A running scripted server. */
export interface ScriptedServer extends AsyncDisposable {
  /** URI of the server (export name ""). */
  uri: string;
  /** Settles when the script finishes; rejects with the script's error. */
  done: Promise<void>;
}

/** Starts a server that runs `script` on the first connection it accepts. */
export async function scriptedServer(
  script: (peer: Peer) => Promise<void>,
): Promise<ScriptedServer> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-scripted" });
  const path = `${dir}/sock`;
  const listener = Deno.listen({ transport: "unix", path });
  const done = (async () => {
    const conn = await listener.accept();
    const peer = new Peer(conn);
    try {
      await script(peer);
    } finally {
      peer.close();
    }
  })();
  // Keep a failing script from being reported before the test awaits it.
  done.catch(() => {});
  return {
    uri: `nbd+unix:///?socket=${path}`,
    done,
    async [Symbol.asyncDispose]() {
      listener.close();
      await done.catch(() => {});
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}
