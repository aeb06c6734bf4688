/**
 * The `tar` filter: serves one member of a tar archive (ustar, GNU long
 * names, pax extended headers) as the disk. Only the headers before the
 * member are read to find it, so over http only those ranges travel. A
 * member is stored as plain bytes, so it is writable in place when the
 * layer below is; its size cannot change. Sparse members are refused.
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

const BLOCK = 512;
/** Longest GNU long name or pax header accepted (they are read into memory). */
const MAX_META = 1 << 20;

/** Where a member's data lies in the archive. */
export interface TarMember {
  /** Offset of the first data byte. */
  offset: number;
  /** Length of the data. */
  size: number;
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

/** The records of a pax extended header (`LEN key=value\n` each). */
function paxRecords(data: Uint8Array, at: number): Map<string, string> {
  const records = new Map<string, string>();
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
    records.set(record.slice(0, eq), record.slice(eq + 1));
    i += length;
  }
  return records;
}

function normalize(name: string): string {
  return name.replace(/^(\.\/)+/, "").replace(/\/+$/, "");
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
    const dataOffset = offset + BLOCK;
    const paxSize = pax.get("size");
    const dataSize = paxSize !== undefined && /^\d+$/.test(paxSize)
      ? Number(paxSize)
      : numeric(header.subarray(124, 136), "size", offset);
    const next = dataOffset + Math.ceil(dataSize / BLOCK) * BLOCK;
    if (type === "L") {
      longName = cString(await readMeta(dataOffset, dataSize));
    } else if (type === "x") {
      pax = paxRecords(await readMeta(dataOffset, dataSize), offset);
    } else if (type === "g" || type === "K") {
      // Global pax headers and GNU long link names do not name members.
    } else {
      const magic = cString(header.subarray(257, 263));
      const prefix = magic === "ustar" ? cString(header.subarray(345, 500)) : "";
      const short = cString(header.subarray(0, 100));
      const name = pax.get("path") ?? longName ?? (prefix ? `${prefix}/${short}` : short);
      if (normalize(name) === wanted) {
        const sparse = type === "S" || [...pax.keys()].some((k) => k.startsWith("GNU.sparse."));
        if (sparse) {
          throw new NbdError(
            "ENOTSUP",
            `tar: "${entry}" is a sparse member, which is not supported`,
          );
        }
        if (type !== "0" && type !== "\0" && type !== "7") {
          throw new NbdError("EINVAL", `tar: "${entry}" is not a regular file (type '${type}')`);
        }
        if (dataOffset + dataSize > size) {
          throw corrupt(offset, `"${entry}" extends beyond the end of the archive`);
        }
        return { offset: dataOffset, size: dataSize };
      }
      longName = undefined;
      pax = new Map();
    }
    offset = next;
  }
}

/** The tar filter. */
export const tarFilter: Filter = {
  name: "tar",
  summary: "serve one member of a tar archive (read-write when the layer below is)",
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
        const { offset, size } = await member;
        return new WindowBackend(next, offset, size);
      },
    });
  },
};
