/**
 * A qcow2 image over any byte store: the guest view (read, block status)
 * and, when the store is writable, writes, zeroes and discards with
 * cluster allocation and refcounts. One instance is shared by every user
 * of the image; each call names the store to use (a connection's own).
 *
 * Metadata changes are kept in memory and written on `flush` in an order
 * that survives a crash at any point without corruption: refcount blocks
 * (after the data), then the refcount table, then L2 tables, then the L1
 * table, then the header; clusters freed by a change are released only
 * once the change is durable, and space is never reused before that.
 *
 * @module
 */

import { KeyedLocks, Mutex } from "../../util/locks.ts";
import {
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  parseHeader,
  putU64,
  QCOW2_MAGIC,
  Qcow2FormatError,
  type Qcow2Header,
} from "./header.ts";
import { compressionLoaded, decompressCluster, loadCompression } from "./compress.ts";

/** The byte store an image lives in (a Backend fits). */
export interface ImageStore {
  /** Size of the store when opened. */
  size(): number;
  /** Reads `buf.length` bytes at `offset`. */
  pread(buf: Uint8Array, offset: number): Promise<void>;
  /** Writes; absent = read-only. */
  pwrite?(buf: Uint8Array, offset: number, flags: { fua: boolean }): Promise<void>;
  /** Makes writes durable. */
  flush?(): Promise<void>;
  /** Frees a range (a hint). */
  trim?(offset: number, length: number, flags: { fua: boolean }): Promise<void>;
}

/** What lies below an image: its backing file (raw or qcow2). */
export interface Layer {
  /** Guest size. */
  readonly size: number;
  /** Reads guest bytes (only within `size`). */
  read(buf: Uint8Array, offset: number): Promise<void>;
  /** Runs of allocation from `offset` within `size`: [length, kind]. */
  status(offset: number, length: number): Promise<StatusRun[]>;
  /**
   * Where in the chain the bytes from `offset` come from: 1 = this layer,
   * 2 = the one below..., 0 = nowhere (they read as zeroes). Absent = 1.
   */
  depth?(offset: number, length: number): Promise<DepthRun[]>;
  /** Releases the layer. */
  close(): Promise<void>;
}

/** Kinds of guest ranges. */
export const UNALLOCATED = 0;
/** Reads as zeroes (zero cluster or subcluster). */
export const ZERO = 1;
/** Plain data at a host offset. */
export const DATA = 2;
/** A compressed cluster. */
export const COMPRESSED = 3;

/** A run of guest bytes of one kind. */
export interface Run {
  /** UNALLOCATED, ZERO, DATA or COMPRESSED. */
  kind: number;
  /** Length in bytes. */
  length: number;
  /** Host offset of the run's first byte (DATA). */
  host: number;
  /** Compressed data: host offset and stored length (COMPRESSED). */
  compressed?: { offset: number; size: number };
  /** Guest offset of the cluster (COMPRESSED). */
  cluster?: number;
}

/** Block status of the guest: data, zero (reads as zeroes), with the layer depth. */
export interface StatusRun {
  /** Length. */
  length: number;
  /** Reads as zeroes. */
  zero: boolean;
  /** Allocated in this image or a backing file (not a hole). */
  data: boolean;
}

/** A run of guest bytes that come from one level of the backing chain. */
export interface DepthRun {
  /** Length. */
  length: number;
  /** 1 = the image itself, 2 = its backing file, ..., 0 = unallocated everywhere. */
  depth: number;
}

/** Neighbouring compressed clusters read together (`Qcow2Image.read`). */
interface CompressedBatch {
  /** File range to read. */
  start: number;
  end: number;
  /** Each cluster's stored bytes and where it inflates to. */
  clusters: { offset: number; length: number; piece: Uint8Array }[];
}

/** Options when opening an image. */
export interface OpenOptions {
  /** Open for writing. */
  writable: boolean;
  /** The backing layer, when the image has one and it may be followed. */
  backing?: Layer;
  /** Called with warnings (e.g. read-only because of the dirty bit). */
  warn?: (message: string) => void;
}

const COPIED = 0x80000000; // bit 63, in the high word
const COMPRESSED_BIT = 0x40000000; // bit 62, in the high word
const MAX_CACHED_CLUSTERS = 16;
/** Most bytes of neighbouring compressed clusters fetched in one read. */
const MAX_COMPRESSED_READ = 4 << 20;
/** Unused bytes a read of neighbouring compressed clusters may span between two of them. */
const COMPRESSED_GAP = 512;
/** Written at the end of a new cluster that its data does not reach. */
const ZERO_SECTOR = new Uint8Array(512);
const FLUSH_AFTER_DIRTY = 512;

/** An L2 entry as stored: the two words and, for extended entries, the bitmaps. */
interface RawEntry {
  hi: number;
  lo: number;
  zeroBits: number;
  allocBits: number;
}

/** An error on one request: EIO for the caller (the message says why). */
export class Qcow2IoError extends Error {
  /** Wraps a message. */
  constructor(message: string) {
    super(message);
    this.name = "Qcow2IoError";
  }
}

function fail(message: string): never {
  throw new Qcow2IoError(message);
}

/** Reads and checks the header of the image in `store`. */
export async function readHeader(store: ImageStore): Promise<Qcow2Header> {
  const fileSize = store.size();
  // The header and its extensions fill at most the first cluster: its size comes first.
  const start = new Uint8Array(Math.min(fileSize, 512));
  if (start.length < 72) throw new Qcow2FormatError("not a qcow2 image: the file is too short");
  await store.pread(start, 0);
  const view = new DataView(start.buffer);
  const bits = view.getUint32(0) === QCOW2_MAGIC ? view.getUint32(20) : 0;
  if (bits <= 9 || bits > 21) return parseHeader(start, fileSize);
  const first = new Uint8Array(Math.min(fileSize, 2 ** bits));
  await store.pread(first, 0);
  return parseHeader(first, fileSize);
}

/** A qcow2 image open for reading, and for writing when the store allows. */
export class Qcow2Image {
  /** The parsed header. */
  readonly header: Qcow2Header;
  /** Guest size. */
  readonly size: number;
  /** Cluster size. */
  readonly clusterSize: number;
  /** Whether writes are accepted. */
  readonly writable: boolean;
  /** Why the image is read-only although writing was asked for, if it is. */
  readonly readonlyReason?: string;
  /** The backing layer, if followed. */
  readonly backing?: Layer;
  readonly #extended: boolean;
  readonly #entrySize: number;
  readonly #l2Entries: number;
  readonly #subclusterSize: number;
  readonly #l1: Uint8Array;
  readonly #l1View: DataView;
  #l1Dirty = false;
  readonly #l2 = new Map<number, Uint8Array>();
  readonly #l2Dirty = new Set<number>();
  readonly #l2Loading = new Map<number, Promise<Uint8Array>>();
  readonly #meta = new Mutex();
  readonly #clusterCache = new Map<number, Uint8Array>();
  readonly #metadata = new Set<number>();
  // Refcounts (writable images only).
  #reftable: Float64Array;
  #reftableOffset: number;
  #reftableClusters: number;
  #reftableDirty = false;
  #reftableMoved: { offset: number; clusters: number } | undefined;
  readonly #refblocks = new Map<number, Uint8Array>();
  readonly #refblocksDirty = new Set<number>();
  readonly #refBits: number;
  readonly #refEntries: number;
  #pendingFree: [number, number][] = [];
  readonly #locks = new KeyedLocks();
  /**
   * Idle cluster buffers, all zero: a partial write into a new cluster puts
   * its piece into one instead of a fresh buffer (zeroing and faulting in a
   * whole cluster for each small write), and clears only the piece after.
   */
  #end: number;
  #headerDirty = false;
  #autoclear: number;
  #incompatible: number;
  readonly #fileSize: number;

