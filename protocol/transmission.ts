/**
 * Encoding and decoding of the transmission phase: request headers (compact
 * and extended), simple replies, structured and extended reply chunks and
 * their payloads. Functions write into caller-provided buffers so the hot
 * path allocates nothing it does not send.
 *
 * @module
 */

import {
  NBD_EXTENDED_REPLY_MAGIC,
  NBD_EXTENDED_REQUEST_MAGIC,
  NBD_REPLY_TYPE_ERROR_BIT,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
} from "./constants.ts";
import { ProtocolError } from "./errors.ts";
import { decodeString, encodeString, getU64, setU64 } from "./handshake.ts";

/** Size of a compact request header. */
export const COMPACT_REQUEST_SIZE = 28;
/** Size of an extended request header. */
export const EXTENDED_REQUEST_SIZE = 32;
/**
 * Room a writer leaves in front of write data so that a request header of
 * either size can be put there and both sent in one piece.
 */
export const WRITE_HEADROOM = EXTENDED_REQUEST_SIZE;
/** Size of a simple reply header. */
export const SIMPLE_REPLY_SIZE = 16;
/** Size of a structured reply chunk header. */
export const STRUCTURED_REPLY_SIZE = 20;
/** Size of an extended reply chunk header. */
export const EXTENDED_REPLY_SIZE = 32;

/** A transmission request header. Cookies are kept as two 32-bit halves. */
export interface RequestHeader {
  /** Command flags (NBD_CMD_FLAG_*). */
  flags: number;
  /** Command type (NBD_CMD_*). */
  type: number;
  /** High 32 bits of the cookie. */
  cookieHi: number;
  /** Low 32 bits of the cookie. */
  cookieLo: number;
  /** Offset; above 2^53 it is not a safe integer and must be rejected. */
  offset: number;
  /** Length (effect or payload length); above 2^53 likewise. */
  length: number;
  /**
   * The offset's exact high and low 32 bits, kept only when it is not a safe
   * integer: extended replies echo the request's offset bit for bit.
   */
  offsetBits?: [number, number];
}

/**
 * Decodes a request header at `pos`. Returns `undefined` if the magic is not
 * the one expected for the negotiated header style.
 */
export function decodeRequest(
  view: DataView,
  pos: number,
  extended: boolean,
): RequestHeader | undefined {
  const magic = view.getUint32(pos);
  if (extended) {
    if (magic !== NBD_EXTENDED_REQUEST_MAGIC) return undefined;
    const request: RequestHeader = {
      flags: view.getUint16(pos + 4),
      type: view.getUint16(pos + 6),
      cookieHi: view.getUint32(pos + 8),
      cookieLo: view.getUint32(pos + 12),
      offset: getU64(view, pos + 16),
      length: getU64(view, pos + 24),
    };
    if (!Number.isSafeInteger(request.offset)) {
      request.offsetBits = [view.getUint32(pos + 16), view.getUint32(pos + 20)];
    }
    return request;
  }
  if (magic !== NBD_REQUEST_MAGIC) return undefined;
  return {
    flags: view.getUint16(pos + 4),
    type: view.getUint16(pos + 6),
    cookieHi: view.getUint32(pos + 8),
    cookieLo: view.getUint32(pos + 12),
    offset: getU64(view, pos + 16),
    length: view.getUint32(pos + 24),
  };
}

/** Writes a request header at `pos`; returns its size. */
export function encodeRequest(
  view: DataView,
  pos: number,
  extended: boolean,
  request: RequestHeader,
): number {
  view.setUint32(pos, extended ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC);
  view.setUint16(pos + 4, request.flags);
  view.setUint16(pos + 6, request.type);
  view.setUint32(pos + 8, request.cookieHi);
  view.setUint32(pos + 12, request.cookieLo);
  setU64(view, pos + 16, request.offset);
  if (extended) {
    setU64(view, pos + 24, request.length);
    return EXTENDED_REQUEST_SIZE;
  }
  view.setUint32(pos + 24, request.length);
  return COMPACT_REQUEST_SIZE;
}

