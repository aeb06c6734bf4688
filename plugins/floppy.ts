/**
 * The `floppy` plugin: a read-only disk holding a FAT32 filesystem
 * generated on the fly from a directory: an MBR with one partition (at
 * 1 MiB), and in it a FAT32 volume with long file names whose files are
 * read from the directory when clients read them (nothing is copied).
 * Mountable by Linux and readable by mtools (`mdir -i disk.img@@1M ::`).
 * Leave the directory alone while serving. Symbolic links and special
 * files are skipped; files must be smaller than 4 GiB.
 *
 * ```
 * nbd serve floppy /path/to/dir
 * nbd serve floppy dir=/path/to/dir label=BACKUP size=64M
 * ```
 *
 * Parameters:
 * - `[dir=]PATH` (required): the directory.
 * - `label=TEXT`: volume label, up to 11 ASCII characters (default NBDFLOPPY).
 * - `size=SIZE`: total disk size (default: just enough for the files).
 *
 * @module
 */

import { open as openFile } from "node:fs/promises";
import type { FileHandle } from "node:fs/promises";
import { NbdError } from "../protocol/errors.ts";
import { completeBackend, type Plugin } from "../core/backend.ts";
import { formatSize } from "../util/parse.ts";
import { UsageError } from "../util/usage_error.ts";

const SECTOR = 512;
/** The partition starts at 1 MiB, as partitioning tools place it. */
const PARTITION_LBA = 2048;
const RESERVED_SECTORS = 32;
/**
 * FAT32 readers (mtools among them) decide the FAT type from the cluster
 * count, so the volume always has at least this many clusters; unused
 * ones are free space that costs nothing (it reads as zeroes).
 */
const MIN_CLUSTERS = 65600;
/** The largest cluster number FAT32 allows, less a margin. */
const MAX_CLUSTERS = 0x0ffffff0;
const FSINFO_SECTOR = 1;
const BACKUP_BOOT_SECTOR = 6;
const END_OF_CHAIN = 0x0fffffff;
const ATTR_READ_ONLY = 0x01;
const ATTR_VOLUME = 0x08;
const ATTR_DIRECTORY = 0x10;
const ATTR_ARCHIVE = 0x20;
const ATTR_LFN = 0x0f;

/** A file or directory of the tree being served. */
interface Node {
  name: string;
  path: string;
  dir: boolean;
  size: number;
  mtime: Date;
  children: Node[];
  /** Directory entries this node's own directory needs (directories only). */
  entries: number;
  /** First cluster (0 for empty files). */
  cluster: number;
  /** Clusters allocated. */
  clusters: number;
}

async function scan(path: string, name: string): Promise<Node> {
  const info = await Deno.stat(path);
  const node: Node = {
    name,
    path,
    dir: info.isDirectory,
    size: info.isDirectory ? 0 : info.size,
    mtime: info.mtime ?? new Date(0),
    children: [],
    entries: 0,
    cluster: 0,
    clusters: 0,
  };
  if (!info.isDirectory) {
    if (info.size >= 2 ** 32) {
      throw new UsageError(
        `floppy: ${path} is ${formatSize(info.size)}; FAT32 files stay below 4G`,
      );
    }
    return node;
  }
  const names: string[] = [];
  for await (const entry of Deno.readDir(path)) {
    if (entry.isFile || entry.isDirectory) names.push(entry.name);
  }
  names.sort();
  for (const child of names) node.children.push(await scan(`${path}/${child}`, child));
  return node;
}

/** Characters allowed in a short (8.3) name besides letters and digits. */
const SHORT_SPECIAL = "$%'-_@~`!(){}^#&";

function shortChars(text: string): string {
  let out = "";
  for (const ch of text.toUpperCase()) {
    if (/[A-Z0-9]/.test(ch) || SHORT_SPECIAL.includes(ch)) out += ch;
    else if (ch !== " " && ch !== ".") out += "_";
  }
  return out;
}

/** Whether `name` is already a valid upper-case 8.3 name (then no long name is needed). */
function isShortName(name: string): boolean {
  const match = /^([^.]{1,8})(?:\.([^.]{1,3}))?$/.exec(name);
  if (!match) return false;
  return shortChars(match[1]!) === match[1] &&
    (match[2] === undefined || shortChars(match[2]) === match[2]);
}

