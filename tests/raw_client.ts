/**
 * A deliberately low-level NBD client for protocol tests: it sends exactly
 * the bytes a test asks for (including malformed ones) and decodes what
 * comes back without interpretation, so tests can assert the precise reply.
 *
 * @module
 */

import * as C from "../protocol/constants.ts";
import {
  decodeOptionReplyHeader,
  encodeInfoRequest,
  encodeMetaContextQuery,
  encodeOptionRequest,
  getU64,
  setU64,
} from "../protocol/handshake.ts";
import { BufferedReader } from "../io/buffered_reader.ts";
import { writeAll } from "../io/byte_stream.ts";

/** One option reply. */
export interface RawOptionReply {
  option: number;
  type: number;
  data: Uint8Array;
}

/** One decoded reply chunk (simple replies have kind "simple"). */
export type RawReply =
  | { kind: "simple"; errno: number; cookie: number; data?: Uint8Array }
  | {
    kind: "chunk";
    flags: number;
    type: number;
    cookie: number;
    offset?: number;
    payload: Uint8Array;
  };

/** A raw connection to a server. */
export class RawClient {
  readonly conn: Deno.Conn;
  readonly reader: BufferedReader;
  extended = false;

  private constructor(conn: Deno.Conn) {
    this.conn = conn;
    this.reader = new BufferedReader(conn);
  }

  /** Connects to a Unix socket. */
  static async connect(path: string): Promise<RawClient> {
    return new RawClient(await Deno.connect({ transport: "unix", path }));
  }

  /** Sends raw bytes. */
  async send(bytes: Uint8Array): Promise<void> {
    await writeAll(this.conn, bytes);
  }

  /** Reads exactly n bytes. */
  read(n: number): Promise<Uint8Array> {
    return this.reader.readExact(n);
  }