  private constructor(
    header: Qcow2Header,
    l1: Uint8Array,
    reftable: Float64Array,
    store: ImageStore,
    options: OpenOptions,
    readonlyReason: string | undefined,
  ) {
    this.header = header;
    this.size = header.size;
    this.clusterSize = header.clusterSize;
    this.backing = options.backing;
    this.#extended = (header.incompatible & INCOMPAT_EXTL2) !== 0;
    this.#entrySize = this.#extended ? 16 : 8;
    this.#l2Entries = header.clusterSize / this.#entrySize;
    this.#subclusterSize = this.#extended ? header.clusterSize / 32 : header.clusterSize;
    this.#l1 = l1;
    this.#l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    this.#reftable = reftable;
    this.#reftableOffset = header.refcountTableOffset;
    this.#reftableClusters = header.refcountTableClusters;
    this.#refBits = 2 ** header.refcountOrder;
    this.#refEntries = header.clusterSize * 8 / this.#refBits;
    this.#fileSize = store.size();
    this.#end = Math.ceil(this.#fileSize / header.clusterSize) * header.clusterSize;
    this.#autoclear = header.autoclear;
    this.#incompatible = header.incompatible;
    this.readonlyReason = readonlyReason;
    this.writable = options.writable && readonlyReason === undefined;
    const cs = header.clusterSize;
    this.#metadata.add(0);
    for (let at = header.l1TableOffset; at < header.l1TableOffset + header.l1Size * 8; at += cs) {
      this.#metadata.add(Math.floor(at / cs) * cs);
    }
    for (let i = 0; i < header.refcountTableClusters; i++) {
      this.#metadata.add(header.refcountTableOffset + i * cs);
    }
    for (const offset of reftable) if (offset) this.#metadata.add(offset);
    for (let i = 0; i < header.l1Size; i++) {
      const offset = this.#l1Offset(i);
      if (offset) this.#metadata.add(offset);
    }
  }