/** Gives every child of a directory an 11-byte short name, unique within it. */
function shortNames(children: Node[]): string[] {
  const used = new Set<string>();
  return children.map((child) => {
    const dot = child.name.lastIndexOf(".");
    const base = shortChars(dot > 0 ? child.name.slice(0, dot) : child.name) || "FILE";
    const ext = dot > 0 ? shortChars(child.name.slice(dot + 1)).slice(0, 3) : "";
    if (isShortName(child.name) && !used.has(child.name)) {
      const name = base.padEnd(8) + ext.padEnd(3);
      used.add(name);
      return name;
    }
    for (let n = 1;; n++) {
      const tail = `~${n}`;
      const name = (base.slice(0, 8 - tail.length) + tail).padEnd(8) + ext.padEnd(3);
      if (!used.has(name)) {
        used.add(name);
        return name;
      }
    }
  });
}

function lfnCount(node: Node): number {
  return isShortName(node.name) ? 0 : Math.ceil(node.name.length / 13);
}

function shortChecksum(short: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < 11; i++) sum = (((sum & 1) << 7) + (sum >> 1) + short[i]!) & 0xff;
  return sum;
}

function dosDate(d: Date): number {
  const year = Math.min(Math.max(d.getUTCFullYear(), 1980), 2107);
  return ((year - 1980) << 9) | ((d.getUTCMonth() + 1) << 5) | d.getUTCDate();
}

function dosTime(d: Date): number {
  return (d.getUTCHours() << 11) | (d.getUTCMinutes() << 5) | Math.floor(d.getUTCSeconds() / 2);
}

/** Writes a short directory entry. */
function shortEntry(
  out: DataView,
  at: number,
  name: string,
  attr: number,
  cluster: number,
  size: number,
  mtime: Date,
): void {
  for (let i = 0; i < 11; i++) out.setUint8(at + i, name.charCodeAt(i));
  out.setUint8(at + 11, attr);
  out.setUint16(at + 14, dosTime(mtime), true); // creation time
  out.setUint16(at + 16, dosDate(mtime), true); // creation date
  out.setUint16(at + 18, dosDate(mtime), true); // last access date
  out.setUint16(at + 20, cluster >>> 16, true);
  out.setUint16(at + 22, dosTime(mtime), true);
  out.setUint16(at + 24, dosDate(mtime), true);
  out.setUint16(at + 26, cluster & 0xffff, true);
  out.setUint32(at + 28, size, true);
}

/** Writes the long-name entries for `name` (last part first, as FAT stores them). */
function longEntries(out: DataView, at: number, name: string, checksum: number): number {
  const count = Math.ceil(name.length / 13);
  const slots = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
  for (let part = count; part >= 1; part--) {
    out.setUint8(at, part | (part === count ? 0x40 : 0));
    out.setUint8(at + 11, ATTR_LFN);
    out.setUint8(at + 13, checksum);
    for (let i = 0; i < 13; i++) {
      const index = (part - 1) * 13 + i;
      const code = index < name.length
        ? name.charCodeAt(index)
        : index === name.length
        ? 0
        : 0xffff;
      out.setUint16(at + slots[i]!, code, true);
    }
    at += 32;
  }
  return at;
}

