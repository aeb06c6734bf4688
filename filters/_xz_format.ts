/**
 * The .xz container: stream headers and footers, the index (where every
 * block starts and how big it is), block headers and checks. Blocks are
 * decoded one at a time with the LZMA2 decoder, which is what makes random
 * access possible.
 *
 * @module
 */

import { decodeLzma2, LzmaError } from "./_lzma2.ts";

/** One block of an .xz file. */
export interface XzBlock {
  /** Offset of the block header in the compressed file. */
  compressedOffset: number;
  /** Block header + compressed data + check, without the padding. */
  unpaddedSize: number;
  /** Offset of the block's data in the uncompressed file. */
  uncompressedOffset: number;
  /** Uncompressed size. */
  uncompressedSize: number;
  /** Check type of the stream holding it. */
  check: number;
}

/** Reads bytes of the compressed file. */
export type ReadAt = (offset: number, length: number) => Promise<Uint8Array>;

const HEADER_MAGIC = [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];
const FOOTER_MAGIC = [0x59, 0x5a];

const CRC32_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[i] = c >>> 0;
  }
  return table;
})();

/** CRC-32 (as in xz, gzip and zip). */
export function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC32_TABLE[(c ^ bytes[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** CRC-64 tables (ECMA-182 polynomial, reflected) split into 32-bit halves. */
const CRC64_TABLES = (() => {
  const lo = new Uint32Array(256);
  const hi = new Uint32Array(256);
  const polyLo = 0xd7870f42;
  const polyHi = 0xc96c5795;
  for (let i = 0; i < 256; i++) {
    let l = i;
    let h = 0;
    for (let k = 0; k < 8; k++) {
      const odd = l & 1;
      l = ((l >>> 1) | ((h & 1) << 31)) >>> 0;
      h = h >>> 1;
      if (odd) {
        l = (l ^ polyLo) >>> 0;
        h = (h ^ polyHi) >>> 0;
      }
    }
    lo[i] = l;
    hi[i] = h;
  }
  return { lo, hi };
})();

/** CRC-64 as xz computes it, as [high, low] 32-bit halves. */
export function crc64(bytes: Uint8Array): [number, number] {
  const { lo: tLo, hi: tHi } = CRC64_TABLES;
  let l = 0xffffffff;
  let h = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) {
    const idx = (l ^ bytes[i]!) & 0xff;
    l = (((l >>> 8) | (h << 24)) ^ tLo[idx]!) >>> 0;
    h = ((h >>> 8) ^ tHi[idx]!) >>> 0;
  }
  return [(h ^ 0xffffffff) >>> 0, (l ^ 0xffffffff) >>> 0];
}

/** Size in bytes of the check of each check type. */
function checkSize(check: number): number {
  if (check === 0) return 0;
  return 4 << Math.floor((check - 1) / 3);
}

function u32le(bytes: Uint8Array, at: number): number {
  return (bytes[at]! | (bytes[at + 1]! << 8) | (bytes[at + 2]! << 16) | (bytes[at + 3]! << 24)) >>>
    0;
}

/** Reads a multibyte integer (7 bits per byte, little end first). */
function varint(bytes: Uint8Array, pos: { at: number }): number {
  let value = 0;
  for (let i = 0; i < 9; i++) {
    if (pos.at >= bytes.length) throw new LzmaError("truncated integer");
    const b = bytes[pos.at++]!;
    value += (b & 0x7f) * 2 ** (7 * i);
    if ((b & 0x80) === 0) {
      if (!Number.isSafeInteger(value)) throw new LzmaError("integer too large");
      return value;
    }
  }
  throw new LzmaError("integer longer than 9 bytes");
}

function matches(bytes: Uint8Array, at: number, magic: number[]): boolean {
  return magic.every((b, i) => bytes[at + i] === b);
}

/**
 * Reads the index of an .xz file of `size` bytes, walking its streams from
 * the end. Returns the blocks in uncompressed order.
 */
export async function readXzIndex(readAt: ReadAt, size: number): Promise<XzBlock[]> {
  const streams: XzBlock[][] = [];
  let end = size;
  while (end > 0) {
    // Stream padding: zero bytes in groups of four.
    while (end >= 4) {
      const tail = await readAt(end - 4, 4);
      if (u32le(tail, 0) !== 0) break;
      end -= 4;
    }
    if (end < 24) throw new LzmaError("not an xz file (too short)");
    const footer = await readAt(end - 12, 12);
    if (!matches(footer, 10, FOOTER_MAGIC)) throw new LzmaError("not an xz file (no footer magic)");
    if (crc32(footer.subarray(4, 10)) !== u32le(footer, 0)) {
      throw new LzmaError("xz stream footer is corrupt");
    }
    const check = footer[9]! & 0x0f;
    const indexSize = (u32le(footer, 4) + 1) * 4;
    const indexStart = end - 12 - indexSize;
    if (indexStart < 12) throw new LzmaError("xz index lies outside the file");
    const index = await readAt(indexStart, indexSize);
    if (index[0] !== 0) throw new LzmaError("xz index indicator missing");
    if (crc32(index.subarray(0, indexSize - 4)) !== u32le(index, indexSize - 4)) {
      throw new LzmaError("xz index is corrupt");
    }
    const pos = { at: 1 };
    const count = varint(index, pos);
    const records: Array<{ unpadded: number; uncompressed: number }> = [];
    let blocksSize = 0;
    for (let i = 0; i < count; i++) {
      const unpadded = varint(index, pos);
      const uncompressed = varint(index, pos);
      records.push({ unpadded, uncompressed });
      blocksSize += Math.ceil(unpadded / 4) * 4;
    }
    const streamStart = indexStart - blocksSize - 12;
    if (streamStart < 0) throw new LzmaError("xz blocks lie outside the file");
    const header = await readAt(streamStart, 12);
    if (!matches(header, 0, HEADER_MAGIC)) throw new LzmaError("xz stream header not found");
    if (header[7] !== footer[9] || header[6] !== footer[8]) {
      throw new LzmaError("xz stream header and footer disagree");
    }
    let at = streamStart + 12;
    const blocks: XzBlock[] = [];
    for (const r of records) {
      blocks.push({
        compressedOffset: at,
        unpaddedSize: r.unpadded,
        uncompressedOffset: 0,
        uncompressedSize: r.uncompressed,
        check,
      });
      at += Math.ceil(r.unpadded / 4) * 4;
    }
    streams.unshift(blocks);
    end = streamStart;
  }
  const all = streams.flat();
  let offset = 0;
  for (const block of all) {
    block.uncompressedOffset = offset;
    offset += block.uncompressedSize;
  }
  return all;
}

/** Decodes one block (read from the file) into its uncompressed bytes, verifying its check. */
export async function decodeXzBlock(readAt: ReadAt, block: XzBlock): Promise<Uint8Array> {
  // The check follows the block padding, so read the padded size.
  const raw = await readAt(block.compressedOffset, Math.ceil(block.unpaddedSize / 4) * 4);
  const headerSize = (raw[0]! + 1) * 4;
  if (raw[0] === 0 || headerSize > raw.length) throw new LzmaError("bad xz block header");
  if (crc32(raw.subarray(0, headerSize - 4)) !== u32le(raw, headerSize - 4)) {
    throw new LzmaError("xz block header is corrupt");
  }
  const flags = raw[1]!;
  const filters = (flags & 3) + 1;
  const pos = { at: 2 };
  if (flags & 0x40) varint(raw, pos); // compressed size
  if (flags & 0x80) {
    const size = varint(raw, pos);
    if (size !== block.uncompressedSize) throw new LzmaError("xz block header and index disagree");
  }
  for (let i = 0; i < filters; i++) {
    const id = varint(raw, pos);
    const propsSize = varint(raw, pos);
    pos.at += propsSize;
    if (id !== 0x21 || i !== filters - 1) {
      throw new LzmaError(
        `xz filter 0x${id.toString(16)} is not supported (only LZMA2 without BCJ/delta)`,
      );
    }
  }
  const checkLength = checkSize(block.check);
  const data = raw.subarray(headerSize, raw.length - checkLength);
  const out = new Uint8Array(block.uncompressedSize);
  decodeLzma2(data, out);
  const stored = raw.subarray(raw.length - checkLength);
  if (block.check === 1) {
    if (crc32(out) !== u32le(stored, 0)) throw new LzmaError("xz block fails its CRC32 check");
  } else if (block.check === 4) {
    const [h, l] = crc64(out);
    if (l !== u32le(stored, 0) || h !== u32le(stored, 4)) {
      throw new LzmaError("xz block fails its CRC64 check");
    }
  } else if (block.check === 10) {
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", out));
    if (!digest.every((b, i) => b === stored[i])) {
      throw new LzmaError("xz block fails its SHA-256 check");
    }
  }
  return out;
}