  /** Resolves true if the server closes the connection (EOF) within the timeout. */
  async closedByServer(timeoutMs = 3000): Promise<boolean> {
    const buf = new Uint8Array(1024);
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<"timeout">((r) =>
        timer = setTimeout(() => r("timeout"), deadline - Date.now())
      );
      try {
        const n = await Promise.race([this.conn.read(buf), timeout]);
        if (n === "timeout") return false;
        if (n === null) return true;
      } catch {
        return true;
      } finally {
        clearTimeout(timer);
      }
    }
    return false;
  }

  /** Reads the greeting; returns the handshake flags. */
  async greeting(): Promise<number> {
    const g = await this.read(18);
    const view = new DataView(g.buffer);
    if (view.getBigUint64(0) !== C.NBD_INIT_MAGIC || view.getBigUint64(8) !== C.NBD_OPTS_MAGIC) {
      throw new Error("bad greeting");
    }
    return view.getUint16(16);
  }

  /** Sends the client flags. */
  async clientFlags(flags: number): Promise<void> {
    const out = new Uint8Array(4);
    new DataView(out.buffer).setUint32(0, flags);
    await this.send(out);
  }

  /** Greeting plus fixed newstyle (and NO_ZEROES) client flags. */
  async start(flags = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES): Promise<void> {
    await this.greeting();
    await this.clientFlags(flags);
  }

  /** Sends an option. */
  async option(option: number, data: Uint8Array = new Uint8Array()): Promise<void> {
    await this.send(encodeOptionRequest(option, data));
  }

  /** Reads one option reply. */
  async optionReply(): Promise<RawOptionReply> {
    const header = decodeOptionReplyHeader(await this.read(20));
    if (!header.magicOk) throw new Error("bad option reply magic");
    return { option: header.option, type: header.type, data: await this.read(header.length) };
  }

  /** Sends an option and collects replies up to the final one (ACK or an error). */
  async ask(option: number, data?: Uint8Array): Promise<RawOptionReply[]> {
    await this.option(option, data);
    const replies: RawOptionReply[] = [];
    while (true) {
      const reply = await this.optionReply();
      replies.push(reply);
      if (reply.type === C.NBD_REP_ACK || reply.type & C.NBD_REP_FLAG_ERROR) return replies;
    }
  }

  /** Negotiates and enters transmission with GO; returns size and transmission flags. */
  async go(
    name = "",
    options: { structured?: boolean; extended?: boolean; meta?: string[] } = {},
  ): Promise<{ size: number; flags: number }> {
    if (options.extended) {
      const r = await this.ask(C.NBD_OPT_EXTENDED_HEADERS);
      if (r[0]!.type !== C.NBD_REP_ACK) throw new Error("extended headers refused");
      this.extended = true;
    } else if (options.structured) {
      const r = await this.ask(C.NBD_OPT_STRUCTURED_REPLY);
      if (r[0]!.type !== C.NBD_REP_ACK) throw new Error("structured replies refused");
    }
    if (options.meta) {
      await this.ask(
        C.NBD_OPT_SET_META_CONTEXT,
        encodeMetaContextQuery({ exportName: name, queries: options.meta }),
      );
    }
    const replies = await this.ask(
      C.NBD_OPT_GO,
      encodeInfoRequest({ name, infos: [C.NBD_INFO_BLOCK_SIZE] }),
    );
    const final = replies[replies.length - 1]!;
    if (final.type !== C.NBD_REP_ACK) throw new Error(`GO failed: ${C.replyTypeName(final.type)}`);
    const info = replies.find((r) => r.type === C.NBD_REP_INFO && r.data[1] === C.NBD_INFO_EXPORT)!;
    const view = new DataView(info.data.buffer, info.data.byteOffset);
    return { size: getU64(view, 2), flags: view.getUint16(10) };
  }

  /** Sends a request (compact or extended per negotiation). */
  async request(
    type: number,
    options: {
      flags?: number;
      cookie?: number;
      offset?: number;
      length?: number;
      payload?: Uint8Array;
    } = {},
  ): Promise<void> {
    const size = this.extended ? 32 : 28;
    const payload = options.payload ?? new Uint8Array();
    const out = new Uint8Array(size + payload.length);
    const view = new DataView(out.buffer);
    view.setUint32(0, this.extended ? C.NBD_EXTENDED_REQUEST_MAGIC : C.NBD_REQUEST_MAGIC);
    view.setUint16(4, options.flags ?? 0);
    view.setUint16(6, type);
    view.setUint32(8, 0);
    view.setUint32(12, options.cookie ?? 1);
    setU64(view, 16, options.offset ?? 0);
    if (this.extended) setU64(view, 24, options.length ?? payload.length);
    else view.setUint32(24, options.length ?? payload.length);
    out.set(payload, size);
    await this.send(out);
  }

  /**
   * Reads one reply. For a simple reply to a successful READ pass `readLength`
   * (simple replies do not say how much data follows).
   */
  async reply(readLength = 0): Promise<RawReply> {
    await this.reader.ensure(4);
    const magic = this.reader.view.getUint32(this.reader.position);
    if (magic === C.NBD_SIMPLE_REPLY_MAGIC) {
      const h = await this.read(16);
      const v = new DataView(h.buffer);
      const errno = v.getUint32(4);
      const data = errno === 0 && readLength > 0 ? await this.read(readLength) : undefined;
      return { kind: "simple", errno, cookie: v.getUint32(12), data };
    }
    if (magic === C.NBD_STRUCTURED_REPLY_MAGIC) {
      const h = await this.read(20);
      const v = new DataView(h.buffer);
      return {
        kind: "chunk",
        flags: v.getUint16(4),
        type: v.getUint16(6),
        cookie: v.getUint32(12),
        payload: await this.read(v.getUint32(16)),
      };
    }
    if (magic === C.NBD_EXTENDED_REPLY_MAGIC) {
      const h = await this.read(32);
      const v = new DataView(h.buffer);
      return {
        kind: "chunk",
        flags: v.getUint16(4),
        type: v.getUint16(6),
        cookie: v.getUint32(12),
        offset: getU64(v, 16),
        payload: await this.read(getU64(v, 24)),
      };
    }
    throw new Error(`unexpected reply magic 0x${magic.toString(16)}`);
  }

  /** Reads chunks until one has the DONE flag (or a simple reply arrives). */
  async replies(readLength = 0): Promise<RawReply[]> {
    const out: RawReply[] = [];
    while (true) {
      const r = await this.reply(readLength);
      out.push(r);
      if (r.kind === "simple" || r.flags & C.NBD_REPLY_FLAG_DONE) return out;
    }
  }

  /** Closes the connection. */
  close(): void {
    try {
      this.conn.close();
    } catch { /* already closed */ }
  }
}

/** The error number of a reply: simple errno, or the errno in an error chunk, or 0. */
export function replyErrno(replies: RawReply[]): number {
  for (const r of replies) {
    if (r.kind === "simple") return r.errno;
    if (r.type & C.NBD_REPLY_TYPE_ERROR_BIT) {
      return new DataView(r.payload.buffer, r.payload.byteOffset).getUint32(0);
    }
  }
  return 0;
}