  /**
   * Opens the image in `store`: reads and checks the header, the L1 table
   * and the refcount table. Throws Qcow2FormatError with a one-line message
   * when the image is malformed or uses something unsupported.
   */
  static async open(store: ImageStore, options: OpenOptions): Promise<Qcow2Image> {
    const fileSize = store.size();
    const header = await readHeader(store);
    if (header.cryptMethod !== 0 || header.encryptionExtension) {
      throw new Qcow2FormatError(
        `encrypted qcow2 images (${header.cryptMethod === 1 ? "AES" : "LUKS"}) are not supported`,
      );
    }
    if (header.incompatible & INCOMPAT_DATA_FILE) {
      throw new Qcow2FormatError(
        `images with an external data file (${JSON.stringify(header.dataFile)}) are not supported`,
      );
    }
    const l1 = new Uint8Array(header.l1Size * 8);
    if (l1.length) await store.pread(l1, header.l1TableOffset);
    const cs = header.clusterSize;
    const l1View = new DataView(l1.buffer);
    for (let i = 0; i < header.l1Size; i++) {
      const hi = l1View.getUint32(i * 8);
      const lo = l1View.getUint32(i * 8 + 4);
      const offset = (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
      if (offset === 0) continue;
      if (offset % cs !== 0 || (lo & 0x1ff) !== 0) {
        throw new Qcow2FormatError(`L1 entry ${i} is not cluster-aligned`);
      }
      if (offset + cs > fileSize) {
        throw new Qcow2FormatError(`L1 entry ${i} points past the end of the file`);
      }
    }
    let readonlyReason: string | undefined;
    if (header.incompatible & INCOMPAT_CORRUPT) readonlyReason = "the image is marked corrupt";
    else if (header.incompatible & INCOMPAT_DIRTY) {
      readonlyReason = "the image's dirty bit is set (its refcounts may be stale)";
    } else if (header.nbSnapshots > 0) readonlyReason = "the image has internal snapshots";
    else if (!store.pwrite) readonlyReason = "the layer below is read-only";
    let reftable = new Float64Array(0);
    if (options.writable && readonlyReason === undefined) {
      const raw = new Uint8Array(header.refcountTableClusters * cs);
      await store.pread(raw, header.refcountTableOffset);
      const view = new DataView(raw.buffer);
      reftable = new Float64Array(raw.length / 8);
      for (let i = 0; i < reftable.length; i++) {
        const hi = view.getUint32(i * 8);
        const lo = view.getUint32(i * 8 + 4);
        const offset = hi * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
        if (offset === 0) continue;
        if (hi >= 0x200000 || offset % cs !== 0 || offset + cs > fileSize) {
          throw new Qcow2FormatError(
            `refcount table entry ${i} is invalid or past the end of the file`,
          );
        }
        reftable[i] = offset;
      }
    }
    if (options.writable && readonlyReason !== undefined) {
      options.warn?.(`qcow2: ${readonlyReason}: serving it read-only`);
    }
    return new Qcow2Image(header, l1, reftable, store, options, readonlyReason);
  }

  #l1Offset(index: number): number {
    const hi = this.#l1View.getUint32(index * 8);
    const lo = this.#l1View.getUint32(index * 8 + 4);
    return (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
  }

  /** The L2 table of L1 entry `index`, or undefined when unallocated. */
  async #table(store: ImageStore, index: number): Promise<Uint8Array | undefined> {
    const offset = this.#l1Offset(index);
    if (offset === 0) return undefined;
    const cached = this.#l2.get(offset);
    if (cached) return cached;
    let loading = this.#l2Loading.get(offset);
    if (!loading) {
      loading = (async () => {
        const cs = this.clusterSize;
        if (offset + cs > Math.max(this.#end, this.#fileSize)) {
          fail("an L2 table lies past the end of the file");
        }
        if (
          offset === 0 || offset === this.#reftableOffset ||
          (offset >= this.header.l1TableOffset &&
            offset < this.header.l1TableOffset + this.header.l1Size * 8)
        ) {
          fail("an L2 table overlaps other metadata");
        }
        const table = new Uint8Array(cs);
        await store.pread(table, offset);
        this.#l2.set(offset, table);
        return table;
      })();
      this.#l2Loading.set(offset, loading);
      loading.finally(() => this.#l2Loading.delete(offset)).catch(() => {});
    }
    return await loading;
  }

  /**
   * The run of guest bytes at `offset` (at most `length`) that has one kind
   * and, for data, contiguous host bytes.
   */
  async lookup(store: ImageStore, offset: number, length: number): Promise<Run> {
    const cs = this.clusterSize;
    const end = offset + length;
    let run: Run | undefined;
    let pos = offset;
    while (pos < end) {
      const cluster = Math.floor(pos / cs);
      const l1Index = Math.floor(cluster / this.#l2Entries);
      const table = await this.#table(store, l1Index);
      const clusterEnd = Math.min((cluster + 1) * cs, end);
      let piece: Run;
      if (!table) {
        // A whole L2 table's range is unallocated.
        const tableEnd = Math.min((l1Index + 1) * this.#l2Entries * cs, end);
        piece = { kind: UNALLOCATED, length: tableEnd - pos, host: 0 };
      } else {
        piece = this.#entryRun(table, cluster % this.#l2Entries, cluster * cs, pos, clusterEnd);
      }
      if (!run) run = piece;
      else if (
        piece.kind === run.kind && piece.kind !== COMPRESSED &&
        (piece.kind !== DATA || piece.host === run.host + run.length)
      ) {
        run.length += piece.length;
      } else break;
      pos += piece.length;
      if (run.kind === COMPRESSED) break;
    }
    return run!;
  }

  /**
   * Where the guest bytes [offset, offset + length) lie in the image file,
   * when all of them are plain data in one contiguous run of host bytes
   * and the mapping is known without I/O (its L2 tables are cached);
   * undefined otherwise (unallocated, zero, compressed, discontiguous, not
   * cached, or malformed: reading the ordinary way says which).
   *
   * On a writable image only clusters this image alone owns (the COPIED
   * flag) count: a write lands in them in place, never elsewhere, and
   * their space, once freed by a change that overlaps the guest range,
   * reads as zeroes and is never reused (`#allocate` only appends). So the
   * host bytes stay the guest bytes of this range, or what a concurrent
   * request on it made of them, for as long as a caller sends from them.
   */
  hostRange(offset: number, length: number): number | undefined {
    const cs = this.clusterSize;
    const end = offset + length;
    if (length <= 0 || end > this.size) return undefined;
    const limit = Math.max(this.#end, this.#fileSize);
    let start = -1;
    let pos = offset;
    try {
      while (pos < end) {
        const cluster = Math.floor(pos / cs);
        const l2 = this.#l1Offset(Math.floor(cluster / this.#l2Entries));
        const table = l2 ? this.#l2.get(l2) : undefined;
        if (!table) return undefined;
        const index = cluster % this.#l2Entries;
        if (this.writable) {
          const hi = (table[index * this.#entrySize]! << 24) >>> 0;
          if (!(hi & COPIED)) return undefined;
        }
        const clusterEnd = Math.min((cluster + 1) * cs, end);
        // An extended entry's run ends where the subclusters' kind changes: several per cluster.
        while (pos < clusterEnd) {
          const run = this.#entryRun(table, index, cluster * cs, pos, clusterEnd);
          if (run.kind !== DATA) return undefined;
          if (start < 0) start = run.host;
          else if (run.host !== start + pos - offset) return undefined;
          pos += run.length;
        }
      }
    } catch {
      return undefined;
    }
    return start + length <= limit ? start : undefined;
  }

  /** The run within one cluster from `pos` to at most `limit`. */
  #entryRun(table: Uint8Array, index: number, start: number, pos: number, limit: number): Run {
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const at = index * this.#entrySize;
    const hi = view.getUint32(at);
    const lo = view.getUint32(at + 4);
    const cs = this.clusterSize;
    if (hi & COMPRESSED_BIT) {
      const entry = (BigInt(hi) << 32n) | BigInt(lo);
      const x = BigInt(62 - (this.header.clusterBits - 8));
      const host = Number(entry & ((1n << x) - 1n));
      const sectors = Number((entry >> x) & ((1n << BigInt(this.header.clusterBits - 8)) - 1n));
      const size = (sectors + 1) * 512 - (host % 512);
      return {
        kind: COMPRESSED,
        length: limit - pos,
        host: 0,
        compressed: { offset: host, size },
        cluster: start,
      };
    }
    const host = (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
    if (host % cs !== 0 || (hi & 0x3f000000) !== 0) fail("an L2 entry is not cluster-aligned");
    if (!this.#extended) {
      const kind = lo & 1 ? ZERO : host ? DATA : UNALLOCATED;
      return { kind, length: limit - pos, host: kind === DATA ? host + pos - start : 0 };
    }
    if (lo & 1) fail("an extended L2 entry has its reserved zero bit set");
    const zeroBits = view.getUint32(at + 8);
    const allocBits = view.getUint32(at + 12);
    if (zeroBits & allocBits) fail("a subcluster is marked both allocated and zero");
    if (allocBits && host === 0) fail("allocated subclusters without a host cluster");
    const scs = this.#subclusterSize;
    const kindOf = (sc: number) =>
      (zeroBits >>> sc) & 1 ? ZERO : (allocBits >>> sc) & 1 ? DATA : UNALLOCATED;
    let sc = Math.floor((pos - start) / scs);
    const kind = kindOf(sc);
    while (sc < 31 && start + (sc + 1) * scs < limit && kindOf(sc + 1) === kind) sc++;
    const runEnd = Math.min(start + (sc + 1) * scs, limit);
    return { kind, length: runEnd - pos, host: kind === DATA ? host + pos - start : 0 };
  }

  /** How many bytes to read for a compressed cluster (checked against the file). */
  #compressedLength(compressed: { offset: number; size: number }): number {
    const limit = Math.max(this.#end, this.#fileSize);
    if (compressed.offset >= limit || compressed.offset < this.clusterSize) {
      fail("a compressed cluster lies outside the file");
    }
    return Math.min(compressed.size, limit - compressed.offset, 2 * this.clusterSize + 512);
  }

  /**
   * Reads `length` bytes at `offset` of the file. The descriptor of a compressed
   * cluster counts whole 512-byte sectors, so the last one may reach past the end
   * of the file: what is there is read, the rest stays zero.
   */
  async #readCompressed(store: ImageStore, offset: number, length: number): Promise<Uint8Array> {
    const data = new Uint8Array(length);
    const stored = Math.max(0, Math.min(length, store.size() - offset));
    if (stored > 0) await store.pread(data.subarray(0, stored), offset);
    if (!compressionLoaded()) await loadCompression();
    return data;
  }

  /** Inflates one cluster's stored bytes into `out`. */
  #decompress(data: Uint8Array, out: Uint8Array): void {
    try {
      decompressCluster(this.header.compressionType, data, out);
    } catch (error) {
      fail((error as Error).message);
    }
  }

  /**
   * The inflated contents of a compressed cluster, kept in a small cache;
   * with `into` (a whole cluster's room the caller reads entirely), inflated
   * there and not cached: sequential readers never come back for it.
   */
  async #inflate(
    store: ImageStore,
    compressed: { offset: number; size: number },
    into?: Uint8Array,
  ): Promise<Uint8Array> {
    const cached = this.#clusterCache.get(compressed.offset);
    if (cached) {
      into?.set(cached);
      return cached;
    }
    const length = this.#compressedLength(compressed);
    const data = await this.#readCompressed(store, compressed.offset, length);
    const out = into ?? new Uint8Array(this.clusterSize);
    this.#decompress(data, out);
    if (into) return out;
    if (this.#clusterCache.size >= MAX_CACHED_CLUSTERS) {
      this.#clusterCache.delete(this.#clusterCache.keys().next().value!);
    }
    this.#clusterCache.set(compressed.offset, out);
    return out;
  }

  /**
   * Whole compressed clusters whose stored bytes lie next to each other in
   * the file (as a compressing writer leaves them): one read for them all,
   * then each is inflated straight into its piece of the caller's buffer.
   */
  async #inflateBatch(store: ImageStore, batch: CompressedBatch): Promise<void> {
    const data = await this.#readCompressed(store, batch.start, batch.end - batch.start);
    for (const { offset, length, piece } of batch.clusters) {
      const at = offset - batch.start;
      this.#decompress(data.subarray(at, at + length), piece);
    }
  }

  /** Reads guest bytes. */
  async read(store: ImageStore, buf: Uint8Array, offset: number): Promise<void> {
    const end = offset + buf.length;
    if (end > this.size) fail("read past the end of the image");
    // The mapping is mostly in memory; the pieces are read while later ones are looked up.
    // Every piece started is settled before this returns or throws: a failed piece is then
    // never an unhandled rejection (which would end the process), and no piece still
    // writes into `buf` once the caller has it back.
    const reads: Promise<void>[] = [];
    let pos = offset;
    let lookupFailed = false;
    let lookupError: unknown;
    const start = (read: Promise<void>) => {
      read.catch(() => {}); // reported below, after all pieces settle
      reads.push(read);
    };
    let batch: CompressedBatch | undefined;
    try {
      while (pos < end) {
        const run = await this.lookup(store, pos, end - pos);
        const piece = buf.subarray(pos - offset, pos - offset + run.length);
        const whole = run.kind === COMPRESSED && pos === run.cluster &&
          run.length === this.clusterSize && !this.#clusterCache.has(run.compressed!.offset);
        if (whole) {
          const at = run.compressed!.offset;
          const length = this.#compressedLength(run.compressed!);
          if (
            batch && at >= batch.start && at <= batch.end + COMPRESSED_GAP &&
            Math.max(batch.end, at + length) - batch.start <= MAX_COMPRESSED_READ
          ) {
            batch.end = Math.max(batch.end, at + length);
          } else {
            if (batch) start(this.#inflateBatch(store, batch));
            batch = { start: at, end: at + length, clusters: [] };
          }
          batch.clusters.push({ offset: at, length, piece });
        } else {
          if (batch) start(this.#inflateBatch(store, batch));
          batch = undefined;
          start(this.#readRun(store, run, piece, pos));
        }
        pos += run.length;
      }
      if (batch) start(this.#inflateBatch(store, batch));
    } catch (error) {
      lookupFailed = true;
      lookupError = error;
    }
    const results = await Promise.allSettled(reads);
    if (lookupFailed) throw lookupError;
    for (const r of results) if (r.status === "rejected") throw r.reason;
  }

  async #readRun(store: ImageStore, run: Run, piece: Uint8Array, pos: number): Promise<void> {
    switch (run.kind) {
      case DATA:
        if (run.host + piece.length > Math.max(this.#end, this.#fileSize)) {
          fail("a data cluster lies past the end of the file");
        }
        await store.pread(piece, run.host);
        return;
      case ZERO:
        piece.fill(0);
        return;
      case COMPRESSED: {
        const within = pos - run.cluster!;
        if (within === 0 && piece.length === this.clusterSize) {
          await this.#inflate(store, run.compressed!, piece);
          return;
        }
        const cluster = await this.#inflate(store, run.compressed!);
        piece.set(cluster.subarray(within, within + piece.length));
        return;
      }
      default:
        await this.#readBelow(piece, pos);
    }
  }

  /** Reads from the backing layer, zeroes past its end or without one. */
  async #readBelow(piece: Uint8Array, pos: number): Promise<void> {
    const backing = this.backing;
    const n = backing ? Math.max(0, Math.min(piece.length, backing.size - pos)) : 0;
    if (n > 0) await backing!.read(piece.subarray(0, n), pos);
    piece.fill(0, n);
  }

  /** Block status of the guest from `offset`, merged into runs. */
  async status(store: ImageStore, offset: number, length: number): Promise<StatusRun[]> {
    const end = offset + length;
    const out: StatusRun[] = [];
    const push = (n: number, data: boolean, zero: boolean) => {
      const last = out[out.length - 1];
      if (last && last.data === data && last.zero === zero) last.length += n;
      else out.push({ length: n, data, zero });
    };
    let pos = offset;
    while (pos < end) {
      const run = await this.lookup(store, pos, end - pos);
      if (run.kind === DATA || run.kind === COMPRESSED) push(run.length, true, false);
      else if (run.kind === ZERO) push(run.length, false, true);
      else {
        const backing = this.backing;
        const n = backing ? Math.max(0, Math.min(run.length, backing.size - pos)) : 0;
        if (n > 0) {
          let covered = 0;
          for (const r of await backing!.status(pos, n)) {
            const m = Math.min(r.length, n - covered);
            if (m <= 0) break;
            push(m, r.data, r.zero);
            covered += m;
          }
          if (covered < n) push(n - covered, true, false);
        }
        if (run.length > n) push(run.length - n, false, true);
      }
      pos += run.length;
    }
    return out;
  }

  /**
   * Allocation depth of the guest from `offset` (as qemu's
   * `qemu:allocation-depth`): 1 where this image holds the bytes (data,
   * compressed or zero), n + 1 where backing level n does (or where it
   * ends before the image), 0 where no layer does.
   */
  async depth(store: ImageStore, offset: number, length: number): Promise<DepthRun[]> {
    const end = offset + length;
    const out: DepthRun[] = [];
    const push = (n: number, depth: number) => {
      const last = out[out.length - 1];
      if (last && last.depth === depth) last.length += n;
      else out.push({ length: n, depth });
    };
    let pos = offset;
    while (pos < end) {
      const run = await this.lookup(store, pos, end - pos);
      if (run.kind !== UNALLOCATED) push(run.length, 1);
      else {
        const backing = this.backing;
        const n = backing ? Math.max(0, Math.min(run.length, backing.size - pos)) : 0;
        if (n > 0) {
          const below = backing!.depth ? await backing!.depth(pos, n) : [{ length: n, depth: 1 }];
          let covered = 0;
          for (const r of below) {
            const m = Math.min(r.length, n - covered);
            if (m <= 0) break;
            push(m, r.depth ? r.depth + 1 : 0);
            covered += m;
          }
          if (covered < n) push(n - covered, 0);
        }
        // Past the end of the backing file, the bytes (zeroes) count as its own, as in qemu.
        if (run.length > n) push(run.length - n, backing ? 2 : 0);
      }
      pos += run.length;
    }
    return out;
  }

  // ---- Writing ----

  #refGet(block: Uint8Array, i: number): number {
    const bits = this.#refBits;
    const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
    switch (bits) {
      case 8:
        return block[i]!;
      case 16:
        return view.getUint16(i * 2);
      case 32:
        return view.getUint32(i * 4);
      case 64:
        return view.getUint32(i * 8) * 2 ** 32 + view.getUint32(i * 8 + 4);
      default: {
        const bit = i * bits;
        return (block[bit >> 3]! >> (bit & 7)) & ((1 << bits) - 1);
      }
    }
  }

  #refSet(block: Uint8Array, i: number, value: number): void {
    const bits = this.#refBits;
    if (value < 0 || value >= 2 ** Math.min(bits, 53)) fail("a refcount overflows its width");
    const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
    switch (bits) {
      case 8:
        block[i] = value;
        return;
      case 16:
        view.setUint16(i * 2, value);
        return;
      case 32:
        view.setUint32(i * 4, value);
        return;
      case 64:
        putU64(view, i * 8, value);
        return;
      default: {
        const bit = i * bits;
        const mask = ((1 << bits) - 1) << (bit & 7);
        block[bit >> 3] = (block[bit >> 3]! & ~mask) | (value << (bit & 7));
      }
    }
  }

  /** The refcount block with index `b`, loaded when needed; undefined when absent. */
  async #refblock(store: ImageStore, b: number): Promise<Uint8Array | undefined> {
    const cached = this.#refblocks.get(b);
    if (cached) return cached;
    const offset = b < this.#reftable.length ? this.#reftable[b]! : 0;
    if (!offset) return undefined;
    const block = new Uint8Array(this.clusterSize);
    await store.pread(block, offset);
    if (!this.#refblocks.has(b)) this.#refblocks.set(b, block);
    return this.#refblocks.get(b)!;
  }

  /** Adds `delta` to the refcount of the host cluster at `offset` (refblock must exist). */
  async #refAdd(store: ImageStore, offset: number, delta: number): Promise<number> {
    const index = offset / this.clusterSize;
    const b = Math.floor(index / this.#refEntries);
    const block = await this.#refblock(store, b);
    if (!block) fail("a cluster has no refcount block");
    const i = index % this.#refEntries;
    const value = this.#refGet(block, i) + delta;
    this.#refSet(block, i, value);
    this.#refblocksDirty.add(b);
    return value;
  }

  /**
   * Moves the refcount table to a larger place at the end of the file with
   * room for at least `entries` entries. The old table stays valid on disk
   * until the header points at the new one (at flush). Under the lock.
   */
  async #moveReftable(store: ImageStore, entries: number): Promise<void> {
    const cs = this.clusterSize;
    const old = this.#reftable;
    // Slack for the refcount blocks that describe the new table itself.
    const grown = Math.max(entries, old.length * 2) + 64;
    const clusters = Math.ceil(grown * 8 / cs);
    const table = new Float64Array(clusters * cs / 8);
    table.set(old);
    if (this.#reftableMoved) {
      // A table placed since the last flush and never written: its clusters go back.
      for (let i = 0; i < this.#reftableClusters; i++) {
        this.#metadata.delete(this.#reftableOffset + i * cs);
        this.#pendingFree.push([this.#reftableOffset + i * cs, 1]);
      }
    } else {
      this.#reftableMoved = { offset: this.#reftableOffset, clusters: this.#reftableClusters };
    }
    this.#reftable = table;
    const at = await this.#allocate(store, clusters);
    this.#reftableOffset = at;
    this.#reftableClusters = clusters;
    this.#reftableDirty = true;
    this.#headerDirty = true;
    for (let i = 0; i < clusters; i++) this.#metadata.add(at + i * cs);
  }

  /**
   * Allocates `n` contiguous clusters at the end of the file with refcount
   * 1, creating refcount blocks (and moving the table) as needed. Under the
   * metadata lock.
   */
  async #allocate(store: ImageStore, n: number): Promise<number> {
    const cs = this.clusterSize;
    for (let rounds = 0;; rounds++) {
      if (rounds > 1_000_000) fail("cluster allocation does not converge");
      const start = this.#end;
      const firstBlock = Math.floor(start / cs / this.#refEntries);
      const lastBlock = Math.floor((start / cs + n - 1) / this.#refEntries);
      if (lastBlock >= this.#reftable.length) {
        await this.#moveReftable(store, lastBlock + 1);
        continue;
      }
      let missing = -1;
      for (let b = firstBlock; b <= lastBlock; b++) {
        if (!this.#reftable[b]) {
          missing = b;
          break;
        }
      }
      if (missing < 0) {
        for (let i = 0; i < n; i++) await this.#refAdd(store, start + i * cs, 1);
        this.#end = start + n * cs;
        return start;
      }
      // A new refcount block at the end of the file, counted in itself when it
      // is the block that covers the end, else in the block that does.
      const at = start;
      const own = firstBlock;
      const target = this.#reftable[own] ? missing : own;
      this.#refblocks.set(target, new Uint8Array(cs));
      this.#reftable[target] = at;
      this.#reftableDirty = true;
      this.#refblocksDirty.add(target);
      this.#metadata.add(at);
      this.#end = at + cs;
      await this.#refAdd(store, at, 1);
    }
  }

  #setEntry(table: Uint8Array, index: number, hi: number, lo: number, bitmap?: [number, number]) {
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const at = index * this.#entrySize;
    view.setUint32(at, hi);
    view.setUint32(at + 4, lo);
    if (this.#extended && bitmap) {
      view.setUint32(at + 8, bitmap[0]);
      view.setUint32(at + 12, bitmap[1]);
    }
  }

  /** The L2 table for guest cluster `cluster`, created (zeroed) when absent. Under the lock. */
  async #tableForWrite(store: ImageStore, cluster: number): Promise<Uint8Array> {
    const l1Index = Math.floor(cluster / this.#l2Entries);
    const existing = await this.#table(store, l1Index);
    if (existing) return existing;
    const at = await this.#allocate(store, 1);
    const table = new Uint8Array(this.clusterSize);
    this.#l2.set(at, table);
    this.#l2Dirty.add(at);
    this.#metadata.add(at);
    putU64(this.#l1View, l1Index * 8, at);
    this.#l1View.setUint32(l1Index * 8, this.#l1View.getUint32(l1Index * 8) | COPIED);
    this.#l1Dirty = true;
    return table;
  }

  /** Queues the host clusters an entry used for release after the next durable change. */
  #release(run: Run): void {
    const cs = this.clusterSize;
    if (run.kind === COMPRESSED) {
      const { offset, size } = run.compressed!;
      const first = Math.floor(offset / cs);
      const last = Math.floor((offset + size - 1) / cs);
      for (let c = first; c <= last; c++) this.#pendingFree.push([c * cs, 1]);
    } else if (run.host) {
      this.#pendingFree.push([Math.floor(run.host / cs) * cs, 1]);
    }
  }

  /** The raw entry of guest cluster `cluster` (in an existing table), or undefined. */
  #entryOf(table: Uint8Array | undefined, cluster: number): RawEntry | undefined {
    if (!table) return undefined;
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const at = (cluster % this.#l2Entries) * this.#entrySize;
    return {
      hi: view.getUint32(at),
      lo: view.getUint32(at + 4),
      zeroBits: this.#extended ? view.getUint32(at + 8) : 0,
      allocBits: this.#extended ? view.getUint32(at + 12) : 0,
    };
  }

  /**
   * Fails unless the image is writable. Before the first change, the
   * autoclear bits (bitmaps, ...) are cleared on disk: those features are
   * not maintained, so they must read as stale from then on.
   */
  async #beginWrite(store: ImageStore): Promise<void> {
    if (!this.writable) {
      fail(`the image is read-only${this.readonlyReason ? `: ${this.readonlyReason}` : ""}`);
    }
    if (this.#autoclear === 0) return;
    await this.#meta.run(async () => {
      if (this.#autoclear === 0) return;
      this.#autoclear = 0;
      await this.#writeHeader(store);
      await store.flush?.();
    });
  }

  /** Whether guest cluster `cluster` is plain data (all of it) that may be written in place. */
  #inPlace(e: RawEntry | undefined): number {
    if (!e || (e.hi & COMPRESSED_BIT) || !(e.hi & COPIED)) return 0;
    const host = (e.hi & 0x00ffffff) * 2 ** 32 + ((e.lo & 0xfffffe00) >>> 0);
    if (!host || (!this.#extended && (e.lo & 1))) return 0;
    if (this.#extended && e.allocBits !== 0xffffffff) return 0;
    if (this.#metadata.has(host)) fail("a data cluster overlaps metadata");
    // Writing there would extend the file to wherever a corrupt entry points.
    if (host + this.clusterSize > Math.max(this.#end, this.#fileSize)) {
      fail("a data cluster lies past the end of the file");
    }
    return host;
  }

  /** Writes guest bytes: in place where the cluster is ours, else into new clusters. */
  async write(store: ImageStore, buf: Uint8Array, offset: number): Promise<void> {
    await this.#beginWrite(store);
    const cs = this.clusterSize;
    const end = offset + buf.length;
    if (end > this.size) fail("write past the end of the image");
    let pos = offset;
    while (pos < end) {
      const cluster = Math.floor(pos / cs);
      const table = await this.#table(store, Math.floor(cluster / this.#l2Entries));
      const entry = this.#entryOf(table, cluster);
      const host = this.#inPlace(entry);
      if (!host && this.#extended && this.#ownedHost(entry)) {
        // Our cluster, but only some subclusters hold data: written at subcluster granularity.
        const runEnd = Math.min((cluster + 1) * cs, end);
        await this.#writeSubclusters(store, buf.subarray(pos - offset, runEnd - offset), pos);
        pos = runEnd;
        continue;
      }
      if (host) {
        // A run of clusters already ours, contiguous on the host: one write.
        let runEnd = Math.min((cluster + 1) * cs, end);
        while (runEnd < end) {
          const c = runEnd / cs;
          const t = await this.#table(store, Math.floor(c / this.#l2Entries));
          if (this.#inPlace(this.#entryOf(t, c)) !== host + (c - cluster) * cs) break;
          runEnd = Math.min(runEnd + cs, end);
        }
        await store.pwrite!(
          buf.subarray(pos - offset, runEnd - offset),
          host + pos - cluster * cs,
          {
            fua: false,
          },
        );
        pos = runEnd;
        continue;
      }
      // Whole clusters needing new space: allocated together, written at once.
      let runEnd = Math.min((cluster + 1) * cs, end);
      if (pos === cluster * cs && runEnd - pos === cs) {
        while (runEnd + cs <= end) {
          const c = runEnd / cs;
          const t = await this.#table(store, Math.floor(c / this.#l2Entries));
          if (this.#inPlace(this.#entryOf(t, c))) break;
          runEnd += cs;
        }
        await this.#writeNew(store, buf.subarray(pos - offset, runEnd - offset), cluster);
      } else {
        // A partial cluster: the rest comes from what the guest sees now. The
        // cluster's lock keeps disjoint writes into one cluster from losing each other.
        const piece = buf.subarray(pos - offset, runEnd - offset);
        if (this.#extended) {
          await this.#writeSubclusters(store, piece, pos);
          pos = runEnd;
          continue;
        }
        await this.#locks.run(cluster, async () => {
          const t = await this.#table(store, Math.floor(cluster / this.#l2Entries));
          const host = this.#inPlace(this.#entryOf(t, cluster));
          if (host) {
            await store.pwrite!(piece, host + pos - cluster * cs, { fua: false });
            return;
          }
          const within = pos - cluster * cs;
          if (this.#readsAsZero(t, cluster)) {
            // Nothing to copy: a new cluster lies past everything the file held, so
            // what is not written in it reads as zeroes; only the piece is written.
            await this.#writeNew(store, piece, cluster, within);
            return;
          }
          const block = new Uint8Array(cs);
          const visible = Math.min(cs, this.size - cluster * cs);
          await this.read(store, block.subarray(0, visible), cluster * cs);
          block.set(piece, within);
          await this.#writeNew(store, block, cluster);
        });
      }
      pos = runEnd;
    }
  }

  /** The host cluster of an entry that is ours to write in place (any subclusters), or 0. */
  #ownedHost(e: RawEntry | undefined): number {
    if (!e || (e.hi & COMPRESSED_BIT) || !(e.hi & COPIED)) return 0;
    const host = (e.hi & 0x00ffffff) * 2 ** 32 + (e.lo & 0xfffffe00);
    if (host && this.#metadata.has(host)) fail("a data cluster overlaps metadata");
    return host;
  }

  /** The bitmap of subclusters `first` to `last` (exclusive). */
  #subclusterMask(first: number, last: number): number {
    let mask = 0;
    for (let i = first; i < last; i++) mask |= 1 << i;
    return mask >>> 0;
  }

  /**
   * Writes `piece` (within one cluster of an extended-L2 image) at
   * subcluster granularity: only the subclusters it touches are stored,
   * in the cluster's host space (allocated now when it has none), and the
   * partial subclusters at its ends are completed from what the guest sees
   * now. Other subclusters keep their state (zero, unallocated, data).
   */
  async #writeSubclusters(store: ImageStore, piece: Uint8Array, pos: number): Promise<void> {
    const cs = this.clusterSize;
    const scs = this.#subclusterSize;
    const cluster = Math.floor(pos / cs);
    const base = cluster * cs;
    const l1Index = Math.floor(cluster / this.#l2Entries);
    await this.#locks.run(cluster, async () => {
      for (;;) {
        const entry = this.#entryOf(await this.#table(store, l1Index), cluster);
        const current = entry ? (entry.hi & 0x00ffffff) * 2 ** 32 + (entry.lo & 0xfffffe00) : 0;
        const owned = this.#ownedHost(entry);
        if (entry && current && !owned) {
          // Compressed or shared: the whole cluster is copied into a new one.
          const block = new Uint8Array(cs);
          const visible = Math.min(cs, this.size - base);
          await this.read(store, block.subarray(0, visible), base);
          block.set(piece, pos - base);
          await this.#writeNew(store, block, cluster);
          return;
        }
        const host = owned || await this.#meta.run(() => this.#allocate(store, 1));
        const allocated = owned ? entry!.allocBits : 0;
        const first = Math.floor((pos - base) / scs);
        const last = Math.ceil((pos + piece.length - base) / scs);
        const isData = (sc: number) => ((allocated >>> sc) & 1) === 1;
        // Partial end subclusters already holding data are written in place as they are.
        const from = isData(first) ? pos : base + first * scs;
        const to = isData(last - 1) ? pos + piece.length : Math.min(base + last * scs, this.size);
        let data = piece;
        if (from < pos || to > pos + piece.length) {
          data = new Uint8Array(to - from);
          if (from < pos) await this.read(store, data.subarray(0, pos - from), from);
          const after = pos + piece.length;
          if (to > after) await this.read(store, data.subarray(after - from), after);
          data.set(piece, pos - from);
        }
        await store.pwrite!(data, host + from - base, { fua: false });
        const mask = this.#subclusterMask(first, last);
        const mapped = await this.#meta.run(async () => {
          const table = await this.#tableForWrite(store, cluster);
          const now = this.#entryOf(table, cluster)!;
          const nowHost = (now.hi & 0x00ffffff) * 2 ** 32 + (now.lo & 0xfffffe00);
          if (nowHost !== (owned ? host : 0) || (now.hi & COMPRESSED_BIT)) {
            // Changed meanwhile (a whole-cluster write or a deallocation): try again.
            if (!owned) this.#pendingFree.push([host, 1]);
            return false;
          }
          this.#setEntry(
            table,
            cluster % this.#l2Entries,
            (Math.floor(host / 2 ** 32) | COPIED) >>> 0,
            host >>> 0,
            [(now.zeroBits & ~mask) >>> 0, (now.allocBits | mask) >>> 0],
          );
          this.#l2Dirty.add(this.#l1Offset(l1Index));
          return true;
        });
        if (mapped) break;
      }
    });
    await this.#maybeFlush(store);
  }

