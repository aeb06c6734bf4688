/**
 * Which file owns each block of an ext2/3/4 filesystem, read from its own
 * structures: the superblock, the group descriptors (block and inode
 * bitmaps, inode tables), and from the root directory down every
 * directory's entries and every inode's blocks, through extent trees
 * (ext4) or direct and indirect block maps (ext2/3). Read-only; what is
 * not reachable from the root (orphans) stays unnamed.
 *
 * @module
 */

import type { DiskReader } from "./disk_reader.ts";
import type { ExtentCollector, OwnerKind } from "./owned_extents.ts";

const MAGIC = 0xef53;
const INCOMPAT_64BIT = 0x80;
const INCOMPAT_META_BG = 0x10;
const RO_COMPAT_SPARSE_SUPER = 0x1;
const COMPAT_SPARSE_SUPER2 = 0x200;
const EXTENTS_FL = 0x80000;
const INLINE_DATA_FL = 0x10000000;
const EXTENT_MAGIC = 0xf30a;
const ROOT_INODE = 2;
const RESIZE_INODE = 7;
const S_IFMT = 0xf000;
const S_IFDIR = 0x4000;
const S_IFREG = 0x8000;
const S_IFLNK = 0xa000;
/** Deeper directory trees are not followed (a loop in a damaged filesystem). */
const MAX_DEPTH = 64;
/** Most inodes visited: bounds the time on a huge or damaged filesystem. */
const MAX_INODES = 2_000_000;

/** The superblock fields the walk uses. */
export interface ExtSuperblock {
  /** Bytes per block. */
  blockSize: number;
  /** Blocks in the filesystem. */
  blocks: number;
  /** First data block (1 for 1 KiB blocks, else 0). */
  firstDataBlock: number;
  /** Blocks per group. */
  blocksPerGroup: number;
  /** Inodes per group. */
  inodesPerGroup: number;
  /** Bytes per inode. */
  inodeSize: number;
  /** Bytes per group descriptor. */
  descSize: number;
  /** Reserved GDT blocks after the descriptors. */
  reservedGdtBlocks: number;
  /** Backup superblocks only in groups 0, 1 and powers of 3, 5, 7. */
  sparseSuper: boolean;
  /** Backups only in the two groups named in the superblock (sparse_super2). */
  backupGroups?: [number, number];
  /** Group descriptors spread over meta block groups. */
  metaBg: boolean;
  /** The journal's inode, 0 without one. */
  journalInode: number;
  /** ext2, ext3 or ext4, as far as the features tell. */
  flavour: string;
}

/** Whether `reader` holds an ext2/3/4 filesystem (the superblock magic at byte 1080). */
export async function isExt(reader: DiskReader): Promise<boolean> {
  if (reader.size < 2048) return false;
  const sb = await reader.read(1024, 1024);
  return new DataView(sb.buffer).getUint16(56, true) === MAGIC;
}

/** Reads and checks the superblock; throws on what this walk cannot trust. */
export async function readExtSuperblock(reader: DiskReader): Promise<ExtSuperblock> {
  const sb = await reader.read(1024, 1024);
  const v = new DataView(sb.buffer);
  if (v.getUint16(56, true) !== MAGIC) throw new Error("not an ext2/3/4 filesystem");
  const logBlock = v.getUint32(24, true);
  if (logBlock > 6) throw new Error(`ext: bad block size 2^(10+${logBlock})`);
  const blockSize = 1024 << logBlock;
  const incompat = v.getUint32(96, true);
  const roCompat = v.getUint32(100, true);
  const compat = v.getUint32(92, true);
  const revision = v.getUint32(76, true);
  const is64 = (incompat & INCOMPAT_64BIT) !== 0;
  const blocks = v.getUint32(4, true) + (is64 ? v.getUint32(0x150, true) * 2 ** 32 : 0);
  const inodeSize = revision === 0 ? 128 : v.getUint16(88, true);
  const descSize = is64 ? v.getUint16(254, true) || 64 : 32;
  const blocksPerGroup = v.getUint32(32, true);
  const inodesPerGroup = v.getUint32(40, true);
  if (!blocksPerGroup || !inodesPerGroup || inodeSize < 128 || descSize < 32) {
    throw new Error("ext: inconsistent superblock");
  }
  const hasJournal = (compat & 0x4) !== 0;
  const extents = (incompat & 0x40) !== 0;
  return {
    blockSize,
    blocks,
    firstDataBlock: v.getUint32(20, true),
    blocksPerGroup,
    inodesPerGroup,
    inodeSize,
    descSize,
    reservedGdtBlocks: v.getUint16(206, true),
    sparseSuper: (roCompat & RO_COMPAT_SPARSE_SUPER) !== 0,
    backupGroups: (compat & COMPAT_SPARSE_SUPER2) !== 0
      ? [v.getUint32(0x24c, true), v.getUint32(0x250, true)]
      : undefined,
    metaBg: (incompat & INCOMPAT_META_BG) !== 0,
    journalInode: hasJournal ? v.getUint32(0xe0, true) : 0,
    flavour: extents ? "ext4" : hasJournal ? "ext3" : "ext2",
  };
}

