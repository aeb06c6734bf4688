/**
 * Names the blocks of a disk: finds the filesystems on it (ext2/3/4 or
 * FAT on the whole disk, or in the partitions of an MBR or GPT table) and
 * asks each which file, directory or structure owns each block. What
 * `nbd map --files` prints and the view's `/files` serves.
 *
 * @module
 */

import { type DiskReader, sliceReader } from "./disk_reader.ts";
import { extOwners, isExt } from "./ext_owners.ts";
import { fatOwners, readFatGeometry } from "./fat_owners.ts";
import { ExtentCollector, type OwnedExtent } from "./owned_extents.ts";

const SECTOR = 512;
const GPT_SIGNATURE = "EFI PART";
const MBR_EXTENDED = new Set([0x05, 0x0f, 0x85]);

/** A partition of a partition table. */
export interface Partition {
  /** 1-based number, as tools name it (sda2 = 2). */
  number: number;
  /** Offset on the disk in bytes. */
  offset: number;
  /** Length in bytes. */
  length: number;
}

/** A filesystem found on the disk. */
export interface FoundFilesystem {
  /** Partition number, or 0 for the whole disk. */
  partition: number;
  /** Where it starts on the disk. */
  offset: number;
  /** Its length. */
  length: number;
  /** "ext4", "FAT32"..., or "unknown" when none was recognised. */
  type: string;
  /** Why it could not be read completely, if so. */
  error?: string;
}

/** The result of an analysis. */
export interface BlockOwners {
  /** Size of the disk analysed. */
  size: number;
  /** The filesystems found, in disk order. */
  filesystems: FoundFilesystem[];
  /** Owned ranges by offset (ranges nobody owns are free or unknown). */
  extents: OwnedExtent[];
}

/** The partitions of a GPT or MBR table on `reader`, with the table's own sectors; none without a table. */
export async function readPartitionTable(
  reader: DiskReader,
  out?: ExtentCollector,
): Promise<{ scheme: "gpt" | "mbr" | "none"; partitions: Partition[] }> {
  if (reader.size < 2 * SECTOR) return { scheme: "none", partitions: [] };
  const mbr = await reader.read(0, SECTOR);
  if (mbr[510] !== 0x55 || mbr[511] !== 0xaa) return { scheme: "none", partitions: [] };
  const v = new DataView(mbr.buffer);
  const entries = [0, 1, 2, 3].map((i) => ({
    type: mbr[446 + i * 16 + 4]!,
    start: v.getUint32(446 + i * 16 + 8, true),
    sectors: v.getUint32(446 + i * 16 + 12, true),
  }));
  if (entries.some((e) => e.type === 0xee)) {
    const header = await reader.read(SECTOR, SECTOR);
    if (new TextDecoder().decode(header.subarray(0, 8)) === GPT_SIGNATURE) {
      return { scheme: "gpt", partitions: await readGpt(reader, header, out) };
    }
  }
  const partitions: Partition[] = [];
  entries.forEach((e, i) => {
    if (e.type === 0 || e.sectors === 0 || MBR_EXTENDED.has(e.type)) return;
    const offset = e.start * SECTOR;
    if (offset + e.sectors * SECTOR > reader.size) return;
    partitions.push({ number: i + 1, offset, length: e.sectors * SECTOR });
  });
  // Logical partitions: a chain of EBRs in the extended partition, numbered from 5.
  const extended = entries.find((e) => MBR_EXTENDED.has(e.type));
  if (extended) {
    let ebr = extended.start;
    for (let n = 5; n < 5 + 128 && ebr > 0 && (ebr + 1) * SECTOR <= reader.size; n++) {
      const b = await reader.read(ebr * SECTOR, SECTOR);
      if (b[510] !== 0x55 || b[511] !== 0xaa) break;
      out?.add(ebr * SECTOR, SECTOR, "<extended boot record>", "metadata");
      const w = new DataView(b.buffer);
      const start = w.getUint32(446 + 8, true);
      const sectors = w.getUint32(446 + 12, true);
      if (sectors) {
        partitions.push({ number: n, offset: (ebr + start) * SECTOR, length: sectors * SECTOR });
      }
      const next = w.getUint32(446 + 16 + 8, true);
      if (!next) break;
      ebr = extended.start + next;
    }
  }
  if (partitions.length === 0) return { scheme: "none", partitions: [] };
  out?.add(0, SECTOR, "<MBR>", "metadata");
  return { scheme: "mbr", partitions };
}

