/**
 * The `partition` filter: serves one partition of a disk with an MBR
 * (primary partitions 1-4, logical partitions 5 and up inside an extended
 * partition) or a GPT partition table. Sectors are 512 bytes.
 *
 * ```
 * nbd serve --filter=partition split file=disk.img partition=1
 * ```
 *
 * Parameters:
 * - `partition=N` (required): the partition number, counting from 1.
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import type { Backend, Filter } from "../core/backend.ts";
import { WindowBackend } from "./offset.ts";

const SECTOR = 512;

/** Where a partition lies, in bytes. */
export interface PartitionRange {
  /** Start offset. */
  offset: number;
  /** Length. */
  length: number;
}

/** MBR partition types of extended partitions. */
const EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
/** MBR partition type of a protective entry covering a GPT disk. */
const GPT_PROTECTIVE = 0xee;
/** Logical partitions followed before giving up (guards against loops). */
const MAX_LOGICAL = 128;

async function readSector(disk: Backend, lba: number, count = 1): Promise<Uint8Array> {
  const offset = lba * SECTOR;
  const length = count * SECTOR;
  if (offset + length > disk.size()) {
    throw new NbdError("EINVAL", `partition table sector ${lba} lies beyond the end of the disk`);
  }
  const buf = new Uint8Array(length);
  await disk.pread(buf, offset);
  return buf;
}

interface MbrEntry {
  type: number;
  start: number;
  count: number;
}

function mbrEntries(sector: Uint8Array): MbrEntry[] {
  const view = new DataView(sector.buffer, sector.byteOffset, sector.byteLength);
  const out: MbrEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const base = 446 + 16 * i;
    out.push({
      type: sector[base + 4]!,
      start: view.getUint32(base + 8, true),
      count: view.getUint32(base + 12, true),
    });
  }
  return out;
}

function hasBootSignature(sector: Uint8Array): boolean {
  return sector[510] === 0x55 && sector[511] === 0xaa;
}

function checkRange(disk: Backend, range: PartitionRange, n: number): PartitionRange {
  if (range.length === 0) throw new NbdError("EINVAL", `partition ${n} is empty`);
  if (range.offset + range.length > disk.size()) {
    throw new NbdError("EINVAL", `partition ${n} extends beyond the end of the disk`);
  }
  return range;
}

/** Finds partition `n` (from 1) of an MBR or GPT disk. */
export async function findPartition(disk: Backend, n: number): Promise<PartitionRange> {
  const mbr = await readSector(disk, 0);
  if (!hasBootSignature(mbr)) {
    throw new NbdError("EINVAL", "the disk has no MBR or GPT partition table");
  }
  const entries = mbrEntries(mbr);
  if (entries.some((e) => e.type === GPT_PROTECTIVE)) return await findGptPartition(disk, n);
  if (n <= 4) {
    const e = entries[n - 1]!;
    if (e.type === 0 || e.count === 0) throw new NbdError("EINVAL", `partition ${n} is unused`);
    if (EXTENDED_TYPES.has(e.type)) {
      throw new NbdError("EINVAL", `partition ${n} is an extended partition`);
    }
    return checkRange(disk, { offset: e.start * SECTOR, length: e.count * SECTOR }, n);
  }
  // Logical partitions: a chain of extended boot records inside the extended partition.
  const extended = entries.find((e) => EXTENDED_TYPES.has(e.type));
  if (!extended) throw new NbdError("EINVAL", `partition ${n} does not exist (no logical ones)`);
  let ebrLba = extended.start;
  for (let number = 5; number - 5 < MAX_LOGICAL; number++) {
    const ebr = await readSector(disk, ebrLba);
    if (!hasBootSignature(ebr)) {
      throw new NbdError("EINVAL", `bad extended boot record at sector ${ebrLba}`);
    }
    const [logical, next] = mbrEntries(ebr);
    if (number === n) {
      if (logical!.type === 0 || logical!.count === 0) {
        throw new NbdError("EINVAL", `partition ${n} is unused`);
      }
      return checkRange(disk, {
        offset: (ebrLba + logical!.start) * SECTOR,
        length: logical!.count * SECTOR,
      }, n);
    }
    if (next!.type === 0 || next!.start === 0) break;
    ebrLba = extended.start + next!.start;
  }
  throw new NbdError("EINVAL", `partition ${n} does not exist`);
}

async function findGptPartition(disk: Backend, n: number): Promise<PartitionRange> {
  const header = await readSector(disk, 1);
  const signature = new TextDecoder().decode(header.subarray(0, 8));
  if (signature !== "EFI PART") throw new NbdError("EINVAL", "bad GPT header signature");
  const view = new DataView(header.buffer, header.byteOffset, header.byteLength);
  const entriesLba = Number(view.getBigUint64(72, true));
  const count = view.getUint32(80, true);
  const entrySize = view.getUint32(84, true);
  if (entrySize < 128 || entrySize % 8 !== 0 || entrySize > 4096) {
    throw new NbdError("EINVAL", `bad GPT partition entry size ${entrySize}`);
  }
  if (n > count) {
    throw new NbdError("EINVAL", `partition ${n} does not exist (the table has ${count} entries)`);
  }
  const byteOffset = (n - 1) * entrySize;
  const firstSector = Math.floor(byteOffset / SECTOR);
  const sectors = Math.ceil((byteOffset - firstSector * SECTOR + entrySize) / SECTOR);
  const raw = await readSector(disk, entriesLba + firstSector, sectors);
  const entry = raw.subarray(byteOffset - firstSector * SECTOR);
  if (entry.subarray(0, 16).every((b) => b === 0)) {
    throw new NbdError("EINVAL", `partition ${n} is unused`);
  }
  const ev = new DataView(entry.buffer, entry.byteOffset, entrySize);
  const first = Number(ev.getBigUint64(32, true));
  const last = Number(ev.getBigUint64(40, true));
  if (last < first) throw new NbdError("EINVAL", `partition ${n} has a bad range`);
  return checkRange(disk, { offset: first * SECTOR, length: (last - first + 1) * SECTOR }, n);
}

/** The partition filter. */
export const partitionFilter: Filter = {
  name: "partition",
  summary: "serve one partition of an MBR or GPT disk",
  description: "Example:\n  nbd serve --filter=partition split file=disk.img partition=1",
  params: [
    {
      name: "partition",
      value: "N",
      type: "integer",
      description: "partition number, from 1 (5 and up: MBR logical partitions)",
      required: true,
    },
  ],
  create(params) {
    const n = params.takeInteger("partition", 1, 1 << 20)!;
    return Promise.resolve({
      async wrap(next) {
        const range = await findPartition(next, n);
        return new WindowBackend(next, range.offset, range.length);
      },
    });
  },
};