function isPowerOf(n: number, base: number): boolean {
  while (n > 1 && n % base === 0) n /= base;
  return n === 1;
}

/** Whether group `g` holds a backup of the superblock and descriptors. */
function hasBackup(sb: ExtSuperblock, g: number): boolean {
  if (g === 0) return true;
  if (sb.backupGroups) return g === sb.backupGroups[0] || g === sb.backupGroups[1];
  if (!sb.sparseSuper) return true;
  return g === 1 || isPowerOf(g, 3) || isPowerOf(g, 5) || isPowerOf(g, 7);
}

interface Group {
  blockBitmap: number;
  inodeBitmap: number;
  inodeTable: number;
}

interface Inode {
  mode: number;
  size: number;
  flags: number;
  /** i_block: 60 bytes. */
  block: Uint8Array;
}

/** The walk over one filesystem. */
class ExtWalk {
  readonly #reader: DiskReader;
  readonly #sb: ExtSuperblock;
  readonly #out: ExtentCollector;
  readonly #base: number;
  #groups: Group[] = [];
  readonly #seen = new Set<number>();

  constructor(reader: DiskReader, sb: ExtSuperblock, out: ExtentCollector, base: number) {
    this.#reader = reader;
    this.#sb = sb;
    this.#out = out;
    this.#base = base;
  }

  #mark(block: number, count: number, owner: string, kind: OwnerKind): void {
    const bs = this.#sb.blockSize;
    if (block + count > this.#sb.blocks) count = this.#sb.blocks - block;
    if (count <= 0) return;
    this.#out.add(this.#base + block * bs, count * bs, owner, kind);
  }

