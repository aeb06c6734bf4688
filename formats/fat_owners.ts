/**
 * Which file owns each cluster of a FAT12/16/32 filesystem, read from its
 * own structures: the boot sector, the FATs, and from the root directory
 * down every directory's entries (long names included), following each
 * file's cluster chain. Read-only.
 *
 * @module
 */

import type { DiskReader } from "./disk_reader.ts";
import type { ExtentCollector, OwnerKind } from "./owned_extents.ts";

const ATTR_VOLUME = 0x08;
const ATTR_DIRECTORY = 0x10;
const ATTR_LFN = 0x0f;
const MAX_DEPTH = 64;

/** The boot sector fields the walk uses. */
export interface FatGeometry {
  /** 12, 16 or 32. */
  bits: 12 | 16 | 32;
  /** Bytes per sector. */
  sectorSize: number;
  /** Bytes per cluster. */
  clusterSize: number;
  /** Reserved sectors before the first FAT. */
  reservedSectors: number;
  /** Number of FATs. */
  fats: number;
  /** Sectors per FAT. */
  fatSectors: number;
  /** Root directory entries (FAT12/16). */
  rootEntries: number;
  /** First cluster of the root directory (FAT32). */
  rootCluster: number;
  /** Data clusters. */
  clusters: number;
  /** Byte offset of cluster 2. */
  dataStart: number;
}

/** Reads the boot sector if it is a FAT one; undefined otherwise. */
export async function readFatGeometry(reader: DiskReader): Promise<FatGeometry | undefined> {
  if (reader.size < 512) return undefined;
  const b = await reader.read(0, 512);
  const v = new DataView(b.buffer);
  if (b[510] !== 0x55 || b[511] !== 0xaa) return undefined;
  if (b[0] !== 0xeb && b[0] !== 0xe9) return undefined;
  const sectorSize = v.getUint16(11, true);
  const perCluster = b[13]!;
  const reservedSectors = v.getUint16(14, true);
  const fats = b[16]!;
  const rootEntries = v.getUint16(17, true);
  const total = v.getUint16(19, true) || v.getUint32(32, true);
  const fatSectors = v.getUint16(22, true) || v.getUint32(36, true);
  if (
    ![512, 1024, 2048, 4096].includes(sectorSize) || !perCluster ||
    (perCluster & (perCluster - 1)) !== 0 || !reservedSectors || fats < 1 || fats > 4 ||
    !fatSectors || !total
  ) return undefined;
  const rootSectors = Math.ceil(rootEntries * 32 / sectorSize);
  const dataSector = reservedSectors + fats * fatSectors + rootSectors;
  if (dataSector >= total) return undefined;
  const clusters = Math.floor((total - dataSector) / perCluster);
  // The type is decided by the cluster count alone, as the specification says.
  const bits = clusters < 4085 ? 12 : clusters < 65525 ? 16 : 32;
  return {
    bits,
    sectorSize,
    clusterSize: sectorSize * perCluster,
    reservedSectors,
    fats,
    fatSectors,
    rootEntries,
    rootCluster: bits === 32 ? v.getUint32(44, true) : 0,
    clusters,
    dataStart: dataSector * sectorSize,
  };
}

/** A long name's characters from one LFN entry (UCS-2 at the three places it keeps them). */
function lfnChars(entry: Uint8Array): number[] {
  const v = new DataView(entry.buffer, entry.byteOffset, 32);
  const chars: number[] = [];
  for (const [from, count] of [[1, 5], [14, 6], [28, 2]] as const) {
    for (let i = 0; i < count; i++) chars.push(v.getUint16(from + i * 2, true));
  }
  return chars;
}

/** The checksum of an 8.3 name that its LFN entries carry. */
function shortNameChecksum(name: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < 11; i++) sum = (((sum & 1) << 7) + (sum >> 1) + name[i]!) & 0xff;
  return sum;
}

/** An 8.3 name as readers show it: lower-case parts when the entry's flags say so. */
function shortName(entry: Uint8Array): string {
  const latin = (bytes: Uint8Array) => String.fromCharCode(...bytes).replace(/ +$/, "");
  let base = latin(entry.subarray(0, 8));
  let ext = latin(entry.subarray(8, 11));
  if (entry[0] === 0x05) base = "\u00e5" + base.slice(1);
  if (entry[12]! & 0x08) base = base.toLowerCase();
  if (entry[12]! & 0x10) ext = ext.toLowerCase();
  return ext ? `${base}.${ext}` : base;
}

class FatWalk {
  readonly #reader: DiskReader;
  readonly #g: FatGeometry;
  readonly #out: ExtentCollector;
  readonly #base: number;
  #fat: Uint8Array = new Uint8Array();
  readonly #seen = new Set<number>();

  constructor(reader: DiskReader, g: FatGeometry, out: ExtentCollector, base: number) {
    this.#reader = reader;
    this.#g = g;
    this.#out = out;
    this.#base = base;
  }

