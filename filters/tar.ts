/**
 * The `tar` filter: serves one member of a tar archive (ustar, GNU long
 * names, pax extended headers) as the disk. Only the headers before the
 * member are read to find it, so over http only those ranges travel. A
 * member is stored as plain bytes, so it is writable in place when the
 * layer below is; its size cannot change. Sparse members (GNU tar's old
 * format and its pax formats 0.0, 0.1 and 1.0, which bsdtar writes too)
 * are served read-only at their full size, the holes reading as zeroes and
 * reported as holes.
 *
 * ```
 * nbd serve --filter=tar file appliance.ova tar-entry=disk1.vmdk
 * nbd serve --filter=tar http https://example.com/images.tar tar-entry=disk.img
 * ```
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import type { Backend, Filter } from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";
import { WindowBackend } from "./offset.ts";
import { parseSparseMap, SparseMemberBackend, type SparseSegment } from "./_tar_sparse.ts";

const BLOCK = 512;
/** Longest GNU long name or pax header accepted (they are read into memory). */
const MAX_META = 1 << 20;

/** Where a member's data lies in the archive. */
export interface TarMember {
  /** Offset of the first data byte. */
  offset: number;
  /** Length of the data. */
  size: number;
  /** For a sparse member: its full size and where its stored pieces go. */
  sparse?: { realSize: number; segments: SparseSegment[] };
}

function cString(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  return new TextDecoder().decode(end < 0 ? bytes : bytes.subarray(0, end));
}

/** A numeric header field: octal text, or base-256 when the top bit of the first byte is set. */
function numeric(field: Uint8Array, what: string, at: number): number {
  if (field[0]! & 0x80) {
    let n = field[0]! & 0x7f;
    for (let i = 1; i < field.length; i++) n = n * 256 + field[i]!;
    if (!Number.isSafeInteger(n)) throw corrupt(at, `${what} is too large`);
    return n;
  }
  const text = cString(field).trim();
  if (text === "") return 0;
  if (!/^[0-7]+$/.test(text)) throw corrupt(at, `the ${what} field is not octal`);
  return parseInt(text, 8);
}

function corrupt(at: number, why: string): NbdError {
  return new NbdError("EINVAL", `tar: not a valid tar header at offset ${at}: ${why}`);
}

/**
 * The records of a pax extended header (`LEN key=value\n` each), in order:
 * keys may repeat (GNU sparse format 0.0), and the last value wins.
 */
function paxRecords(data: Uint8Array, at: number): Array<[string, string]> {
  const records: Array<[string, string]> = [];
  let i = 0;
  while (i < data.length && data[i] !== 0) {
    let space = i;
    while (space < data.length && data[space] !== 0x20) space++;
    const length = Number(new TextDecoder().decode(data.subarray(i, space)));
    if (!Number.isInteger(length) || length <= space - i + 1 || i + length > data.length) {
      throw corrupt(at, "bad pax record");
    }
    const record = new TextDecoder().decode(data.subarray(space + 1, i + length - 1));
    const eq = record.indexOf("=");
    if (eq < 0) throw corrupt(at, "bad pax record");
    records.push([record.slice(0, eq), record.slice(eq + 1)]);
    i += length;
  }
  return records;
}

function normalize(name: string): string {
  return name.replace(/^(\.\/)+/, "").replace(/\/+$/, "");
}

/** A decimal number of a GNU sparse pax record or map. */
function decimal(text: string | undefined, what: string, at: number): number {
  if (text === undefined || !/^\d+$/.test(text) || !Number.isSafeInteger(Number(text))) {
    throw corrupt(at, `bad sparse ${what}${text === undefined ? " (missing)" : ""}`);
  }
  return Number(text);
}

/** Pairs of numbers (offset, length) as sparse map segments. */
function pairs(numbers: number[]): Array<{ offset: number; length: number }> {
  const out = [];
  for (let i = 0; i + 1 < numbers.length; i += 2) {
    out.push({ offset: numbers[i]!, length: numbers[i + 1]! });
  }
  return out;
}

/**
 * A member of type 'S' (GNU tar's own format): four map entries in the
 * header, then 512-byte extension blocks of 21 entries while the
 * "extended" byte is set; the stored pieces follow the last block.
 */
