/**
 * Encoding and decoding of the handshake phase: greeting, option requests,
 * option replies, NBD_INFO_* items and metadata context queries. Pure
 * functions over bytes; no I/O.
 *
 * @module
 */

import {
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_INIT_MAGIC,
  NBD_OPTS_MAGIC,
  NBD_REP_MAGIC,
} from "./constants.ts";
import { ProtocolError } from "./errors.ts";

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

/** Longest string (export name, description, context name) the protocol allows. */
export const MAX_STRING_LENGTH = 4096;

/** Size of an option request header. */
export const OPTION_HEADER_SIZE = 16;
/** Size of an option reply header. */
export const OPTION_REPLY_HEADER_SIZE = 20;

/** Encodes a UTF-8 string. */
export function encodeString(text: string): Uint8Array {
  return encoder.encode(text);
}

/** Decodes a UTF-8 string, throwing `ProtocolError` on malformed bytes. */
export function decodeString(bytes: Uint8Array): string {
  try {
    return strictDecoder.decode(bytes);
  } catch {
    throw new ProtocolError("string is not valid UTF-8");
  }
}

/** Reads a big-endian u64 as a number; values above 2^53 come out unsafe (check with Number.isSafeInteger). */
export function getU64(view: DataView, offset: number): number {
  return view.getUint32(offset) * 0x1_0000_0000 + view.getUint32(offset + 4);
}

/** Writes a number as a big-endian u64. */
export function setU64(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, Math.floor(value / 0x1_0000_0000));
  view.setUint32(offset + 4, value >>> 0);
}