  async metadata(): Promise<void> {
    const g = this.#g;
    const s = g.sectorSize;
    this.#out.add(
      this.#base,
      g.reservedSectors * s,
      "<boot sector and reserved sectors>",
      "metadata",
    );
    for (let i = 0; i < g.fats; i++) {
      this.#out.add(
        this.#base + (g.reservedSectors + i * g.fatSectors) * s,
        g.fatSectors * s,
        `<FAT ${i + 1}>`,
        "metadata",
      );
    }
    if (g.bits !== 32) {
      this.#out.add(
        this.#base + (g.reservedSectors + g.fats * g.fatSectors) * s,
        Math.ceil(g.rootEntries * 32 / s) * s,
        "/",
        "directory",
      );
    }
    this.#fat = await this.#reader.read(g.reservedSectors * s, g.fatSectors * s);
  }

  #next(cluster: number): number {
    const fat = this.#fat;
    if (this.#g.bits === 32) {
      const o = cluster * 4;
      if (o + 4 > fat.length) return -1;
      return new DataView(fat.buffer).getUint32(o, true) & 0x0fffffff;
    }
    if (this.#g.bits === 16) {
      const o = cluster * 2;
      if (o + 2 > fat.length) return -1;
      return new DataView(fat.buffer).getUint16(o, true);
    }
    const o = Math.floor(cluster * 1.5);
    if (o + 2 > fat.length) return -1;
    const pair = fat[o]! | (fat[o + 1]! << 8);
    return cluster & 1 ? pair >> 4 : pair & 0xfff;
  }

  /** The cluster chain from `first`, stopping at its end, a bad link or a loop. */
  #chain(first: number): number[] {
    const chain: number[] = [];
    const end = this.#g.bits === 32 ? 0x0ffffff8 : this.#g.bits === 16 ? 0xfff8 : 0xff8;
    const visited = new Set<number>();
    for (let c = first; c >= 2 && c < this.#g.clusters + 2 && !visited.has(c);) {
      visited.add(c);
      chain.push(c);
      const next = this.#next(c);
      if (next < 2 || next >= end) break;
      c = next;
    }
    return chain;
  }

  #own(chain: number[], owner: string, kind: OwnerKind): void {
    const size = this.#g.clusterSize;
    for (const c of chain) {
      this.#out.add(this.#base + this.#g.dataStart + (c - 2) * size, size, owner, kind);
    }
  }

  async tree(): Promise<void> {
    const g = this.#g;
    if (g.bits === 32) {
      const chain = this.#chain(g.rootCluster);
      this.#own(chain, "/", "directory");
      await this.#directory(await this.#readChain(chain), "/", 0);
    } else {
      const s = g.sectorSize;
      const root = await this.#reader.read(
        (g.reservedSectors + g.fats * g.fatSectors) * s,
        g.rootEntries * 32,
      );
      await this.#directory(root, "/", 0);
    }
  }

  async #readChain(chain: number[]): Promise<Uint8Array> {
    const size = this.#g.clusterSize;
    const out = new Uint8Array(chain.length * size);
    for (let i = 0; i < chain.length; i++) {
      out.set(await this.#reader.read(this.#g.dataStart + (chain[i]! - 2) * size, size), i * size);
    }
    return out;
  }

  async #directory(data: Uint8Array, path: string, depth: number): Promise<void> {
    if (depth > MAX_DEPTH) return;
    let long: number[][] = [];
    let longSum = -1;
    for (let o = 0; o + 32 <= data.length; o += 32) {
      const entry = data.subarray(o, o + 32);
      if (entry[0] === 0x00) break; // no entries after this one
      if (entry[0] === 0xe5) {
        long = [];
        continue;
      }
      const attr = entry[11]!;
      if ((attr & 0x3f) === ATTR_LFN) {
        const seq = entry[0]!;
        if (seq & 0x40) long = [];
        long[(seq & 0x1f) - 1] = lfnChars(entry);
        longSum = entry[13]!;
        continue;
      }
      let name = shortName(entry);
      if (long.length && longSum === shortNameChecksum(entry)) {
        const chars = long.flat();
        const end = chars.indexOf(0);
        name = String.fromCharCode(...(end >= 0 ? chars.slice(0, end) : chars));
      }
      long = [];
      if (attr & ATTR_VOLUME) continue;
      if (name === "." || name === "..") continue;
      const v = new DataView(entry.buffer, entry.byteOffset, 32);
      const first = (this.#g.bits === 32 ? v.getUint16(20, true) * 65536 : 0) +
        v.getUint16(26, true);
      if (first < 2 || this.#seen.has(first)) continue;
      this.#seen.add(first);
      const chain = this.#chain(first);
      if (attr & ATTR_DIRECTORY) {
        const dir = `${path}${name}/`;
        this.#own(chain, dir, "directory");
        await this.#directory(await this.#readChain(chain), dir, depth + 1);
      } else {
        // Clusters past the file's size (a damaged chain) are not the file's.
        const size = v.getUint32(28, true);
        const used = Math.ceil(size / this.#g.clusterSize);
        this.#own(chain.slice(0, used), path + name, "file");
      }
    }
  }
}

/**
 * Names the clusters of the FAT filesystem in `reader` into `out`, at
 * offsets shifted by `base`. Returns "FAT12", "FAT16" or "FAT32".
 */
export async function fatOwners(
  reader: DiskReader,
  out: ExtentCollector,
  base = 0,
): Promise<string> {
  const geometry = await readFatGeometry(reader);
  if (!geometry) throw new Error("not a FAT filesystem");
  const walk = new FatWalk(reader, geometry, out, base);
  await walk.metadata();
  await walk.tree();
  return `FAT${geometry.bits}`;
}