async function oldGnuSparseMap(
  disk: Backend,
  header: Uint8Array,
  at: number,
  archiveSize: number,
): Promise<{ entries: number[]; realSize: number; dataOffset: number }> {
  const entries: number[] = [];
  const take = (block: Uint8Array, start: number, count: number) => {
    for (let i = 0; i < count; i++) {
      const field = block.subarray(start + i * 24, start + i * 24 + 24);
      if (field[0] === 0) break;
      entries.push(
        numeric(field.subarray(0, 12), "sparse offset", at),
        numeric(field.subarray(12, 24), "sparse length", at),
      );
    }
  };
  take(header, 386, 4);
  const realSize = numeric(header.subarray(483, 495), "real size", at);
  let extended = header[482] !== 0;
  let dataOffset = at + BLOCK;
  const block = new Uint8Array(BLOCK);
  while (extended) {
    if (dataOffset + BLOCK > archiveSize || dataOffset - at > MAX_META) {
      throw corrupt(at, "the sparse map runs past the end of the archive");
    }
    await disk.pread(block, dataOffset);
    take(block, 0, 21);
    extended = block[504] !== 0;
    dataOffset += BLOCK;
  }
  return { entries, realSize, dataOffset };
}

/** The member an old GNU sparse header describes, its data at `dataOffset`. */
async function oldGnuSparse(
  disk: Backend,
  header: Uint8Array,
  at: number,
  storedSize: number,
  archiveSize: number,
): Promise<TarMember> {
  const { entries, realSize, dataOffset } = await oldGnuSparseMap(disk, header, at, archiveSize);
  if (dataOffset + storedSize > archiveSize) {
    throw corrupt(at, "the sparse member extends beyond the end of the archive");
  }
  return {
    offset: dataOffset,
    size: storedSize,
    sparse: { realSize, segments: parseSparseMap(pairs(entries), realSize, storedSize, at) },
  };
}

/**
 * A pax member with GNU.sparse records: format 0.0 (repeated offset and
 * numbytes records), 0.1 (one map record) or 1.0 (the map as decimal lines
 * at the start of the data, padded to a block).
 */
async function paxSparse(
  disk: Backend,
  pax: Map<string, string>,
  records: Array<[string, string]>,
  at: number,
  dataOffset: number,
  storedSize: number,
): Promise<TarMember> {
  const realSize = decimal(
    pax.get("GNU.sparse.realsize") ?? pax.get("GNU.sparse.size"),
    "real size",
    at,
  );
  let numbers: number[];
  let mapBytes = 0;
  if (pax.get("GNU.sparse.major") === "1") {
    if (pax.get("GNU.sparse.minor") !== "0") {
      throw new NbdError(
        "ENOTSUP",
        `tar: sparse format 1.${pax.get("GNU.sparse.minor")} is not supported`,
      );
    }
    // The map: a count, then offset and length per segment, one number a line.
    numbers = [];
    let count: number | undefined;
    let text = "";
    const chunk = new Uint8Array(BLOCK);
    while (count === undefined || numbers.length < 2 * count) {
      if (mapBytes >= storedSize || mapBytes >= MAX_META) {
        throw corrupt(at, "the sparse map does not end");
      }
      await disk.pread(chunk, dataOffset + mapBytes);
      mapBytes += BLOCK;
      text += new TextDecoder().decode(chunk);
      const lines = text.split("\n");
      text = lines.pop()!;
      for (const line of lines) {
        const n = decimal(line, "map", at);
        if (count === undefined) count = n;
        else if (numbers.length < 2 * count) numbers.push(n);
      }
    }
  } else if (pax.has("GNU.sparse.map")) {
    numbers = pax.get("GNU.sparse.map")!.split(",").map((n) => decimal(n, "map", at));
  } else {
    numbers = records
      .filter(([key]) => key === "GNU.sparse.offset" || key === "GNU.sparse.numbytes")
      .map(([, value]) => decimal(value, "map", at));
  }
  if (numbers.length % 2 !== 0) throw corrupt(at, "the sparse map has an odd count");
  const stored = storedSize - mapBytes;
  return {
    offset: dataOffset + mapBytes,
    size: stored,
    sparse: { realSize, segments: parseSparseMap(pairs(numbers), realSize, stored, at) },
  };
}

/**
 * Finds member `entry` in the archive `disk` by reading the headers in
 * order, no further than `limit` bytes (0: the whole archive).
 */