  #readBlocks(block: number, count = 1): Promise<Uint8Array> {
    if (block + count > this.#sb.blocks) {
      return Promise.reject(new Error(`ext: block ${block} is past the end`));
    }
    return this.#reader.read(block * this.#sb.blockSize, count * this.#sb.blockSize);
  }

  async groupsAndMetadata(): Promise<void> {
    const sb = this.#sb;
    const bs = sb.blockSize;
    const groups = Math.ceil((sb.blocks - sb.firstDataBlock) / sb.blocksPerGroup);
    const gdtBlocks = Math.ceil(groups * sb.descSize / bs);
    const gdt = await this.#readBlocks(sb.firstDataBlock + 1, gdtBlocks);
    const v = new DataView(gdt.buffer);
    const wide = sb.descSize >= 64;
    for (let g = 0; g < groups; g++) {
      const o = g * sb.descSize;
      const hi = (at: number) => wide ? v.getUint32(o + at, true) * 2 ** 32 : 0;
      this.#groups.push({
        blockBitmap: v.getUint32(o, true) + hi(0x20),
        inodeBitmap: v.getUint32(o + 4, true) + hi(0x24),
        inodeTable: v.getUint32(o + 8, true) + hi(0x28),
      });
    }
    // Block 0 before the superblock, with 1 KiB blocks, is the boot block.
    if (sb.firstDataBlock === 1) this.#mark(0, 1, "<boot block>", "metadata");
    const tableBlocks = Math.ceil(sb.inodesPerGroup * sb.inodeSize / bs);
    for (let g = 0; g < groups; g++) {
      const first = sb.firstDataBlock + g * sb.blocksPerGroup;
      if (hasBackup(sb, g)) {
        const which = g === 0 ? "" : `backup, group ${g}`;
        this.#mark(first, 1, which ? `<superblock ${which}>` : "<superblock>", "metadata");
        if (!sb.metaBg) {
          this.#mark(
            first + 1,
            gdtBlocks,
            which ? `<group descriptors ${which}>` : "<group descriptors>",
            "metadata",
          );
          this.#mark(
            first + 1 + gdtBlocks,
            sb.reservedGdtBlocks,
            which ? `<reserved GDT blocks ${which}>` : "<reserved GDT blocks>",
            "metadata",
          );
        }
      }
      const group = this.#groups[g]!;
      this.#mark(group.blockBitmap, 1, `<block bitmap, group ${g}>`, "metadata");
      this.#mark(group.inodeBitmap, 1, `<inode bitmap, group ${g}>`, "metadata");
      this.#mark(group.inodeTable, tableBlocks, `<inode table, group ${g}>`, "metadata");
    }
  }

  async #inode(number: number): Promise<Inode> {
    const sb = this.#sb;
    const g = Math.floor((number - 1) / sb.inodesPerGroup);
    const group = this.#groups[g];
    if (!group || number < 1) throw new Error(`ext: inode ${number} does not exist`);
    const index = (number - 1) % sb.inodesPerGroup;
    const raw = await this.#reader.read(
      group.inodeTable * sb.blockSize + index * sb.inodeSize,
      128,
    );
    const v = new DataView(raw.buffer);
    return {
      mode: v.getUint16(0, true),
      size: v.getUint32(4, true) + v.getUint32(0x6c, true) * 2 ** 32,
      flags: v.getUint32(0x20, true),
      block: raw.slice(0x28, 0x28 + 60),
    };
  }

  /** Every data block of an inode as runs [block, count], marking its tree or map blocks. */
  async #dataRuns(inode: Inode, owner: string): Promise<Array<[number, number]>> {
    if (inode.flags & INLINE_DATA_FL) return [];
    const runs: Array<[number, number]> = [];
    if (inode.flags & EXTENTS_FL) {
      await this.#extentNode(inode.block, owner, runs, 0);
    } else {
      // Fast symbolic links keep their target in i_block.
      if ((inode.mode & S_IFMT) === S_IFLNK && inode.size < 60) return [];
      const v = new DataView(inode.block.buffer, inode.block.byteOffset, 60);
      for (let i = 0; i < 12; i++) pushRun(runs, v.getUint32(i * 4, true));
      for (let level = 1; level <= 3; level++) {
        const pointer = v.getUint32((11 + level) * 4, true);
        if (pointer) await this.#indirect(pointer, level, owner, runs);
      }
    }
    return runs;
  }

  async #extentNode(
    node: Uint8Array,
    owner: string,
    runs: Array<[number, number]>,
    depth: number,
  ): Promise<void> {
    const v = new DataView(node.buffer, node.byteOffset, node.byteLength);
    if (v.getUint16(0, true) !== EXTENT_MAGIC || depth > 8) {
      throw new Error(`ext: bad extent tree in ${owner}`);
    }
    const entries = v.getUint16(2, true);
    const treeDepth = v.getUint16(6, true);
    for (let i = 0; i < entries; i++) {
      const o = 12 + i * 12;
      if (o + 12 > node.byteLength) break;
      if (treeDepth === 0) {
        let len = v.getUint16(o + 4, true);
        if (len > 32768) len -= 32768; // an unwritten (preallocated) extent
        const start = v.getUint16(o + 6, true) * 2 ** 32 + v.getUint32(o + 8, true);
        if (len > 0) runs.push([start, len]);
      } else {
        const leaf = v.getUint32(o + 4, true) + v.getUint16(o + 8, true) * 2 ** 32;
        this.#mark(leaf, 1, `<extent tree of ${owner}>`, "metadata");
        await this.#extentNode(await this.#readBlocks(leaf), owner, runs, depth + 1);
      }
    }
  }

  async #indirect(
    block: number,
    level: number,
    owner: string,
    runs: Array<[number, number]>,
  ): Promise<void> {
    this.#mark(block, 1, `<block map of ${owner}>`, "metadata");
    const data = await this.#readBlocks(block);
    const v = new DataView(data.buffer);
    for (let i = 0; i < data.length / 4; i++) {
      const pointer = v.getUint32(i * 4, true);
      if (!pointer) continue;
      if (level === 1) pushRun(runs, pointer);
      else await this.#indirect(pointer, level - 1, owner, runs);
    }
  }

  /** Marks an inode's blocks as `owner`'s; returns its data runs. */
  async #own(number: number, owner: string, kind: OwnerKind): Promise<Array<[number, number]>> {
    const inode = await this.#inode(number);
    const runs = await this.#dataRuns(inode, owner);
    for (const [block, count] of runs) this.#mark(block, count, owner, kind);
    return runs;
  }

  async specialInodes(): Promise<void> {
    if (this.#sb.journalInode) await this.#own(this.#sb.journalInode, "<journal>", "metadata");
    if (this.#sb.reservedGdtBlocks > 0) {
      // The resize inode maps the reserved GDT blocks (named already) through
      // one double-indirect block: that block is all it owns besides them.
      const inode = await this.#inode(RESIZE_INODE);
      const dind = new DataView(inode.block.buffer).getUint32(13 * 4, true);
      if (dind) this.#mark(dind, 1, "<resize inode>", "metadata");
    }
  }

  async tree(): Promise<void> {
    await this.#directory(ROOT_INODE, "/", 0);
  }

  async #directory(number: number, path: string, depth: number): Promise<void> {
    if (this.#seen.has(number) || depth > MAX_DEPTH || this.#seen.size > MAX_INODES) return;
    this.#seen.add(number);
    const inode = await this.#inode(number);
    const runs = await this.#dataRuns(inode, path);
    const bs = this.#sb.blockSize;
    for (const [block, count] of runs) this.#mark(block, count, path, "directory");
    for (const [start, count] of runs) {
      for (let b = start; b < start + count; b++) {
        const data = await this.#readBlocks(b);
        const v = new DataView(data.buffer);
        for (let o = 0; o + 8 <= bs;) {
          const child = v.getUint32(o, true);
          const recLen = v.getUint16(o + 4, true);
          const nameLen = data[o + 6]!;
          if (recLen < 8 || o + recLen > bs) break; // damaged: stop at this block
          if (child && nameLen && o + 8 + nameLen <= bs) {
            const name = new TextDecoder().decode(data.subarray(o + 8, o + 8 + nameLen));
            if (name !== "." && name !== "..") await this.#entry(child, path + name, depth);
          }
          o += recLen;
        }
      }
    }
  }

  async #entry(number: number, path: string, depth: number): Promise<void> {
    if (this.#seen.has(number)) return; // another name of a file already named
    const inode = await this.#inode(number);
    const type = inode.mode & S_IFMT;
    if (type === S_IFDIR) return await this.#directory(number, path + "/", depth + 1);
    this.#seen.add(number);
    if (type === S_IFREG || type === S_IFLNK) await this.#own(number, path, "file");
  }
}

function pushRun(runs: Array<[number, number]>, block: number): void {
  if (!block) return;
  const last = runs[runs.length - 1];
  if (last && last[0] + last[1] === block) last[1]++;
  else runs.push([block, 1]);
}

/**
 * Names the blocks of the ext2/3/4 filesystem in `reader` into `out`, at
 * offsets shifted by `base` (where the filesystem starts on the disk).
 * Returns the flavour found ("ext4"...).
 */
export async function extOwners(
  reader: DiskReader,
  out: ExtentCollector,
  base = 0,
): Promise<string> {
  const sb = await readExtSuperblock(reader);
  const walk = new ExtWalk(reader, sb, out, base);
  await walk.groupsAndMetadata();
  await walk.specialInodes();
  await walk.tree();
  return sb.flavour;
}
