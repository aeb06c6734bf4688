/**
 * The `partitioning` plugin: files presented as the partitions of one
 * disk, with a generated partition table — a protective MBR, GPT header
 * and entries and their backup at the end of the disk, or an MBR with
 * logical partitions in an extended partition beyond the fourth. The
 * files are read and written in place; the partition table and the
 * padding around the partitions are generated and read-only (a write
 * there is accepted only when it leaves the bytes as they are). A source
 * may also be an NBD URI: each client connection then has its own
 * connection to that export.
 *
 * ```
 * nbd serve partitioning boot.img root.img
 * nbd serve partitioning boot.img root.img partition-type=mbr mbr-id=0x0c mbr-id=0x83
 * nbd serve partitioning boot.img nbd+unix:///root?socket=/run/root.sock
 * ```
 *
 * @module
 */

import { createHash } from "node:crypto";
import { NbdError } from "../protocol/errors.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import {
  type Backend,
  completeBackend,
  type Extent,
  type OpenContext,
  type Plugin,
} from "../core/backend.ts";
import type { Params } from "../core/params.ts";
import { UsageError } from "../util/usage_error.ts";
import { fileBackend } from "./file.ts";
import { UpstreamBackend } from "./nbd.ts";
import { NbdClient } from "../client/client.ts";
import { isNbdUri, type NbdUri, parseNbdUri } from "../protocol/uri.ts";

const SECTOR = 512;
/** GPT partition entries: 128 of 128 bytes, 32 sectors. */
const GPT_ENTRIES = 128;
const GPT_ENTRY_SIZE = 128;
const GPT_ENTRY_SECTORS = (GPT_ENTRIES * GPT_ENTRY_SIZE) / SECTOR;
/** "Linux filesystem data". */
const DEFAULT_TYPE_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/** Linux. */
const DEFAULT_MBR_ID = 0x83;
/** Extended partition, LBA addressing. */
const MBR_EXTENDED = 0x0f;
/** An MBR counts sectors in 32 bits. */
const MBR_MAX_SECTORS = 2 ** 32 - 1;

/** One file of the disk. */
interface PartitionFile {
  path: string;
  size: number;
  /** Where the partition starts on the disk, in bytes. */
  offset: number;
  /** The partition's length: the file rounded up to whole sectors. */
  length: number;
  typeGuid: string;
  mbrId: number;
}

/** A generated piece of the disk (partition table, EBR...). */
interface MetaRegion {
  offset: number;
  bytes: Uint8Array;
}

/** The disk's layout: the partitions and the generated pieces, by offset. */
export interface DiskLayout {
  /** "gpt" or "mbr". */
  type: "gpt" | "mbr";
  /** Total size. */
  size: number;
  /** The partitions in order. */
  partitions: PartitionFile[];
  /** The generated pieces in offset order. */
  meta: MetaRegion[];
}

let crcTable: Uint32Array | undefined;