/** Writes a 16-byte simple reply header at `pos`. */
export function writeSimpleReply(
  view: DataView,
  pos: number,
  errno: number,
  cookieHi: number,
  cookieLo: number,
): void {
  view.setUint32(pos, NBD_SIMPLE_REPLY_MAGIC);
  view.setUint32(pos + 4, errno);
  view.setUint32(pos + 8, cookieHi);
  view.setUint32(pos + 12, cookieLo);
}

/**
 * Writes a structured (20-byte) or extended (32-byte) chunk header at `pos`
 * and returns its size. `offset` is only sent in extended headers, where it
 * echoes the request's offset.
 */
export function writeChunkHeader(
  view: DataView,
  pos: number,
  extended: boolean,
  flags: number,
  type: number,
  request: { cookieHi: number; cookieLo: number; offset: number; offsetBits?: [number, number] },
  payloadLength: number,
): number {
  if (extended) {
    view.setUint32(pos, NBD_EXTENDED_REPLY_MAGIC);
    view.setUint16(pos + 4, flags);
    view.setUint16(pos + 6, type);
    view.setUint32(pos + 8, request.cookieHi);
    view.setUint32(pos + 12, request.cookieLo);
    if (Number.isSafeInteger(request.offset)) setU64(view, pos + 16, request.offset);
    else {
      view.setUint32(pos + 16, request.offsetBits?.[0] ?? 0);
      view.setUint32(pos + 20, request.offsetBits?.[1] ?? 0);
    }
    setU64(view, pos + 24, payloadLength);
    return EXTENDED_REPLY_SIZE;
  }
  view.setUint32(pos, NBD_STRUCTURED_REPLY_MAGIC);
  view.setUint16(pos + 4, flags);
  view.setUint16(pos + 6, type);
  view.setUint32(pos + 8, request.cookieHi);
  view.setUint32(pos + 12, request.cookieLo);
  view.setUint32(pos + 16, payloadLength);
  return STRUCTURED_REPLY_SIZE;
}

/** Size of a chunk header for the negotiated style. */
export function chunkHeaderSize(extended: boolean): number {
  return extended ? EXTENDED_REPLY_SIZE : STRUCTURED_REPLY_SIZE;
}

/** A reply header as read by a client. */
export type ReplyHeader =
  | { kind: "simple"; errno: number; cookieHi: number; cookieLo: number }
  | {
    kind: "chunk";
    flags: number;
    type: number;
    cookieHi: number;
    cookieLo: number;
    length: number;
  };

/** Size of the reply header that starts with `magic`, or 0 if the magic is unknown. */
export function replyHeaderSize(magic: number): number {
  switch (magic) {
    case NBD_SIMPLE_REPLY_MAGIC:
      return SIMPLE_REPLY_SIZE;
    case NBD_STRUCTURED_REPLY_MAGIC:
      return STRUCTURED_REPLY_SIZE;
    case NBD_EXTENDED_REPLY_MAGIC:
      return EXTENDED_REPLY_SIZE;
    default:
      return 0;
  }
}

/** Decodes a complete reply header (its size given by `replyHeaderSize`). */
export function decodeReplyHeader(view: DataView, pos: number): ReplyHeader {
  const magic = view.getUint32(pos);
  const cookieHi = view.getUint32(pos + 8);
  const cookieLo = view.getUint32(pos + 12);
  switch (magic) {
    case NBD_SIMPLE_REPLY_MAGIC:
      return { kind: "simple", errno: view.getUint32(pos + 4), cookieHi, cookieLo };
    case NBD_STRUCTURED_REPLY_MAGIC:
      return {
        kind: "chunk",
        flags: view.getUint16(pos + 4),
        type: view.getUint16(pos + 6),
        cookieHi,
        cookieLo,
        length: view.getUint32(pos + 16),
      };
    case NBD_EXTENDED_REPLY_MAGIC: {
      const length = getU64(view, pos + 24);
      if (!Number.isSafeInteger(length)) throw new ProtocolError("reply chunk length is absurd");
      return {
        kind: "chunk",
        flags: view.getUint16(pos + 4),
        type: view.getUint16(pos + 6),
        cookieHi,
        cookieLo,
        length,
      };
    }
    default:
      throw new ProtocolError(`unknown reply magic 0x${magic.toString(16)}`);
  }
}