  /**
   * Makes the subcluster-aligned part of [from, to) (within one cluster of
   * an extended-L2 image) read as zeroes through the zero bitmap; with
   * `deallocate`, a host cluster left without data is freed. The rest of
   * the range is written as zeroes.
   */
  async #zeroSubclusters(
    store: ImageStore,
    from: number,
    to: number,
    deallocate: boolean,
  ): Promise<void> {
    const cs = this.clusterSize;
    const scs = this.#subclusterSize;
    const cluster = Math.floor(from / cs);
    const base = cluster * cs;
    const first = Math.ceil((from - base) / scs);
    // The image's last, partial subcluster counts as whole when the range reaches the end.
    const last = to === this.size ? Math.ceil((to - base) / scs) : Math.floor((to - base) / scs);
    if (first >= last) return await this.#writeZeroes(store, from, to - from);
    const l1Index = Math.floor(cluster / this.#l2Entries);
    // Without a table or a backing file, the whole cluster reads as zeroes already.
    if (!this.backing && !(await this.#table(store, l1Index))) return;
    const done = await this.#locks.run(cluster, () =>
      this.#meta.run(async () => {
        const existing = await this.#table(store, l1Index);
        const before = this.#entryOf(existing, cluster);
        if (before && (before.hi & COMPRESSED_BIT)) return false;
        const table = existing ?? await this.#tableForWrite(store, cluster);
        const e = this.#entryOf(table, cluster)!;
        const mask = this.#subclusterMask(first, last);
        const alloc = (e.allocBits & ~mask) >>> 0;
        let host = (e.hi & 0x00ffffff) * 2 ** 32 + (e.lo & 0xfffffe00);
        if (host && !(e.hi & COPIED) && (e.allocBits & mask)) return false; // shared: copy it
        if (deallocate && host && alloc === 0 && (e.hi & COPIED)) {
          this.#release({ kind: DATA, length: 0, host });
          host = 0;
        }
        const hi = host ? (Math.floor(host / 2 ** 32) | (e.hi & COPIED)) >>> 0 : 0;
        this.#setEntry(table, cluster % this.#l2Entries, hi, host >>> 0, [
          (e.zeroBits | mask) >>> 0,
          alloc,
        ]);
        this.#l2Dirty.add(this.#l1Offset(l1Index));
        return true;
      }));
    if (!done) return await this.#writeZeroes(store, from, to - from);
    if (from < base + first * scs) await this.#writeZeroes(store, from, base + first * scs - from);
    const tail = Math.min(base + last * scs, this.size);
    if (tail < to) await this.#writeZeroes(store, tail, to - tail);
  }

  /**
   * Whether guest cluster `cluster` (of a non-extended image, with its L2
   * table `table`, if it has one) reads as zeroes: a zero cluster, or unallocated with no
   * backing file under it.
   */
  #readsAsZero(table: Uint8Array | undefined, cluster: number): boolean {
    const cs = this.clusterSize;
    const run = !table ? { kind: UNALLOCATED } : this.#entryRun(
      table,
      cluster % this.#l2Entries,
      cluster * cs,
      cluster * cs,
      (cluster + 1) * cs,
    );
    if (run.kind === ZERO) return true;
    return run.kind === UNALLOCATED && (!this.backing || cluster * cs >= this.backing.size);
  }

  /**
   * Stores clusters from `cluster` on in newly allocated space and maps
   * them; `data` goes `skip` bytes into the first one. New space lies past
   * everything the file held, so what is not written reads as zeroes: the
   * head before `skip`, and the tail after the data, of which only the last
   * sector is written, so that the file covers the whole cluster.
   */
  async #writeNew(
    store: ImageStore,
    data: Uint8Array,
    cluster: number,
    skip = 0,
  ): Promise<void> {
    const cs = this.clusterSize;
    const n = Math.ceil((skip + data.length) / cs);
    const at = await this.#meta.run(() => this.#allocate(store, n));
    await store.pwrite!(data, at + skip, { fua: false });
    const written = at + skip + data.length;
    const end = at + n * cs;
    if (written < end) {
      const from = Math.max(written, end - ZERO_SECTOR.length);
      await store.pwrite!(ZERO_SECTOR.subarray(0, end - from), from, { fua: false });
    }
    await this.#meta.run(async () => {
      for (let i = 0; i < n; i++) {
        const c = cluster + i;
        const table = await this.#tableForWrite(store, c);
        const old = this.#entryRun(table, c % this.#l2Entries, c * cs, c * cs, (c + 1) * cs);
        this.#releaseEntry(table, c, old);
        const host = at + i * cs;
        this.#setEntry(
          table,
          c % this.#l2Entries,
          (Math.floor(host / 2 ** 32) | COPIED) >>> 0,
          host >>> 0,
          [0, 0xffffffff],
        );
        this.#l2Dirty.add(this.#l1Offset(Math.floor(c / this.#l2Entries)));
        this.#clusterCache.clear();
      }
    });
    await this.#maybeFlush(store);
  }

  /** Releases what a cluster's current entry holds (a compressed run or its host cluster). */
  #releaseEntry(table: Uint8Array, c: number, first: Run): void {
    if (first.kind === COMPRESSED) return this.#release(first);
    const e = this.#entryOf(table, c)!;
    const host = (e.hi & 0x00ffffff) * 2 ** 32 + ((e.lo & 0xfffffe00) >>> 0);
    if (host) this.#release({ kind: DATA, length: 0, host });
  }

  /**
   * Makes a range read as zeroes: whole clusters become zero clusters
   * (version 3) or are deallocated (version 2 without a backing file);
   * the rest is written as zeroes. With `deallocate`, clusters are freed.
   */
  async zero(
    store: ImageStore,
    offset: number,
    length: number,
    deallocate: boolean,
  ): Promise<void> {
    await this.#beginWrite(store);
    const cs = this.clusterSize;
    const end = offset + length;
    const firstWhole = Math.ceil(offset / cs);
    let lastWhole = Math.floor(end / cs); // exclusive
    // The image's last, partial cluster counts as whole when the range reaches the end.
    if (end === this.size && end % cs !== 0) lastWhole++;
    const v2 = this.header.version === 2;
    // Partial clusters: zero subclusters where the image has them, else zero data.
    const partial = (from: number, to: number) =>
      this.#extended
        ? this.#zeroSubclusters(store, from, to, deallocate)
        : this.#writeZeroes(store, from, to - from);
    if (firstWhole >= lastWhole || (v2 && this.backing)) {
      if (!this.#extended) return await this.#writeZeroes(store, offset, length);
      for (let at = offset; at < end;) {
        const next = Math.min((Math.floor(at / cs) + 1) * cs, end);
        await partial(at, next);
        at = next;
      }
      return;
    }
    if (offset < firstWhole * cs) await partial(offset, firstWhole * cs);
    await this.#meta.run(async () => {
      for (let c = firstWhole; c < lastWhole; c++) {
        const l1Index = Math.floor(c / this.#l2Entries);
        let table = await this.#table(store, l1Index);
        if (!table) {
          if (!this.backing) {
            c = (l1Index + 1) * this.#l2Entries - 1; // nothing to do in this table's range
            continue;
          }
          table = await this.#tableForWrite(store, c);
        }
        const old = this.#entryRun(table, c % this.#l2Entries, c * cs, c * cs, (c + 1) * cs);
        const e = this.#entryOf(table, c)!;
        const host = old.kind === COMPRESSED
          ? 0
          : (e.hi & 0x00ffffff) * 2 ** 32 + ((e.lo & 0xfffffe00) >>> 0);
        const keep = !v2 && host !== 0 && !deallocate && (e.hi & COPIED) !== 0;
        if (!keep) this.#releaseEntry(table, c, old);
        const index = c % this.#l2Entries;
        if (v2) this.#setEntry(table, index, 0, 0);
        else if (this.#extended) {
          const h = keep ? (Math.floor(host / 2 ** 32) | COPIED) >>> 0 : 0;
          this.#setEntry(table, index, h, keep ? host >>> 0 : 0, [0xffffffff, 0]);
        } else if (keep) {
          this.#setEntry(
            table,
            index,
            (Math.floor(host / 2 ** 32) | COPIED) >>> 0,
            (host | 1) >>> 0,
          );
        } else if (!this.backing && old.kind === UNALLOCATED) continue;
        else this.#setEntry(table, index, 0, 1);
        this.#l2Dirty.add(this.#l1Offset(l1Index));
      }
      this.#clusterCache.clear();
    });
    const tail = Math.min(lastWhole * cs, this.size);
    if (tail < end) await partial(tail, end);
    await this.#maybeFlush(store);
  }

  async #writeZeroes(store: ImageStore, offset: number, length: number): Promise<void> {
    const chunk = new Uint8Array(Math.min(length, 1024 * 1024));
    for (let done = 0; done < length; done += chunk.length) {
      await this.write(
        store,
        chunk.subarray(0, Math.min(chunk.length, length - done)),
        offset + done,
      );
    }
  }

  /**
   * Discards whole clusters (subclusters in extended-L2 images) of a range;
   * partial ones are left alone: trim is a hint.
   */
  async discard(store: ImageStore, offset: number, length: number): Promise<void> {
    await this.#beginWrite(store);
    const cs = this.#subclusterSize;
    const end = offset + length;
    let last = Math.floor(end / cs);
    if (end === this.size && end % cs !== 0) last++;
    const first = Math.ceil(offset / cs);
    if (first >= last) return;
    if (this.backing && this.header.version === 2) return; // would expose the backing file
    await this.zero(store, first * cs, Math.min(last * cs, this.size) - first * cs, true);
  }

  async #maybeFlush(store: ImageStore): Promise<void> {
    if (this.#l2Dirty.size + this.#refblocksDirty.size > FLUSH_AFTER_DIRTY) await this.flush(store);
  }

  /** Whether metadata changes wait to be written. */
  get dirty(): boolean {
    return this.#l2Dirty.size > 0 || this.#refblocksDirty.size > 0 || this.#l1Dirty ||
      this.#reftableDirty || this.#headerDirty || this.#pendingFree.length > 0;
  }

  /** Writes the metadata changes in crash-safe order and makes everything durable. */
  flush(store: ImageStore): Promise<void> {
    return this.#meta.run(async () => {
      if (!this.writable) return;
      if (!this.dirty) {
        await store.flush?.();
        return;
      }
      const sync = async () => await store.flush?.();
      const cs = this.clusterSize;
      const put = (data: Uint8Array, at: number) => store.pwrite!(data, at, { fua: false });
      // 1. Refcount blocks (the data is written already): the one flush covers both.
      await this.#writeRefblocks(store);
      await sync();
      // 2. The refcount table, then the header when the table moved.
      if (this.#reftableDirty) {
        const raw = new Uint8Array(this.#reftableClusters * cs);
        const view = new DataView(raw.buffer);
        this.#reftable.forEach((v, i) => v && putU64(view, i * 8, v));
        await put(raw, this.#reftableOffset);
        await sync();
        this.#reftableDirty = false;
        if (this.#reftableMoved) {
          await this.#writeHeader(store);
          await sync();
          const { offset, clusters } = this.#reftableMoved;
          for (let i = 0; i < clusters; i++) {
            this.#metadata.delete(offset + i * cs);
            this.#pendingFree.push([offset + i * cs, 1]);
          }
          this.#reftableMoved = undefined;
        }
      }
      // 3. L2 tables, 4. the L1 table.
      if (this.#l2Dirty.size) {
        for (const at of this.#l2Dirty) await put(this.#l2.get(at)!, at);
        this.#l2Dirty.clear();
        await sync();
      }
      if (this.#l1Dirty) {
        await put(this.#l1, this.header.l1TableOffset);
        this.#l1Dirty = false;
        await sync();
      }
      if (this.#headerDirty) {
        await this.#writeHeader(store);
        await sync();
      }
      // 5. Only now that nothing refers to them: release freed clusters.
      if (this.#pendingFree.length) {
        const frees = this.#pendingFree;
        this.#pendingFree = [];
        const emptied: number[] = [];
        for (const [at, n] of frees) {
          if (await this.#refAdd(store, at, -n) === 0) emptied.push(at);
        }
        await this.#writeRefblocks(store);
        await sync();
        // Free space goes back to the file system (never reused by the image itself).
        for (const at of emptied) await store.trim?.(at, cs, { fua: false }).catch(() => {});
      }
    });
  }

  async #writeRefblocks(store: ImageStore): Promise<void> {
    for (const b of this.#refblocksDirty) {
      await store.pwrite!(this.#refblocks.get(b)!, this.#reftable[b]!, { fua: false });
    }
    this.#refblocksDirty.clear();
  }

  async #writeHeader(store: ImageStore): Promise<void> {
    const h = this.header;
    if (h.version === 2) {
      // Only the refcount table fields of a version 2 header ever change.
      const part = new Uint8Array(12);
      const view = new DataView(part.buffer);
      putU64(view, 0, this.#reftableOffset);
      view.setUint32(8, this.#reftableClusters);
      await store.pwrite!(part, 48, { fua: false });
    } else {
      const part = new Uint8Array(104 - 48);
      const view = new DataView(part.buffer);
      putU64(view, 0, this.#reftableOffset);
      view.setUint32(8, this.#reftableClusters);
      view.setUint32(12, h.nbSnapshots);
      putU64(view, 16, h.snapshotsOffset);
      view.setUint32(28, this.#incompatible);
      view.setUint32(36, h.compatible);
      view.setUint32(44, this.#autoclear);
      view.setUint32(48, h.refcountOrder);
      view.setUint32(52, h.headerLength);
      await store.pwrite!(part, 48, { fua: false });
    }
    this.#headerDirty = false;
  }
}