async function findTarMember(
  disk: Backend,
  entry: string,
  limit: number,
): Promise<TarMember> {
  const wanted = normalize(entry);
  const size = disk.size();
  const end = limit > 0 ? Math.min(limit, size) : size;
  const header = new Uint8Array(BLOCK);
  let offset = 0;
  let longName: string | undefined;
  let paxList: Array<[string, string]> = [];
  let pax = new Map<string, string>();
  const readMeta = async (at: number, length: number) => {
    if (length > MAX_META) throw corrupt(at, `a ${length}-byte extended header is too large`);
    if (at + length > size) throw corrupt(at, "the archive ends inside an extended header");
    const data = new Uint8Array(length);
    await disk.pread(data, at);
    return data;
  };
  for (;;) {
    if (offset + BLOCK > end) {
      const where = end < size ? `in the first ${limit} bytes (tar-limit)` : "in the archive";
      throw new NbdError("EINVAL", `tar: no entry named "${entry}" ${where}`);
    }
    await disk.pread(header, offset);
    if (header.every((b) => b === 0)) {
      throw new NbdError("EINVAL", `tar: no entry named "${entry}" in the archive`);
    }
    let sum = 0;
    for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : header[i]!;
    let stored: number | undefined;
    try {
      stored = numeric(header.subarray(148, 156), "checksum", offset);
    } catch {
      stored = undefined;
    }
    if (stored !== sum) {
      throw corrupt(offset, "bad checksum (not a tar archive?)");
    }
    const type = String.fromCharCode(header[156]!);
    // An old GNU sparse member's map may go on in extension blocks before its data.
    const dataOffset = type === "S"
      ? (await oldGnuSparseMap(disk, header, offset, size)).dataOffset
      : offset + BLOCK;
    const paxSize = pax.get("size");
    const dataSize = paxSize !== undefined && /^\d+$/.test(paxSize)
      ? Number(paxSize)
      : numeric(header.subarray(124, 136), "size", offset);
    const next = dataOffset + Math.ceil(dataSize / BLOCK) * BLOCK;
    if (type === "L") {
      longName = cString(await readMeta(dataOffset, dataSize));
    } else if (type === "x") {
      paxList = paxRecords(await readMeta(dataOffset, dataSize), offset);
      pax = new Map(paxList);
    } else if (type === "g" || type === "K") {
      // Global pax headers and GNU long link names do not name members.
    } else {
      const magic = cString(header.subarray(257, 263));
      const prefix = magic === "ustar" ? cString(header.subarray(345, 500)) : "";
      const short = cString(header.subarray(0, 100));
      const name = pax.get("GNU.sparse.name") ?? pax.get("path") ?? longName ??
        (prefix ? `${prefix}/${short}` : short);
      if (normalize(name) === wanted) {
        if (type !== "0" && type !== "\0" && type !== "7" && type !== "S") {
          throw new NbdError("EINVAL", `tar: "${entry}" is not a regular file (type '${type}')`);
        }
        if (dataOffset + dataSize > size) {
          throw corrupt(offset, `"${entry}" extends beyond the end of the archive`);
        }
        if (type === "S") {
          return await oldGnuSparse(disk, header, offset, dataSize, size);
        }
        if (paxList.some(([key]) => key.startsWith("GNU.sparse."))) {
          return await paxSparse(disk, pax, paxList, offset, dataOffset, dataSize);
        }
        return { offset: dataOffset, size: dataSize };
      }
      longName = undefined;
      paxList = [];
      pax = new Map();
    }
    offset = next;
  }
}

/** The tar filter. */
export const tarFilter: Filter = {
  name: "tar",
  summary: "serve one member of a tar archive (read-write when the layer below is and " +
    "the member is not sparse)",
  description: "Examples:\n  nbd serve --filter=tar file appliance.ova tar-entry=disk1.vmdk\n" +
    "  nbd serve --filter=tar http https://example.com/images.tar tar-entry=disk.img",
  params: [
    {
      name: "tar-entry",
      value: "NAME",
      type: "string",
      description: "the member to serve, as tar -t lists it (a leading ./ is ignored)",
      required: true,
    },
    {
      name: "tar-limit",
      value: "SIZE",
      type: "size",
      default: "0",
      description: "give up when the member's header is not within the first SIZE bytes " +
        "(0: no limit)",
    },
  ],
  create(params) {
    const entry = params.take("tar-entry");
    if (entry === undefined || entry === "") {
      throw new UsageError("tar: missing required parameter tar-entry=");
    }
    const limit = params.takeSize("tar-limit") ?? 0;
    // The archive does not move under us: one search serves every connection.
    const found = new Map<string, Promise<TarMember>>();
    return Promise.resolve({
      async wrap(next, context) {
        let member = found.get(context.exportName);
        if (!member) {
          member = findTarMember(next, entry, limit);
          found.set(context.exportName, member);
          member.catch(() => found.delete(context.exportName));
        }
        const { offset, size, sparse } = await member;
        if (sparse) {
          return new SparseMemberBackend(next, offset, sparse.realSize, sparse.segments);
        }
        return new WindowBackend(next, offset, size);
      },
    });
  },
};