/** Whether a chunk type is an error chunk (bit 15 set). */
export function isErrorChunk(type: number): boolean {
  return (type & NBD_REPLY_TYPE_ERROR_BIT) !== 0;
}

/** Payload of an error chunk: error number, message and (ERROR_OFFSET) offset. */
export function encodeErrorPayload(errno: number, message: string, offset?: number): Uint8Array {
  const text = encodeString(message).subarray(0, 4096);
  const out = new Uint8Array(6 + text.length + (offset === undefined ? 0 : 8));
  const view = new DataView(out.buffer);
  view.setUint32(0, errno);
  view.setUint16(4, text.length);
  out.set(text, 6);
  if (offset !== undefined) setU64(view, 6 + text.length, offset);
  return out;
}

/** Decodes an error chunk payload. */
export function decodeErrorPayload(
  data: Uint8Array,
): { errno: number; message: string; offset?: number } {
  if (data.length < 6) throw new ProtocolError("error chunk shorter than 6 bytes");
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const errno = view.getUint32(0);
  const messageLength = view.getUint16(4);
  if (messageLength > data.length - 6) {
    throw new ProtocolError("error chunk message runs past the chunk");
  }
  const message = decodeString(data.subarray(6, 6 + messageLength));
  const rest = data.length - 6 - messageLength;
  if (rest >= 8) return { errno, message, offset: getU64(view, 6 + messageLength) };
  return { errno, message };
}

/** One block-status descriptor. */
export interface Extent {
  /** Length in bytes (never 0). */
  length: number;
  /** Status flags (NBD_STATE_* for base:allocation). */
  flags: number;
}

/**
 * Encodes a BLOCK_STATUS (32-bit) or BLOCK_STATUS_EXT (64-bit) chunk payload
 * for one context.
 */
export function encodeBlockStatusPayload(
  contextId: number,
  extents: readonly Extent[],
  extended: boolean,
): Uint8Array {
  if (extended) {
    const out = new Uint8Array(8 + 16 * extents.length);
    const view = new DataView(out.buffer);
    view.setUint32(0, contextId);
    view.setUint32(4, extents.length);
    extents.forEach((e, i) => {
      setU64(view, 8 + 16 * i, e.length);
      setU64(view, 16 + 16 * i, e.flags);
    });
    return out;
  }
  const out = new Uint8Array(4 + 8 * extents.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, contextId);
  extents.forEach((e, i) => {
    view.setUint32(4 + 8 * i, e.length);
    view.setUint32(8 + 8 * i, e.flags);
  });
  return out;
}

/** Decodes a BLOCK_STATUS or BLOCK_STATUS_EXT chunk payload. */
export function decodeBlockStatusPayload(
  data: Uint8Array,
  extended: boolean,
): { contextId: number; extents: Extent[] } {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (data.length < 4) throw new ProtocolError("block status chunk shorter than 4 bytes");
  const contextId = view.getUint32(0);
  const extents: Extent[] = [];
  if (extended) {
    if (data.length < 8) {
      throw new ProtocolError("extended block status chunk shorter than 8 bytes");
    }
    const count = view.getUint32(4);
    if (data.length !== 8 + 16 * count) {
      throw new ProtocolError("extended block status chunk length mismatch");
    }
    for (let i = 0; i < count; i++) {
      const length = getU64(view, 8 + 16 * i);
      if (!Number.isSafeInteger(length)) {
        throw new ProtocolError("block status extent length is absurd");
      }
      extents.push({ length, flags: view.getUint32(20 + 16 * i) });
    }
  } else {
    if ((data.length - 4) % 8 !== 0) {
      throw new ProtocolError("block status chunk length is not 4 + 8n");
    }
    for (let pos = 4; pos < data.length; pos += 8) {
      extents.push({ length: view.getUint32(pos), flags: view.getUint32(pos + 4) });
    }
  }
  if (extents.length === 0) throw new ProtocolError("block status chunk has no extents");
  return { contextId, extents };
}