function dataView(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** The 18-byte newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags. */
export function encodeGreeting(handshakeFlags: number): Uint8Array {
  const out = new Uint8Array(18);
  const view = dataView(out);
  view.setBigUint64(0, NBD_INIT_MAGIC);
  view.setBigUint64(8, NBD_OPTS_MAGIC);
  view.setUint16(16, handshakeFlags);
  return out;
}

/** An option request header as read from the wire. */
export interface OptionHeader {
  /** Whether the magic was IHAVEOPT. */
  magicOk: boolean;
  /** Option number. */
  option: number;
  /** Length of the data that follows. */
  length: number;
}

/** Decodes the 16-byte header of an option request. */
export function decodeOptionHeader(bytes: Uint8Array): OptionHeader {
  const view = dataView(bytes);
  return {
    magicOk: view.getBigUint64(0) === NBD_OPTS_MAGIC,
    option: view.getUint32(8),
    length: view.getUint32(12),
  };
}

/** Encodes an option request: header and data in one buffer. */
export function encodeOptionRequest(
  option: number,
  data: Uint8Array = new Uint8Array(),
): Uint8Array {
  const out = new Uint8Array(OPTION_HEADER_SIZE + data.length);
  const view = dataView(out);
  view.setBigUint64(0, NBD_OPTS_MAGIC);
  view.setUint32(8, option);
  view.setUint32(12, data.length);
  out.set(data, OPTION_HEADER_SIZE);
  return out;
}

/** Encodes an option reply: header and data in one buffer. */
export function encodeOptionReply(
  option: number,
  type: number,
  data: Uint8Array = new Uint8Array(),
): Uint8Array {
  const out = new Uint8Array(OPTION_REPLY_HEADER_SIZE + data.length);
  const view = dataView(out);
  view.setBigUint64(0, NBD_REP_MAGIC);
  view.setUint32(8, option);
  view.setUint32(12, type);
  view.setUint32(16, data.length);
  out.set(data, OPTION_REPLY_HEADER_SIZE);
  return out;
}

/** An option reply header as read from the wire. */
export interface OptionReplyHeader {
  /** Whether the magic was the option reply magic. */
  magicOk: boolean;
  /** The option being answered. */
  option: number;
  /** Reply type (NBD_REP_*). */
  type: number;
  /** Length of the data that follows. */
  length: number;
}

/** Decodes the 20-byte header of an option reply. */
export function decodeOptionReplyHeader(bytes: Uint8Array): OptionReplyHeader {
  const view = dataView(bytes);
  return {
    magicOk: view.getBigUint64(0) === NBD_REP_MAGIC,
    option: view.getUint32(8),
    type: view.getUint32(12),
    length: view.getUint32(16),
  };
}

/** The reply to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zeroes. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Uint8Array {
  const out = new Uint8Array(noZeroes ? 10 : 134);
  const view = dataView(out);
  setU64(view, 0, size);
  view.setUint16(8, flags);
  return out;
}

/** Data of an NBD_OPT_INFO / NBD_OPT_GO request. */
export interface InfoRequest {
  /** Export name ("" = default export). */
  name: string;
  /** Requested NBD_INFO_* types. */
  infos: number[];
}

/** Encodes the data of NBD_OPT_INFO / NBD_OPT_GO. */
export function encodeInfoRequest(request: InfoRequest): Uint8Array {
  const name = encodeString(request.name);
  const out = new Uint8Array(4 + name.length + 2 + 2 * request.infos.length);
  const view = dataView(out);
  view.setUint32(0, name.length);
  out.set(name, 4);
  view.setUint16(4 + name.length, request.infos.length);
  request.infos.forEach((info, i) => view.setUint16(6 + name.length + 2 * i, info));
  return out;
}

/** Decodes the data of NBD_OPT_INFO / NBD_OPT_GO; throws `ProtocolError` if malformed. */
export function decodeInfoRequest(data: Uint8Array): InfoRequest {
  if (data.length < 6) throw new ProtocolError("INFO/GO data is shorter than 6 bytes");
  const view = dataView(data);
  const nameLength = view.getUint32(0);
  if (nameLength > data.length - 6) {
    throw new ProtocolError("INFO/GO export name length runs past the option data");
  }
  if (nameLength > MAX_STRING_LENGTH) throw new ProtocolError("export name is too long");
  const name = decodeString(data.subarray(4, 4 + nameLength));
  const count = view.getUint16(4 + nameLength);
  if (data.length !== 6 + nameLength + 2 * count) {
    throw new ProtocolError("INFO/GO information request count does not match the option length");
  }
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(view.getUint16(6 + nameLength + 2 * i));
  return { name, infos };
}

/** Block-size constraints: minimum, preferred and maximum payload. */
export interface BlockSize {
  /** Smallest addressable unit (power of 2, 1..65536). */
  minimum: number;
  /** Preferred I/O size (power of 2, ≥ 512). */
  preferred: number;
  /** Largest payload per request. */
  maximum: number;
}

/** NBD_INFO_EXPORT payload (reply data of NBD_REP_INFO). */
export function encodeInfoExport(size: number, flags: number): Uint8Array {
  const out = new Uint8Array(12);
  const view = dataView(out);
  view.setUint16(0, NBD_INFO_EXPORT);
  setU64(view, 2, size);
  view.setUint16(10, flags);
  return out;
}

/** NBD_INFO_NAME or NBD_INFO_DESCRIPTION payload. */
export function encodeInfoString(
  type: typeof NBD_INFO_NAME | typeof NBD_INFO_DESCRIPTION,
  text: string,
): Uint8Array {
  const bytes = encodeString(text);
  const out = new Uint8Array(2 + bytes.length);
  dataView(out).setUint16(0, type);
  out.set(bytes, 2);
  return out;
}

/** NBD_INFO_BLOCK_SIZE payload. */
export function encodeInfoBlockSize(blockSize: BlockSize): Uint8Array {
  const out = new Uint8Array(14);
  const view = dataView(out);
  view.setUint16(0, NBD_INFO_BLOCK_SIZE);
  view.setUint32(2, blockSize.minimum);
  view.setUint32(6, blockSize.preferred);
  view.setUint32(10, blockSize.maximum);
  return out;
}

/** One decoded NBD_REP_INFO item. */
export type InfoReply =
  | { type: typeof NBD_INFO_EXPORT; size: number; flags: number }
  | { type: typeof NBD_INFO_NAME; name: string }
  | { type: typeof NBD_INFO_DESCRIPTION; description: string }
  | { type: typeof NBD_INFO_BLOCK_SIZE; blockSize: BlockSize }
  | { type: number; unknown: true };

/** Decodes the data of an NBD_REP_INFO reply; throws `ProtocolError` if malformed. */
export function decodeInfoReply(data: Uint8Array): InfoReply {
  if (data.length < 2) throw new ProtocolError("NBD_REP_INFO shorter than 2 bytes");
  const view = dataView(data);
  const type = view.getUint16(0);
  switch (type) {
    case NBD_INFO_EXPORT: {
      if (data.length !== 12) throw new ProtocolError("NBD_INFO_EXPORT must be 12 bytes");
      const size = getU64(view, 2);
      if (!Number.isSafeInteger(size)) {
        throw new ProtocolError("export size is larger than 2^53 bytes, which is not supported");
      }
      return { type, size, flags: view.getUint16(10) };
    }
    case NBD_INFO_NAME:
      return { type, name: decodeString(data.subarray(2)) };
    case NBD_INFO_DESCRIPTION:
      return { type, description: decodeString(data.subarray(2)) };
    case NBD_INFO_BLOCK_SIZE:
      if (data.length !== 14) throw new ProtocolError("NBD_INFO_BLOCK_SIZE must be 14 bytes");
      return {
        type,
        blockSize: {
          minimum: view.getUint32(2),
          preferred: view.getUint32(6),
          maximum: view.getUint32(10),
        },
      };
    default:
      return { type, unknown: true };
  }
}

/** Data of an NBD_REP_SERVER reply (one export of a LIST). */
export function encodeServerReply(name: string, description = ""): Uint8Array {
  const nameBytes = encodeString(name);
  const descriptionBytes = encodeString(description);
  const out = new Uint8Array(4 + nameBytes.length + descriptionBytes.length);
  dataView(out).setUint32(0, nameBytes.length);
  out.set(nameBytes, 4);
  out.set(descriptionBytes, 4 + nameBytes.length);
  return out;
}

/** Decodes an NBD_REP_SERVER reply into the export name and description. */
export function decodeServerReply(data: Uint8Array): { name: string; description: string } {
  if (data.length < 4) throw new ProtocolError("NBD_REP_SERVER shorter than 4 bytes");
  const nameLength = dataView(data).getUint32(0);
  if (nameLength > data.length - 4) {
    throw new ProtocolError("NBD_REP_SERVER name runs past the reply");
  }
  return {
    name: decodeString(data.subarray(4, 4 + nameLength)),
    description: decodeString(data.subarray(4 + nameLength)),
  };
}

/** Data of a LIST_META_CONTEXT / SET_META_CONTEXT request. */
export interface MetaContextQuery {
  /** Export the contexts are for. */
  exportName: string;
  /** Queries, each "namespace:leaf" (or a namespace wildcard such as "base:"). */
  queries: string[];
}

/** Encodes the data of LIST_META_CONTEXT / SET_META_CONTEXT. */
export function encodeMetaContextQuery(query: MetaContextQuery): Uint8Array {
  const name = encodeString(query.exportName);
  const items = query.queries.map(encodeString);
  const out = new Uint8Array(8 + name.length + items.reduce((n, q) => n + 4 + q.length, 0));
  const view = dataView(out);
  view.setUint32(0, name.length);
  out.set(name, 4);
  view.setUint32(4 + name.length, items.length);
  let pos = 8 + name.length;
  for (const item of items) {
    view.setUint32(pos, item.length);
    out.set(item, pos + 4);
    pos += 4 + item.length;
  }
  return out;
}

/** Decodes a metadata context query; throws `ProtocolError` if any length runs past the data. */
export function decodeMetaContextQuery(data: Uint8Array): MetaContextQuery {
  const view = dataView(data);
  if (data.length < 8) throw new ProtocolError("meta context query shorter than 8 bytes");
  const nameLength = view.getUint32(0);
  if (nameLength > data.length - 8) {
    throw new ProtocolError("meta context export name runs past the option data");
  }
  if (nameLength > MAX_STRING_LENGTH) throw new ProtocolError("export name is too long");
  const exportName = decodeString(data.subarray(4, 4 + nameLength));
  const count = view.getUint32(4 + nameLength);
  let pos = 8 + nameLength;
  // Each query needs at least its 4-byte length, so a count larger than the
  // remaining data is malformed: this bounds the work before any allocation.
  if (count > (data.length - pos) / 4) {
    throw new ProtocolError("meta context query count runs past the option data");
  }
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.length) {
      throw new ProtocolError("meta context query runs past the option data");
    }
    const length = view.getUint32(pos);
    if (length > data.length - pos - 4) {
      throw new ProtocolError("meta context query runs past the option data");
    }
    if (length > MAX_STRING_LENGTH) throw new ProtocolError("meta context query is too long");
    queries.push(decodeString(data.subarray(pos + 4, pos + 4 + length)));
    pos += 4 + length;
  }
  if (pos !== data.length) throw new ProtocolError("meta context query has trailing bytes");
  return { exportName, queries };
}

/** Data of an NBD_REP_META_CONTEXT reply. */
export function encodeMetaContextReply(id: number, name: string): Uint8Array {
  const nameBytes = encodeString(name);
  const out = new Uint8Array(4 + nameBytes.length);
  dataView(out).setUint32(0, id);
  out.set(nameBytes, 4);
  return out;
}

/** Decodes an NBD_REP_META_CONTEXT reply. */
export function decodeMetaContextReply(data: Uint8Array): { id: number; name: string } {
  if (data.length < 4) throw new ProtocolError("NBD_REP_META_CONTEXT shorter than 4 bytes");
  return { id: dataView(data).getUint32(0), name: decodeString(data.subarray(4)) };
}