async function readGpt(
  reader: DiskReader,
  header: Uint8Array,
  out?: ExtentCollector,
): Promise<Partition[]> {
  const h = new DataView(header.buffer);
  const entriesLba = Number(h.getBigUint64(72, true));
  const count = Math.min(h.getUint32(80, true), 1024);
  const entrySize = h.getUint32(84, true);
  const backupLba = Number(h.getBigUint64(32, true));
  if (entrySize < 128 || entrySize > 4096) throw new Error("GPT: bad entry size");
  if (entriesLba < 2 || (entriesLba * SECTOR) + count * entrySize > reader.size) {
    throw new Error("GPT: the partition entries are past the end of the disk");
  }
  out?.add(0, SECTOR, "<protective MBR>", "metadata");
  out?.add(SECTOR, SECTOR, "<GPT header>", "metadata");
  const bytes = Math.ceil(count * entrySize / SECTOR) * SECTOR;
  out?.add(entriesLba * SECTOR, bytes, "<GPT entries>", "metadata");
  if (backupLba > 1 && (backupLba + 1) * SECTOR <= reader.size) {
    out?.add(backupLba * SECTOR, SECTOR, "<backup GPT header>", "metadata");
    out?.add((backupLba - bytes / SECTOR) * SECTOR, bytes, "<backup GPT entries>", "metadata");
  }
  const table = await reader.read(entriesLba * SECTOR, count * entrySize);
  const t = new DataView(table.buffer);
  const partitions: Partition[] = [];
  for (let i = 0; i < count; i++) {
    const o = i * entrySize;
    if (table.subarray(o, o + 16).every((b) => b === 0)) continue;
    const first = Number(t.getBigUint64(o + 32, true));
    const last = Number(t.getBigUint64(o + 40, true));
    if (last < first || (last + 1) * SECTOR > reader.size) continue;
    partitions.push({ number: i + 1, offset: first * SECTOR, length: (last - first + 1) * SECTOR });
  }
  return partitions;
}

/** Names what it can of one filesystem-sized area. */
async function analyse(
  reader: DiskReader,
  out: ExtentCollector,
  partition: number,
  offset: number,
): Promise<FoundFilesystem> {
  const found: FoundFilesystem = { partition, offset, length: reader.size, type: "unknown" };
  try {
    if (await isExt(reader)) {
      found.type = "ext";
      found.type = await extOwners(reader, out, offset);
    } else if (await readFatGeometry(reader)) {
      found.type = "FAT";
      found.type = await fatOwners(reader, out, offset);
    }
  } catch (error) {
    // What was named before the damage stays named.
    found.error = (error as Error).message;
  }
  return found;
}

/** Finds the filesystems of a disk and names its blocks. */
export async function blockOwners(reader: DiskReader): Promise<BlockOwners> {
  const out = new ExtentCollector();
  const filesystems: FoundFilesystem[] = [];
  // A filesystem on the whole disk first: a FAT boot sector also ends in 55 AA.
  const whole = await analyse(reader, out, 0, 0);
  if (whole.type !== "unknown") {
    filesystems.push(whole);
  } else {
    const table = await readPartitionTable(reader, out);
    for (const p of table.partitions) {
      filesystems.push(
        await analyse(sliceReader(reader, p.offset, p.length), out, p.number, p.offset),
      );
    }
  }
  return { size: reader.size, filesystems, extents: out.result() };
}