/** Index of the first region (sorted, not overlapping) that ends after `offset`. */
function firstOverlap<T extends { offset: number }>(
  regions: T[],
  offset: number,
  length: (region: T) => number,
): number {
  let lo = 0;
  let hi = regions.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    const r = regions[mid]!;
    if (r.offset + length(r) <= offset) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The generated filesystem: layout, metadata bytes and where file data lives. */
export class FloppyImage {
  /** Total disk size. */
  readonly size: number;
  /** First byte of the FAT32 volume. */
  readonly volumeStart = PARTITION_LBA * SECTOR;
  readonly #fatSectors: number;
  readonly #clusters: number;
  /** Sectors per cluster: 512-byte clusters unless the files need more. */
  readonly #spc: number;
  /** Fixed metadata: byte offset → bytes (MBR, boot sectors, FSInfo, directories). */
  readonly #meta: Array<{ offset: number; bytes: Uint8Array }> = [];
  /** File data regions, sorted by offset. */
  readonly #files: Array<{ offset: number; size: number; path: string }> = [];
  /** Allocated cluster runs, sorted: [first, count]. */
  readonly #runs: Array<[number, number]> = [];
  readonly #handles = new Map<string, Promise<FileHandle>>();

  private constructor(root: Node, label: string, wanted: number | undefined) {
    // Directory sizes first: entries decide how many clusters a directory needs.
    const dirs: Node[] = [];
    const walk = (node: Node, isRoot: boolean) => {
      if (!node.dir) return;
      node.entries = (isRoot ? 1 : 2) + 1 +
        node.children.reduce((n, c) => n + lfnCount(c) + 1, 0);
      dirs.push(node);
      node.children.forEach((c) => walk(c, false));
    };
    walk(root, true);
    const order: Node[] = [];
    const visit = (node: Node) => {
      order.push(node);
      node.children.forEach(visit);
    };
    visit(root);
    const bytesOf = (node: Node) => node.dir ? node.entries * 32 : node.size;
    let spc = 1;
    while (
      order.reduce((n, node) => n + Math.ceil(bytesOf(node) / (spc * SECTOR)), 0) > MAX_CLUSTERS
    ) spc *= 2;
    if (spc > 128) throw new UsageError("floppy: the files are too large for FAT32");
    this.#spc = spc;
    const clusterBytes = spc * SECTOR;
    // Allocate clusters: the root directory first (cluster 2), then everything in tree order.
    let next = 2;
    const allocate = (node: Node) => {
      node.clusters = Math.ceil(bytesOf(node) / clusterBytes);
      if (node.clusters > 0) {
        node.cluster = next;
        this.#runs.push([next, node.clusters]);
        next += node.clusters;
      }
    };
    order.forEach(allocate);
    let clusters = Math.max(next - 2, MIN_CLUSTERS);
    let fatSectors = Math.ceil((clusters + 2) * 4 / SECTOR);
    const metaSectors = () => RESERVED_SECTORS + 2 * fatSectors;
    if (wanted !== undefined) {
      // Grow the data area until the disk reaches the wanted size.
      const available = Math.floor(wanted / SECTOR) - PARTITION_LBA;
      // Fixed-point iteration: the FAT grows with the cluster count it describes.
      let total = clusters;
      for (let i = 0; i < 8; i++) {
        const fat = Math.ceil((total + 2) * 4 / SECTOR);
        total = Math.floor((available - RESERVED_SECTORS - 2 * fat) / spc);
      }
      while (
        total > 0 &&
        RESERVED_SECTORS + 2 * Math.ceil((total + 2) * 4 / SECTOR) +
              total * spc > available
      ) total--;
      if (total < clusters) {
        throw new UsageError(`floppy: size=${wanted} is too small for the files`);
      }
      clusters = total;
      fatSectors = Math.ceil((clusters + 2) * 4 / SECTOR);
    }
    this.#clusters = clusters;
    this.#fatSectors = fatSectors;
    const volumeSectors = metaSectors() + clusters * spc;
    this.size = wanted ?? (PARTITION_LBA + volumeSectors) * SECTOR;

    this.#meta.push({ offset: 0, bytes: this.#mbr(volumeSectors) });
    const boot = this.#bootSector(volumeSectors, label);
    const fsinfo = this.#fsinfo(clusters - (next - 2), next);
    this.#meta.push({ offset: this.volumeStart, bytes: boot });
    this.#meta.push({ offset: this.volumeStart + FSINFO_SECTOR * SECTOR, bytes: fsinfo });
    this.#meta.push({ offset: this.volumeStart + BACKUP_BOOT_SECTOR * SECTOR, bytes: boot });
    this.#meta.push({
      offset: this.volumeStart + (BACKUP_BOOT_SECTOR + 1) * SECTOR,
      bytes: fsinfo,
    });
    const parents = new Map<Node, Node>();
    for (const dir of dirs) for (const child of dir.children) parents.set(child, dir);
    for (const dir of dirs) {
      this.#meta.push({
        offset: this.#clusterOffset(dir.cluster),
        bytes: this.#directory(dir, dir === root, parents.get(dir), label),
      });
    }
    for (const node of order) {
      if (!node.dir && node.size > 0) {
        this.#files.push({
          offset: this.#clusterOffset(node.cluster),
          size: node.size,
          path: node.path,
        });
      }
    }
    this.#meta.sort((a, b) => a.offset - b.offset);
  }

  /** Scans `dir` and lays out the filesystem. */
  static async create(dir: string, label: string, size?: number): Promise<FloppyImage> {
    const root = await scan(dir, "");
    if (!root.dir) throw new UsageError(`floppy: ${dir} is not a directory`);
    return new FloppyImage(root, label, size);
  }

  #clusterOffset(cluster: number): number {
    const firstData = RESERVED_SECTORS + 2 * this.#fatSectors;
    return this.volumeStart + (firstData + (cluster - 2) * this.#spc) * SECTOR;
  }

  #mbr(volumeSectors: number): Uint8Array {
    const mbr = new Uint8Array(SECTOR);
    const view = new DataView(mbr.buffer);
    const entry = 446;
    // CHS fields say "use LBA" (the maximum); type 0x0C is FAT32 with LBA.
    mbr.set([0xfe, 0xff, 0xff], entry + 1);
    mbr[entry + 4] = 0x0c;
    mbr.set([0xfe, 0xff, 0xff], entry + 5);
    view.setUint32(entry + 8, PARTITION_LBA, true);
    view.setUint32(entry + 12, volumeSectors, true);
    view.setUint32(440, 0x4e424446, true); // disk signature "FDBN"
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    return mbr;
  }

  #bootSector(volumeSectors: number, label: string): Uint8Array {
    const b = new Uint8Array(SECTOR);
    const v = new DataView(b.buffer);
    b.set([0xeb, 0x58, 0x90]);
    b.set(new TextEncoder().encode("MSWIN4.1"), 3);
    v.setUint16(11, SECTOR, true);
    b[13] = this.#spc;
    v.setUint16(14, RESERVED_SECTORS, true);
    b[16] = 2; // FATs
    b[21] = 0xf8; // fixed disk
    v.setUint16(24, 63, true); // sectors per track
    v.setUint16(26, 255, true); // heads
    v.setUint32(28, PARTITION_LBA, true); // hidden sectors
    v.setUint32(32, volumeSectors, true);
    v.setUint32(36, this.#fatSectors, true);
    v.setUint32(44, 2, true); // root directory cluster
    v.setUint16(48, FSINFO_SECTOR, true);
    v.setUint16(50, BACKUP_BOOT_SECTOR, true);
    b[64] = 0x80; // drive number
    b[66] = 0x29; // extended boot signature
    v.setUint32(67, 0x4e424430, true); // volume serial number
    b.set(new TextEncoder().encode(label.padEnd(11)), 71);
    b.set(new TextEncoder().encode("FAT32   "), 82);
    b[510] = 0x55;
    b[511] = 0xaa;
    return b;
  }

  #fsinfo(free: number, nextFree: number): Uint8Array {
    const s = new Uint8Array(SECTOR);
    const v = new DataView(s.buffer);
    v.setUint32(0, 0x41615252, true);
    v.setUint32(484, 0x61417272, true);
    v.setUint32(488, free, true);
    v.setUint32(492, free > 0 ? nextFree : 0xffffffff, true);
    v.setUint32(508, 0xaa550000, true);
    return s;
  }

  #directory(dir: Node, isRoot: boolean, parent: Node | undefined, label: string): Uint8Array {
    const out = new Uint8Array(dir.clusters * this.#spc * SECTOR);
    const view = new DataView(out.buffer);
    let at = 0;
    if (isRoot) {
      shortEntry(view, at, label.padEnd(11), ATTR_VOLUME, 0, 0, dir.mtime);
      at += 32;
    } else {
      shortEntry(view, at, ".".padEnd(11), ATTR_DIRECTORY, dir.cluster, 0, dir.mtime);
      at += 32;
      const up = parent && parent.cluster !== 2 ? parent.cluster : 0;
      shortEntry(view, at, "..".padEnd(11), ATTR_DIRECTORY, up, 0, dir.mtime);
      at += 32;
    }
    const names = shortNames(dir.children);
    dir.children.forEach((child, i) => {
      const short = names[i]!;
      if (lfnCount(child) > 0) {
        const checksum = shortChecksum(new TextEncoder().encode(short));
        at = longEntries(view, at, child.name, checksum);
      }
      const attr = child.dir ? ATTR_DIRECTORY : ATTR_ARCHIVE | ATTR_READ_ONLY;
      shortEntry(view, at, short, attr, child.cluster, child.dir ? 0 : child.size, child.mtime);
      at += 32;
    });
    return out;
  }

  /** The FAT entry of `cluster`. */
  #fatEntry(cluster: number): number {
    if (cluster === 0) return 0x0ffffff8;
    if (cluster === 1) return END_OF_CHAIN;
    const runs = this.#runs;
    let lo = 0;
    let hi = runs.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const [first, count] = runs[mid]!;
      if (cluster < first) hi = mid - 1;
      else if (cluster >= first + count) lo = mid + 1;
      else return cluster === first + count - 1 ? END_OF_CHAIN : cluster + 1;
    }
    return 0; // free
  }

  /** Fills `buf` with the disk's bytes at `offset`. */
  async read(buf: Uint8Array, offset: number): Promise<void> {
    buf.fill(0);
    const end = offset + buf.length;
    for (
      let i = firstOverlap(this.#meta, offset, (m) => m.bytes.length);
      i < this.#meta.length;
      i++
    ) {
      const m = this.#meta[i]!;
      if (m.offset >= end) break;
      const from = Math.max(offset, m.offset);
      const to = Math.min(end, m.offset + m.bytes.length);
      if (from < to) buf.set(m.bytes.subarray(from - m.offset, to - m.offset), from - offset);
    }
    // Both FAT copies, generated from the allocation runs.
    const fatBytes = this.#fatSectors * SECTOR;
    for (let copy = 0; copy < 2; copy++) {
      const start = this.volumeStart + (RESERVED_SECTORS + copy * this.#fatSectors) * SECTOR;
      const from = Math.max(offset, start);
      const to = Math.min(end, start + fatBytes);
      for (let pos = from; pos < to;) {
        const index = Math.floor((pos - start) / 4);
        const value = index < this.#clusters + 2 ? this.#fatEntry(index) : 0;
        const within = (pos - start) % 4;
        const n = Math.min(4 - within, to - pos);
        for (let i = 0; i < n; i++) buf[pos - offset + i] = (value >>> ((within + i) * 8)) & 0xff;
        pos += n;
      }
    }
    for (let i = firstOverlap(this.#files, offset, (f) => f.size); i < this.#files.length; i++) {
      const f = this.#files[i]!;
      if (f.offset >= end) break;
      const from = Math.max(offset, f.offset);
      const to = Math.min(end, f.offset + f.size);
      if (from >= to) continue;
      const handle = await this.#handle(f.path);
      let done = 0;
      const piece = buf.subarray(from - offset, to - offset);
      while (done < piece.length) {
        const { bytesRead } = await handle.read(
          piece,
          done,
          piece.length - done,
          from - f.offset + done,
        );
        if (bytesRead === 0) break; // the file shrank: the rest reads as zeroes
        done += bytesRead;
      }
    }
  }

  #handle(path: string): Promise<FileHandle> {
    let handle = this.#handles.get(path);
    if (!handle) {
      handle = openFile(path, "r").catch((error) => {
        this.#handles.delete(path);
        throw new NbdError("EIO", `cannot open ${path}: ${(error as Error).message}`);
      });
      this.#handles.set(path, handle);
      // Keep a bounded number of files open.
      if (this.#handles.size > 256) {
        const [oldest, promise] = this.#handles.entries().next().value!;
        this.#handles.delete(oldest);
        promise.then((h) => h.close()).catch(() => {});
      }
    }
    return handle;
  }

  /** Closes every open file. */
  async close(): Promise<void> {
    for (const promise of this.#handles.values()) {
      await promise.then((h) => h.close()).catch(() => {});
    }
    this.#handles.clear();
  }
}

/** The floppy plugin. */
export const floppyPlugin: Plugin = {
  name: "floppy",
  summary: "read-only FAT32 disk generated on the fly from a directory",
  description: "The FAT32 partition starts at 1 MiB, e.g. for mtools:\n" +
    "  mdir -i disk.img@@1M ::\n\nExamples:\n  nbd serve floppy /path/to/dir\n" +
    "  nbd serve floppy dir=/path/to/dir label=BACKUP size=64M",
  params: [
    { name: "dir", value: "PATH", type: "path", description: "directory to serve", required: true },
    {
      name: "label",
      value: "TEXT",
      type: "string",
      default: "NBDFLOPPY",
      description: "volume label, up to 11 ASCII characters",
    },
    {
      name: "size",
      value: "SIZE",
      type: "size",
      default: "just enough",
      description: "total disk size",
    },
  ],
  magicParam: "dir",
  async create(params) {
    const dir = params.take("dir")!;
    const label = (params.take("label") ?? "NBDFLOPPY").toUpperCase();
    if (!/^[\x20-\x7e]{1,11}$/.test(label) || /["*+,./:;<=>?[\\\]|]/.test(label)) {
      throw new UsageError("label: up to 11 ASCII letters, digits, spaces or _-!#$%&'()@^`{}~");
    }
    const size = params.takeSize("size");
    let image: FloppyImage;
    try {
      image = await FloppyImage.create(dir, label, size);
    } catch (error) {
      if (error instanceof UsageError) throw error;
      throw new UsageError(`floppy: cannot read ${dir}: ${(error as Error).message}`);
    }
    return {
      open: () =>
        Promise.resolve(completeBackend({
          size: () => image.size,
          capabilities: () => ({ multiConn: true, cache: "none" }),
          pread: (buf, offset) => image.read(buf, offset),
        })),
      close: () => image.close(),
    };
  },
};
