/**
 * Writing a new qcow2 image in one pass, as a copy produces it: guest
 * clusters arrive in any order and are appended to the file (plain or
 * compressed), zero clusters are only recorded, and `finish` then writes
 * the L2 tables, the L1 table and the refcounts that describe exactly what
 * was written, and last the header. Until the header is written the file
 * is not a qcow2 image at all, so a copy that fails half-way never leaves
 * something that looks complete; the finished image has no leaks.
 *
 * @module
 */

import { type CompressionType, encodeHeader, INCOMPAT_COMPRESSION, putU64 } from "./header.ts";
import { Qcow2FormatError } from "./header.ts";

/** Where the image is written (a copy destination's byte access). */
export interface WriterStore {
  /** Writes `buf` at `offset`. */
  pwrite(buf: Uint8Array, offset: number): Promise<void>;
  /** Makes what was written durable. */
  flush?(): Promise<void>;
  /** The most bytes the store can hold (undefined: no limit, a file). */
  readonly limit?: number;
}

/** Options of a new image. */
export interface WriterOptions {
  /** Virtual size (rounded up to whole 512-byte sectors, as qemu does). */
  size: number;
  /** Cluster size (a power of two from 512 to 2 MiB; default 64 KiB). */
  clusterSize?: number;
  /** Compression type recorded for compressed clusters (default zlib). */
  compressionType?: CompressionType;
  /** Backing file name recorded in the header. */
  backingFile?: string;
  /** Backing file format recorded in the header. */
  backingFormat?: string;
}

const COPIED = 0x80000000; // bit 63 of an entry, in the high word
const COMPRESSED_FLAG = 1n << 62n;
/** Metadata is written in pieces of at most this many bytes (an NBD request's usual limit). */
const METADATA_CHUNK = 4 * 1024 * 1024;

/** A qcow2 image (version 3, 16-bit refcounts) being written by a copy. */
export class Qcow2Writer {
  /** Cluster size. */
  readonly clusterSize: number;
  /** Virtual size (whole sectors). */
  readonly size: number;
  readonly #clusterBits: number;
  readonly #store: WriterStore;
  readonly #options: WriterOptions;
  readonly #l2Entries: number;
  readonly #l2 = new Map<number, DataView>();
  /** Refcount of each host cluster, indexed by cluster number. */
  #refs = new Uint16Array(1024);
  /** The next free host byte. */
  #next: number;
  /**
   * The host cluster compressed clusters are being packed into, written
   * once full (or before plain data or the metadata): every write is then
   * whole clusters, as stores with a minimum block size need.
   */
  #tail: Uint8Array | undefined;
  #tailAt = 0;
  #finished = false;

  private constructor(store: WriterStore, options: WriterOptions, clusterSize: number) {
    this.#store = store;
    this.#options = options;
    this.clusterSize = clusterSize;
    this.#clusterBits = Math.log2(clusterSize);
    this.size = Math.ceil(options.size / 512) * 512;
    this.#l2Entries = clusterSize / 8;
    this.#next = clusterSize; // cluster 0 is the header's
    this.#refs[0] = 1;
  }

  /**
   * Starts an image in `store`: the first cluster is zeroed, so that
   * whatever was there before (an older image) is no longer recognised.
   */
  static async create(store: WriterStore, options: WriterOptions): Promise<Qcow2Writer> {
    const cs = options.clusterSize ?? 65536;
    const bits = Math.log2(cs);
    if (!Number.isInteger(bits) || bits < 9 || bits > 21) {
      throw new Qcow2FormatError("the cluster size must be a power of two from 512 to 2M");
    }
    if (!Number.isSafeInteger(options.size) || options.size < 0 || options.size > 2 ** 50) {
      throw new Qcow2FormatError("invalid virtual size");
    }
    const writer = new Qcow2Writer(store, options, cs);
    writer.#checkRoom(cs);
    await store.pwrite(new Uint8Array(cs), 0);
    return writer;
  }

  /** Bytes of the file so far (data only, until `finish`). */
  get written(): number {
    return this.#next;
  }