/** CRC-32 (IEEE 802.3), as GPT checksums its header and entries. */
export function crc32(bytes: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let crc = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) crc = crcTable[(crc ^ bytes[i]!) & 0xff]! ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/** A GUID's 16 bytes in GPT's mixed-endian order (first three fields little-endian). */
function guidBytes(text: string): Uint8Array {
  const hex = text.replace(/-/g, "");
  if (!/^[0-9a-fA-F]{32}$/.test(hex) || !/^[^-]{8}-[^-]{4}-[^-]{4}-[^-]{4}-[^-]{12}$/.test(text)) {
    throw new UsageError(`"${text}" is not a GUID (XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX)`);
  }
  const raw = new Uint8Array(16);
  for (let i = 0; i < 16; i++) raw[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  const out = raw.slice();
  out.set(raw.subarray(0, 4).reverse(), 0);
  out.set(raw.subarray(4, 6).reverse(), 4);
  out.set(raw.subarray(6, 8).reverse(), 6);
  return out;
}

/**
 * A version-4-shaped GUID derived from `seed`, so that the same files give
 * the same disk (and the same checksum) every time.
 */
function derivedGuid(seed: string): Uint8Array {
  const bytes = new Uint8Array(createHash("sha256").update(seed).digest().subarray(0, 16));
  bytes[7] = (bytes[7]! & 0x0f) | 0x40; // version 4 (mixed-endian: byte 7 holds the high byte)
  bytes[8] = (bytes[8]! & 0x3f) | 0x80; // variant
  return bytes;
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** CHS address of an LBA for an MBR entry (255 heads, 63 sectors; the maximum beyond 8 GiB). */
function chs(lba: number): [number, number, number] {
  const cylinder = Math.floor(lba / (255 * 63));
  if (cylinder > 1023) return [0xfe, 0xff, 0xff];
  const head = Math.floor(lba / 63) % 255;
  const sector = (lba % 63) + 1;
  return [head, ((cylinder >> 2) & 0xc0) | sector, cylinder & 0xff];
}

/** Writes an MBR partition entry at `base` of `sector`. */
function mbrEntry(sector: Uint8Array, base: number, id: number, start: number, count: number) {
  const view = new DataView(sector.buffer, sector.byteOffset);
  sector.set(chs(start), base + 1);
  sector[base + 4] = id;
  sector.set(chs(start + count - 1), base + 5);
  view.setUint32(base + 8, start, true);
  view.setUint32(base + 12, count, true);
}

function bootSignature(sector: Uint8Array): void {
  sector[510] = 0x55;
  sector[511] = 0xaa;
}

/** The GPT header for `current` and `backup` LBAs, entries at `entriesLba`. */
function gptHeader(
  current: number,
  backup: number,
  firstUsable: number,
  lastUsable: number,
  diskGuid: Uint8Array,
  entriesLba: number,
  entriesCrc: number,
): Uint8Array {
  const sector = new Uint8Array(SECTOR);
  const view = new DataView(sector.buffer);
  sector.set(new TextEncoder().encode("EFI PART"), 0);
  view.setUint32(8, 0x00010000, true);
  view.setUint32(12, 92, true);
  view.setBigUint64(24, BigInt(current), true);
  view.setBigUint64(32, BigInt(backup), true);
  view.setBigUint64(40, BigInt(firstUsable), true);
  view.setBigUint64(48, BigInt(lastUsable), true);
  sector.set(diskGuid, 56);
  view.setBigUint64(72, BigInt(entriesLba), true);
  view.setUint32(80, GPT_ENTRIES, true);
  view.setUint32(84, GPT_ENTRY_SIZE, true);
  view.setUint32(88, entriesCrc, true);
  view.setUint32(16, crc32(sector.subarray(0, 92)), true);
  return sector;
}

/** Lays out the disk: where each partition goes, and the bytes of the partition tables. */
function layoutDisk(
  files: { path: string; size: number; typeGuid: string; mbrId: number }[],
  type: "gpt" | "mbr",
  alignment: number,
): DiskLayout {
  const partitions: PartitionFile[] = [];
  const meta: MetaRegion[] = [];
  const seed = files.map((f) => `${f.path}\0${f.size}`).join("\0");
  if (type === "gpt") {
    if (files.length > GPT_ENTRIES) {
      throw new UsageError(`partitioning: GPT holds at most ${GPT_ENTRIES} partitions`);
    }
    let offset = roundUp((2 + GPT_ENTRY_SECTORS) * SECTOR, alignment);
    for (const file of files) {
      const length = roundUp(Math.max(file.size, 1), SECTOR);
      partitions.push({ ...file, offset, length });
      offset = roundUp(offset + length, alignment);
    }
    // The backup entries and header follow the last partition's padding, which
    // stays usable (tools would otherwise offer to "fix" the unused space).
    const backupEntriesLba = offset / SECTOR;
    const lastUsable = backupEntriesLba - 1;
    const backupLba = backupEntriesLba + GPT_ENTRY_SECTORS;
    const size = (backupLba + 1) * SECTOR;
    const entries = new Uint8Array(GPT_ENTRIES * GPT_ENTRY_SIZE);
    const view = new DataView(entries.buffer);
    partitions.forEach((p, i) => {
      const base = i * GPT_ENTRY_SIZE;
      entries.set(guidBytes(p.typeGuid), base);
      entries.set(derivedGuid(`${seed}\0partition ${i}`), base + 16);
      view.setBigUint64(base + 32, BigInt(p.offset / SECTOR), true);
      view.setBigUint64(base + 40, BigInt((p.offset + p.length) / SECTOR - 1), true);
      const name = partitionName(p.path).slice(0, 36);
      for (let c = 0; c < name.length; c++) {
        view.setUint16(base + 56 + 2 * c, name.charCodeAt(c), true);
      }
    });
    const entriesCrc = crc32(entries);
    const diskGuid = derivedGuid(`${seed}\0disk`);
    const firstUsable = 2 + GPT_ENTRY_SECTORS;
    const mbr = new Uint8Array(SECTOR);
    mbrEntry(mbr, 446, 0xee, 1, Math.min(size / SECTOR - 1, MBR_MAX_SECTORS));
    bootSignature(mbr);
    meta.push({ offset: 0, bytes: mbr });
    meta.push({
      offset: SECTOR,
      bytes: gptHeader(1, backupLba, firstUsable, lastUsable, diskGuid, 2, entriesCrc),
    });
    meta.push({ offset: 2 * SECTOR, bytes: entries });
    meta.push({ offset: backupEntriesLba * SECTOR, bytes: entries });
    meta.push({
      offset: backupLba * SECTOR,
      bytes: gptHeader(
        backupLba,
        1,
        firstUsable,
        lastUsable,
        diskGuid,
        backupEntriesLba,
        entriesCrc,
      ),
    });
    return { type, size, partitions, meta };
  }
  // MBR: up to four primary partitions; beyond that three primary ones and an
  // extended partition holding a chain of logical ones, each behind its own EBR.
  const mbr = new Uint8Array(SECTOR);
  new DataView(mbr.buffer).setUint32(440, new DataView(derivedGuid(seed).buffer).getUint32(0));
  bootSignature(mbr);
  meta.push({ offset: 0, bytes: mbr });
  const primaries = files.length <= 4 ? files.length : 3;
  let offset = roundUp(SECTOR, alignment);
  const sectors = (bytes: number, what: string) => {
    const n = bytes / SECTOR;
    if (n > MBR_MAX_SECTORS) {
      throw new UsageError(`partitioning: ${what} lies beyond 2 TiB, past what an MBR can address`);
    }
    return n;
  };
  for (let i = 0; i < primaries; i++) {
    const file = files[i]!;
    const length = roundUp(Math.max(file.size, 1), SECTOR);
    partitions.push({ ...file, offset, length });
    mbrEntry(mbr, 446 + 16 * i, file.mbrId, sectors(offset, file.path), sectors(length, file.path));
    sectors(offset + length, file.path);
    offset = roundUp(offset + length, alignment);
  }
  if (files.length > 4) {
    const extendedStart = offset;
    const ebrs: { at: number; sector: Uint8Array }[] = [];
    for (let i = primaries; i < files.length; i++) {
      const file = files[i]!;
      const ebrAt = offset;
      const start = roundUp(ebrAt + SECTOR, alignment);
      const length = roundUp(Math.max(file.size, 1), SECTOR);
      partitions.push({ ...file, offset: start, length });
      const ebr = new Uint8Array(SECTOR);
      bootSignature(ebr);
      // The first entry is relative to this EBR, the link to the next one relative
      // to the start of the extended partition.
      mbrEntry(ebr, 446, file.mbrId, (start - ebrAt) / SECTOR, sectors(length, file.path));
      sectors(start + length, file.path);
      ebrs.push({ at: ebrAt, sector: ebr });
      meta.push({ offset: ebrAt, bytes: ebr });
      offset = roundUp(start + length, alignment);
    }
    for (let i = 0; i + 1 < ebrs.length; i++) {
      const next = ebrs[i + 1]!;
      const nextPartition = partitions[primaries + i + 1]!;
      const start = (next.at - extendedStart) / SECTOR;
      const count = (nextPartition.offset + nextPartition.length - next.at) / SECTOR;
      mbrEntry(ebrs[i]!.sector, 446 + 16, MBR_EXTENDED, start, count);
    }
    const lastPartition = partitions[partitions.length - 1]!;
    mbrEntry(
      mbr,
      446 + 16 * 3,
      MBR_EXTENDED,
      sectors(extendedStart, "the extended partition"),
      (lastPartition.offset + lastPartition.length - extendedStart) / SECTOR,
    );
  }
  const lastPartition = partitions[partitions.length - 1]!;
  const size = lastPartition.offset + lastPartition.length;
  meta.sort((a, b) => a.offset - b.offset);
  return { type, size, partitions, meta };
}

/** A piece of the disk for one request: generated bytes, a partition's file, or padding. */
type Piece =
  | { kind: "meta"; bytes: Uint8Array; at: number; length: number }
  | { kind: "file"; index: number; at: number; length: number }
  | { kind: "pad"; length: number };

/** Cuts `[offset, offset + length)` into pieces. */
function pieces(layout: DiskLayout, offset: number, length: number): Piece[] {
  const out: Piece[] = [];
  const end = offset + length;
  let position = offset;
  // Everything that is not padding, in offset order.
  const regions: ({ start: number; end: number } & Piece)[] = [];
  for (const m of layout.meta) {
    if (m.offset + m.bytes.length > position && m.offset < end) {
      regions.push({
        kind: "meta",
        bytes: m.bytes,
        at: 0,
        length: m.bytes.length,
        start: m.offset,
        end: m.offset + m.bytes.length,
      });
    }
  }
  layout.partitions.forEach((p, index) => {
    const fileEnd = p.offset + p.size;
    if (fileEnd > position && p.offset < end) {
      regions.push({ kind: "file", index, at: 0, length: p.size, start: p.offset, end: fileEnd });
    }
  });
  regions.sort((a, b) => a.start - b.start);
  for (const region of regions) {
    if (region.start > position) {
      const n = Math.min(region.start, end) - position;
      out.push({ kind: "pad", length: n });
      position += n;
    }
    if (position >= end) break;
    const n = Math.min(region.end, end) - position;
    const at = position - region.start;
    if (region.kind === "meta") out.push({ kind: "meta", bytes: region.bytes, at, length: n });
    else if (region.kind === "file") out.push({ kind: "file", index: region.index, at, length: n });
    position += n;
  }
  if (position < end) out.push({ kind: "pad", length: end - position });
  return out;
}

function isZero(bytes: Uint8Array): boolean {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Takes a per-partition parameter: once for every partition, or once per partition in order. */
function perPartition<T>(
  params: Params,
  key: string,
  count: number,
  parse: (text: string) => T,
): T[] | undefined {
  const values = params.takeAll(key);
  if (values.length === 0) return undefined;
  if (values.length !== 1 && values.length !== count) {
    throw new UsageError(
      `partitioning: give ${key}= once, or once per file (${count}), not ${values.length} times`,
    );
  }
  const parsed = values.map(parse);
  return Array.from({ length: count }, (_, i) => parsed[values.length === 1 ? 0 : i]!);
}

function parseMbrId(text: string): number {
  const n = /^0x[0-9a-f]{1,2}$/i.test(text) ? parseInt(text.slice(2), 16) : Number(text);
  if (!/^(0x[0-9a-f]{1,2}|\d{1,3})$/i.test(text) || !Number.isInteger(n) || n < 1 || n > 255) {
    throw new UsageError(`partitioning: "${text}" is not an MBR partition type (1-255 or 0xHH)`);
  }
  if (n === MBR_EXTENDED || n === 0x05 || n === 0x85 || n === 0xee) {
    throw new UsageError(`partitioning: MBR type ${text} is reserved for the partition table`);
  }
  return n;
}

function parseGuid(text: string): string {
  guidBytes(text);
  return text.toUpperCase();
}

/** The partitioning plugin. */
export const partitioningPlugin: Plugin = {
  name: "partitioning",
  summary: "files presented as the partitions of one disk (generated GPT or MBR)",
  description: "Examples:\n  nbd serve partitioning boot.img root.img\n" +
    "  nbd serve partitioning a.img b.img partition-type=mbr mbr-id=0x0c mbr-id=0x83",
  params: [
    {
      name: "file",
      value: "PATH|URI",
      type: "path",
      description: "a file or an NBD URI, one partition each, in order",
      required: true,
      repeatable: true,
    },
    {
      name: "partition-type",
      value: "gpt|mbr",
      type: "enum",
      choices: ["gpt", "mbr"],
      description:
        "the partition table (when not given: mbr for up to 4 partitions within 2 TiB, else gpt)",
    },
    {
      name: "type",
      value: "GUID|BYTE",
      type: "string",
      description: "partition type as the table needs it: a GUID for gpt, a byte for mbr " +
        "(once for all, or once per file)",
      repeatable: true,
    },
    {
      name: "type-guid",
      value: "GUID",
      type: "string",
      default: "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
      description: "GPT partition type (the default is Linux data)",
      repeatable: true,
    },
    {
      name: "mbr-id",
      value: "BYTE",
      type: "string",
      default: "0x83",
      description: "MBR partition type, 1-255 or 0xHH (the default is Linux)",
      repeatable: true,
    },
    {
      name: "alignment",
      value: "SIZE",
      type: "size",
      default: "1M",
      description: "partitions start at multiples of SIZE (a multiple of 512)",
    },
  ],
  magicParam: "file",
  async create(params) {
    const paths = params.takeAll("file");
    if (paths.length === 0) throw new UsageError("partitioning: at least one file is required");
    const requested = params.take("partition-type");
    if (requested !== undefined && requested !== "gpt" && requested !== "mbr") {
      throw new UsageError(`partitioning: partition-type must be gpt or mbr, got "${requested}"`);
    }
    const alignment = params.takeSize("alignment") ?? 1 << 20;
    if (alignment < SECTOR || alignment % SECTOR !== 0) {
      throw new UsageError(`partitioning: alignment must be a multiple of 512, got ${alignment}`);
    }
    const sizes: number[] = [];
    /** The parsed URI of each source that is an NBD export. */
    const uris: Array<NbdUri | undefined> = [];
    for (const path of paths) {
      if (isNbdUri(path)) {
        const uri = parseSourceUri(path);
        uris.push(uri);
        sizes.push(await exportSize(path, uri));
        continue;
      }
      uris.push(undefined);
      let stat: Deno.FileInfo;
      try {
        // Opened, not only looked at: an unreadable file is named now, not at the first client.
        using file = await Deno.open(path, { read: true });
        stat = await file.stat();
      } catch (error) {
        throw new UsageError(
          `partitioning: cannot open ${path}: ${
            (error as Error).message.replace(/\s*\(os error \d+\).*$/, "")
          }`,
        );
      }
      if (!stat.isFile) throw new UsageError(`partitioning: ${path} is not a regular file`);
      sizes.push(stat.size);
    }
    const total = sizes.reduce((a, b) => a + roundUp(b, alignment), 0);
    const type = requested ??
      (paths.length <= 4 && total < 2 ** 41 - 2 * alignment ? "mbr" : "gpt");
    const generic = params.takeAll("type");
    if (generic.length > 0) {
      for (const value of generic) params.add(type === "gpt" ? "type-guid" : "mbr-id", value);
    }
    const guids = perPartition(params, "type-guid", paths.length, parseGuid);
    const ids = perPartition(params, "mbr-id", paths.length, parseMbrId);
    const layout = layoutDisk(
      paths.map((path, i) => ({
        path,
        size: sizes[i]!,
        typeGuid: guids?.[i] ?? DEFAULT_TYPE_GUID,
        mbrId: ids?.[i] ?? DEFAULT_MBR_ID,
      })),
      type,
      alignment,
    );
    return {
      async open(context: OpenContext) {
        const files: Backend[] = [];
        try {
          for (const [i, path] of paths.entries()) {
            const uri = uris[i];
            files.push(completeBackend(
              uri
                ? await UpstreamBackend.open(uri, {
                  uri,
                  dynamicExport: false,
                  reconnect: true,
                  log: (message) => console.error(`nbd: partitioning: ${path}: ${message}`),
                })
                : fileBackend(path, context.readonly),
            ));
          }
        } catch (error) {
          for (const file of files) void file.close();
          throw error;
        }
        // A file that changed size since the table was made would no longer fit it.
        layout.partitions.forEach((p, i) => {
          if (files[i]!.size() !== p.size) {
            for (const file of files) void file.close();
            throw new NbdError("EIO", `${p.path} changed size since the partition table was made`);
          }
        });
        const writable = files.every((f) => f.capabilities().writable);
        const check = (bytes: Uint8Array, current: Uint8Array | undefined) => {
          if (current ? equalBytes(bytes, current) : isZero(bytes)) return;
          throw new NbdError(
            "EPERM",
            "the partition table and padding are generated, not writable",
          );
        };
        /** A request across the table, padding or several files. */
        const readPieces = async (buf: Uint8Array, offset: number) => {
          let done = 0;
          const reads: Promise<void>[] = [];
          for (const piece of pieces(layout, offset, buf.length)) {
            const view = buf.subarray(done, done + piece.length);
            if (piece.kind === "meta") {
              view.set(piece.bytes.subarray(piece.at, piece.at + piece.length));
            } else if (piece.kind === "pad") view.fill(0);
            else reads.push(files[piece.index]!.pread(view, piece.at));
            done += piece.length;
          }
          await Promise.all(reads);
        };
        return completeBackend({
          size: () => layout.size,
          capabilities: () => ({
            writable,
            fua: writable ? "emulate" : "none",
            multiConn: true,
            extents: true,
          }),
          pread(buf, offset) {
            // The common case, a request inside one file, goes straight to it:
            // no cutting into pieces.
            const end = offset + buf.length;
            const parts = layout.partitions;
            let lo = 0;
            let hi = parts.length;
            while (lo < hi) {
              const mid = (lo + hi) >> 1;
              if (parts[mid]!.offset + parts[mid]!.size <= offset) lo = mid + 1;
              else hi = mid;
            }
            const p = parts[lo];
            if (p && p.offset <= offset && end <= p.offset + p.size) {
              return files[lo]!.pread(buf, offset - p.offset);
            }
            return readPieces(buf, offset);
          },
          ...(writable
            ? {
              async pwrite(buf: Uint8Array, offset: number) {
                const parts = pieces(layout, offset, buf.length);
                let done = 0;
                // Nothing is written unless all of it may be.
                for (const piece of parts) {
                  const view = buf.subarray(done, done + piece.length);
                  if (piece.kind === "meta") {
                    check(view, piece.bytes.subarray(piece.at, piece.at + piece.length));
                  } else if (piece.kind === "pad") check(view, undefined);
                  done += piece.length;
                }
                done = 0;
                for (const piece of parts) {
                  if (piece.kind === "file") {
                    await files[piece.index]!.pwrite(
                      buf.subarray(done, done + piece.length),
                      piece.at,
                      { fua: false },
                    );
                  }
                  done += piece.length;
                }
              },
              async flush() {
                for (const file of files) await file.flush();
              },
              async trim(offset: number, length: number) {
                for (const piece of pieces(layout, offset, length)) {
                  if (piece.kind === "file") {
                    await files[piece.index]!.trim(piece.at, piece.length, { fua: false });
                  }
                }
              },
              async zero(offset: number, length: number, flags) {
                const parts = pieces(layout, offset, length);
                for (const piece of parts) {
                  if (
                    piece.kind === "meta" &&
                    !isZero(piece.bytes.subarray(piece.at, piece.at + piece.length))
                  ) {
                    throw new NbdError(
                      "EPERM",
                      "the partition table and padding are generated, not writable",
                    );
                  }
                }
                for (const piece of parts) {
                  if (piece.kind === "file") {
                    await files[piece.index]!.zero(piece.at, piece.length, {
                      ...flags,
                      fua: false,
                    });
                  }
                }
              },
            }
            : {}),
          async extents(offset: number, length: number) {
            const out: Extent[] = [];
            const push = (n: number, flags: number) => {
              const last = out[out.length - 1];
              if (last && last.flags === flags) last.length += n;
              else out.push({ length: n, flags });
            };
            for (const piece of pieces(layout, offset, length)) {
              if (piece.kind === "meta") push(piece.length, 0);
              else if (piece.kind === "pad") push(piece.length, NBD_STATE_HOLE | NBD_STATE_ZERO);
              else {
                let covered = 0;
                const file = files[piece.index]!;
                while (covered < piece.length) {
                  const extents = await file.extents(piece.at + covered, piece.length - covered, {
                    reqOne: false,
                  });
                  for (const e of extents) {
                    const n = Math.min(e.length, piece.length - covered);
                    if (n <= 0) break;
                    push(n, e.flags);
                    covered += n;
                  }
                  if (extents.length === 0) {
                    push(piece.length - covered, 0);
                    covered = piece.length;
                  }
                }
              }
            }
            return out;
          },
          async close() {
            for (const file of files) await file.close();
          },
        });
      },
    };
  },
};

/** A GPT partition's name: the file's name, or the export's (else "nbd") for a URI. */
function partitionName(path: string): string {
  if (isNbdUri(path)) return parseNbdUri(path).exportName || "nbd";
  return path.split("/").pop() ?? "";
}

function parseSourceUri(text: string): NbdUri {
  try {
    return parseNbdUri(text);
  } catch (error) {
    throw new UsageError(`partitioning: ${text}: ${(error as Error).message}`);
  }
}

/** The size of an NBD export, asked once at start-up so that the table can be laid out. */
async function exportSize(text: string, uri: NbdUri): Promise<number> {
  try {
    const client = await NbdClient.connect(uri, {});
    try {
      return client.size();
    } finally {
      await client.close().catch(() => {});
    }
  } catch (error) {
    throw new UsageError(`partitioning: cannot open ${text}: ${(error as Error).message}`);
  }
}