  #checkRoom(end: number): void {
    const limit = this.#store.limit;
    if (limit !== undefined && end > limit) {
      throw new Qcow2FormatError(
        `the qcow2 image does not fit in the destination (${limit} bytes)`,
      );
    }
  }

  #ref(cluster: number): void {
    if (cluster >= this.#refs.length) {
      const grown = new Uint16Array(Math.max(cluster + 1, this.#refs.length * 2));
      grown.set(this.#refs);
      this.#refs = grown;
    }
    if (this.#refs[cluster] === 0xffff) throw new Qcow2FormatError("a refcount overflows");
    this.#refs[cluster]!++;
  }

  /** The L2 table (as a view) holding guest cluster `cluster`. */
  #table(cluster: number): { view: DataView; at: number } {
    const index = Math.floor(cluster / this.#l2Entries);
    let view = this.#l2.get(index);
    if (!view) {
      view = new DataView(new ArrayBuffer(this.clusterSize));
      this.#l2.set(index, view);
    }
    return { view, at: (cluster % this.#l2Entries) * 8 };
  }

  #checkGuest(cluster: number, count: number): void {
    if (this.#finished) throw new Qcow2FormatError("the image is already finished");
    if (cluster < 0 || (cluster + count) * this.clusterSize > this.size + this.clusterSize - 1) {
      throw new Qcow2FormatError("a write past the end of the image");
    }
  }

  /**
   * Stores guest clusters from `cluster` on, uncompressed: `data` holds
   * whole clusters (the last may be short at the end of the image).
   */
  async writeData(cluster: number, data: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    const count = Math.ceil(data.length / cs);
    this.#checkGuest(cluster, count);
    if (data.length % cs !== 0) {
      // The image's last cluster: padded, so that the write is whole clusters.
      const padded = new Uint8Array(count * cs);
      padded.set(data);
      data = padded;
    }
    // Plain clusters start on a cluster boundary (after any compressed bytes).
    const tail = this.#closeTail();
    const host = Math.ceil(this.#next / cs) * cs;
    this.#checkRoom(host + data.length);
    this.#next = host + count * cs;
    for (let i = 0; i < count; i++) {
      const at = host + i * cs;
      this.#ref(at / cs);
      const { view, at: e } = this.#table(cluster + i);
      view.setUint32(e, (Math.floor(at / 2 ** 32) | COPIED) >>> 0);
      view.setUint32(e + 4, at >>> 0);
    }
    await Promise.all([tail, this.#store.pwrite(data, host)]);
  }

  /** Writes the partly filled cluster of compressed bytes, if any, and starts no new one. */
  #closeTail(): Promise<void> | undefined {
    const tail = this.#tail;
    if (!tail) return undefined;
    this.#tail = undefined;
    return this.#store.pwrite(tail, this.#tailAt);
  }

  /** Stores one guest cluster as compressed bytes (from `compressCluster`). */
  async writeCompressed(cluster: number, bytes: Uint8Array): Promise<void> {
    this.#checkGuest(cluster, 1);
    const cs = this.clusterSize;
    const host = this.#next;
    this.#checkRoom(Math.ceil((host + bytes.length) / cs) * cs);
    this.#next = host + bytes.length;
    const first = Math.floor(host / cs);
    const last = Math.floor((host + bytes.length - 1) / cs);
    for (let c = first; c <= last; c++) this.#ref(c);
    // Offset in the low x bits, then the count of 512-byte sectors after the first.
    const x = BigInt(62 - (this.#clusterBits - 8));
    const sectors = BigInt(Math.floor((host + bytes.length - 1) / 512) - Math.floor(host / 512));
    const entry = COMPRESSED_FLAG | (sectors << x) | BigInt(host);
    const { view, at } = this.#table(cluster);
    view.setBigUint64(at, entry);
    // Pack the bytes into whole host clusters; each one filled is written.
    const writes: Promise<void>[] = [];
    let pos = host;
    let rest = bytes;
    while (rest.length > 0) {
      const clusterStart = Math.floor(pos / cs) * cs;
      if (!this.#tail || this.#tailAt !== clusterStart) {
        const previous = this.#closeTail();
        if (previous) writes.push(previous);
        this.#tail = new Uint8Array(cs);
        this.#tailAt = clusterStart;
      }
      const within = pos - clusterStart;
      const n = Math.min(rest.length, cs - within);
      this.#tail.set(rest.subarray(0, n), within);
      rest = rest.subarray(n);
      pos += n;
      if (within + n === cs) writes.push(this.#closeTail()!);
    }
    await Promise.all(writes);
  }

  /** Records guest clusters as reading zeroes (hiding a backing file there). */
  zeroClusters(cluster: number, count: number): void {
    this.#checkGuest(cluster, count);
    for (let i = 0; i < count; i++) {
      const { view, at } = this.#table(cluster + i);
      view.setUint32(at, 0);
      view.setUint32(at + 4, 1);
    }
  }

  /**
   * Writes the metadata (L2 tables, L1 table, refcount table and blocks,
   * all after the data), makes it durable, then writes the header. Resolves
   * to the length of the image file.
   */
  async finish(): Promise<number> {
    if (this.#finished) throw new Qcow2FormatError("the image is already finished");
    this.#finished = true;
    await this.#closeTail();
    const cs = this.clusterSize;
    let next = Math.ceil(this.#next / cs) * cs;
    const metaStart = next;
    const alloc = (clusters: number) => {
      const at = next;
      next += clusters * cs;
      return at;
    };
    // L2 tables, in guest order.
    const l1Size = Math.ceil(this.size / (cs * this.#l2Entries));
    const l1 = new DataView(new ArrayBuffer(Math.max(cs, Math.ceil(l1Size * 8 / cs) * cs)));
    const indexes = [...this.#l2.keys()].sort((a, b) => a - b);
    const tables: [number, DataView][] = [];
    for (const index of indexes) {
      const at = alloc(1);
      tables.push([at, this.#l2.get(index)!]);
      l1.setUint32(index * 8, (Math.floor(at / 2 ** 32) | COPIED) >>> 0);
      l1.setUint32(index * 8 + 4, at >>> 0);
    }
    const l1Offset = alloc(l1.byteLength / cs);
    // Refcount blocks and table covering every cluster, themselves included.
    const perBlock = cs / 2;
    const before = next / cs;
    let blocks = 1;
    let tableClusters = 1;
    for (;;) {
      const total = before + tableClusters + blocks;
      const needBlocks = Math.ceil(total / perBlock);
      const needTable = Math.ceil(needBlocks * 8 / cs);
      if (needBlocks <= blocks && needTable <= tableClusters) break;
      blocks = Math.max(blocks, needBlocks);
      tableClusters = Math.max(tableClusters, needTable);
    }
    const reftableOffset = alloc(tableClusters);
    const refblocksOffset = alloc(blocks);
    const end = next;
    this.#checkRoom(end);
    for (let c = metaStart / cs; c < end / cs; c++) this.#ref(c);

    // One buffer for everything from metaStart on, written in pieces.
    const meta = new Uint8Array(end - metaStart);
    for (const [at, view] of tables) {
      meta.set(new Uint8Array(view.buffer), at - metaStart);
    }
    meta.set(new Uint8Array(l1.buffer), l1Offset - metaStart);
    const metaView = new DataView(meta.buffer);
    for (let b = 0; b < blocks; b++) {
      putU64(metaView, reftableOffset - metaStart + b * 8, refblocksOffset + b * cs);
    }
    const refs = this.#refs;
    const clusters = end / cs;
    for (let c = 0; c < clusters; c++) {
      const value = c < refs.length ? refs[c]! : 0;
      if (value) metaView.setUint16(refblocksOffset - metaStart + c * 2, value);
    }
    for (let done = 0; done < meta.length; done += METADATA_CHUNK) {
      await this.#store.pwrite(
        meta.subarray(done, Math.min(meta.length, done + METADATA_CHUNK)),
        metaStart + done,
      );
    }
    await this.#store.flush?.();
    const compressionType = this.#options.compressionType ?? "zlib";
    const header = encodeHeader({
      version: 3,
      clusterBits: this.#clusterBits,
      size: this.size,
      l1Size,
      l1TableOffset: l1Offset,
      refcountTableOffset: reftableOffset,
      refcountTableClusters: tableClusters,
      incompatible: compressionType === "zstd" ? INCOMPAT_COMPRESSION : 0,
      compatible: 0,
      autoclear: 0,
      refcountOrder: 4,
      compressionType,
      backingFile: this.#options.backingFile,
      backingFormat: this.#options.backingFormat,
    });
    await this.#store.pwrite(header, 0);
    await this.#store.flush?.();
    return end;
  }
}
