/**
 * qcow2 as a copy endpoint over any other endpoint's bytes: a source reads
 * the guest view of an image in a file, an NBD export or at an http(s) URL
 * (only the clusters it needs, and the L2 tables), with holes from the L2
 * tables; a destination writes a new image in one pass (formats/qcow2/
 * writer.ts): only allocated data, optionally compressed on a pool of
 * threads, optionally as an overlay over a backing file holding only what
 * differs from it. Backing files named inside a source image are never
 * followed.
 *
 * @module
 */

import type { BlockSize } from "../protocol/handshake.ts";
import { UsageError } from "../util/usage_error.ts";
import { type CompressionType, isQcow2 } from "../formats/qcow2/header.ts";
import { type ImageStore, type Layer, Qcow2Image, readHeader } from "../formats/qcow2/image.ts";
import { openLayer } from "../formats/qcow2/chain.ts";
import { hasZstdCompression, loadCompression } from "../formats/qcow2/compress.ts";
import { Qcow2Writer } from "../formats/qcow2/writer.ts";
import {
  BaseEndpoint,
  COPY_BLOCK_SIZE,
  type CopyExtent,
  type Endpoint,
  type EndpointSpec,
} from "./endpoint.ts";
import { openDestination, type OpenOptions, openSource } from "./open.ts";
import { CompressPool } from "./compress_pool.ts";

/** The image formats `nbd copy` reads and writes. */
export type ImageFormat = "raw" | "qcow2" | "auto";

/**
 * Reads `buf.length` bytes at `offset` from an endpoint, in whole blocks of
 * its minimum size and pieces of at most its maximum.
 */
async function readAligned(inner: Endpoint, buf: Uint8Array, offset: number): Promise<void> {
  const { minimum, maximum } = inner.blockSize;
  const min = Math.max(1, minimum);
  const size = inner.size!;
  // Past the end of the file reads as zeroes (the last compressed cluster's sector may).
  const end = Math.min(offset + buf.length, size);
  if (end <= offset) {
    buf.fill(0);
    return;
  }
  if (end < offset + buf.length) {
    buf.fill(0, end - offset);
    buf = buf.subarray(0, end - offset);
  }
  const start = Math.floor(offset / min) * min;
  const stop = Math.min(size, Math.ceil(end / min) * min);
  const direct = start === offset && stop === end;
  const target = direct ? buf : new Uint8Array(stop - start);
  const piece = Math.max(min, Math.floor(maximum / min) * min);
  const reads: Promise<number>[] = [];
  for (let at = 0; at < target.length; at += piece) {
    reads.push(inner.read(target.subarray(at, Math.min(target.length, at + piece)), start + at));
  }
  const counts = await Promise.all(reads);
  const got = counts.reduce((a, b) => a + b, 0);
  if (got < target.length) throw new Error(`${inner.name} ended early at ${start + got}`);
  if (!direct) buf.set(target.subarray(offset - start, offset - start + buf.length));
}

/** An image store over a source endpoint (read-only). */
function sourceStore(inner: Endpoint): ImageStore {
  return { size: () => inner.size!, pread: (buf, offset) => readAligned(inner, buf, offset) };
}

/** Fails unless an endpoint can be read (or written) at any offset. */
function needRandomAccess(inner: Endpoint, role: string): void {
  if (inner.sequential || (role === "source" && inner.size === undefined)) {
    throw new UsageError(
      `${inner.name}: a qcow2 ${role} needs random access (a file, NBD export or http URL), ` +
        `not a stream`,
    );
  }
}

/** The guest view of a qcow2 image read through another endpoint. */
export class Qcow2Source extends BaseEndpoint {
  readonly name: string;
  readonly kind = "qcow2";
  readonly size: number;
  readonly blockSize: BlockSize;
  override readonly canExtents = true;
  override readonly synchronous: boolean;
  readonly #inner: Endpoint;
  readonly #store: ImageStore;
  readonly #image: Qcow2Image;

  private constructor(inner: Endpoint, store: ImageStore, image: Qcow2Image) {
    super();
    this.name = inner.name;
    this.#inner = inner;
    this.#store = store;
    this.#image = image;
    this.size = image.size;
    // Over a file the reads do their work at once (the mapping is in memory): one lane.
    this.synchronous = inner.synchronous;
    this.blockSize = {
      minimum: 1,
      preferred: Math.max(4096, Math.min(image.clusterSize, 1 << 20)),
      maximum: COPY_BLOCK_SIZE.maximum,
    };
  }

  /**
   * Opens the image `inner` holds. An image with a backing file is refused:
   * a name stored inside an image is not followed.
   */
  static async open(inner: Endpoint): Promise<Qcow2Source> {
    needRandomAccess(inner, "source");
    const store = sourceStore(inner);
    const header = await readHeader(store);
    if (header.backingFile !== undefined) {
      throw new Error(
        `${inner.name} has a backing file ${JSON.stringify(header.backingFile)}, which nbd copy ` +
          `does not follow (a name stored in an image could disclose any host file); serve it ` +
          `with nbd serve --filter=qcow2 ... qcow2-backing=PATH and copy from that`,
      );
    }
    const image = await Qcow2Image.open(store, { writable: false });
    return new Qcow2Source(inner, store, image);
  }

  /** The endpoint the image is read through. */
  get inner(): Endpoint {
    return this.#inner;
  }

  /** Reads guest bytes. */
  override async read(buf: Uint8Array, offset: number): Promise<number> {
    await this.#image.read(this.#store, buf, offset);
    return buf.length;
  }

  /** Allocation from the L2 tables: unallocated and zero clusters read as zeroes. */
  override async extents(offset: number, length: number): Promise<CopyExtent[]> {
    const runs = await this.#image.status(this.#store, offset, length);
    const out: CopyExtent[] = [];
    let at = offset;
    for (const run of runs) {
      out.push({ offset: at, length: run.length, zero: !run.data });
      at += run.length;
    }
    return out;
  }

  /** Passes the abort on. */
  override abort(reason: Error): void {
    this.#inner.abort(reason);
  }

  /** More connections for the endpoint below. */
  override useConnections(connections?: number): Promise<void> {
    return this.#inner.useConnections(connections);
  }

  /** Closes the endpoint below. */
  override close(complete: boolean): Promise<void> {
    return this.#inner.close(complete);
  }
}

/** How a qcow2 destination is written. */
export interface Qcow2WriteOptions {
  /** Cluster size (default 64 KiB). */
  clusterSize?: number;
  /** Compress clusters with this type; undefined writes them plain. */
  compress?: CompressionType;
  /** Compression type recorded in the header when not compressing (default zlib). */
  compressionType?: CompressionType;
  /** Threads that compress (default: one per processor). */
  threads?: number;
  /**
   * The backing file of an overlay: `name` is recorded in the image, and
   * `path` (the name resolved as qemu does, next to the image) is read to
   * leave out what the source has in common with it.
   */
  backing?: { name: string; path: string };
}

/**
 * The smallest request a plain (uncompressed, not overlay) image written
 * into a file prefers: the copy then reads and writes 1 MiB at a time.
 */
export const QCOW2_FILE_REQUEST = 1 << 20;

/** A new qcow2 image written through another endpoint. */
export class Qcow2Destination extends BaseEndpoint {
  readonly name: string;
  readonly kind = "qcow2";
  readonly size: number;
  readonly blockSize: BlockSize;
  override readonly isZero: boolean;
  override readonly synchronous: boolean;
  readonly #inner: Endpoint;
  readonly #writer: Qcow2Writer;
  readonly #pool: CompressPool | undefined;
  readonly #backing: Layer | undefined;
  readonly #clusterSize: number;
  /** Whether the writer's own flushes reach the disk (see `open`). */
  readonly #durable: { wanted: boolean };
  #closed = false;

  private constructor(
    inner: Endpoint,
    writer: Qcow2Writer,
    pool: CompressPool | undefined,
    backing: Layer | undefined,
    durable: { wanted: boolean },
  ) {
    super();
    this.name = inner.name;
    this.#inner = inner;
    this.#durable = durable;
    this.#writer = writer;
    this.#pool = pool;
    this.#backing = backing;
    const cs = writer.clusterSize;
    this.#clusterSize = cs;
    this.size = writer.size;
    this.isZero = backing === undefined;
    this.synchronous = inner.synchronous && !pool && !backing;
    // Whole clusters: the scheduler's requests and zero runs then never split one.
    const maximum = Math.max(cs, Math.floor(inner.blockSize.maximum / cs) * cs);
    // Plain clusters into a file go out as one write per request, written in line:
    // larger requests mean fewer calls for the same bytes (docs/performance.md).
    const preferred = this.synchronous
      ? Math.min(maximum, Math.max(cs, inner.blockSize.preferred, QCOW2_FILE_REQUEST))
      : Math.max(cs, inner.blockSize.preferred);
    this.blockSize = { minimum: cs, preferred, maximum };
  }

  /** Starts an image of `size` guest bytes in `inner`. */
  static async open(
    inner: Endpoint,
    size: number,
    options: Qcow2WriteOptions,
  ): Promise<Qcow2Destination> {
    needRandomAccess(inner, "destination");
    let backing: Layer | undefined;
    let backingFormat: string | undefined;
    if (options.backing) {
      backingFormat = await localFormat(options.backing.path);
      backing = await openLayer(options.backing.path, backingFormat, { follow: true }, new Set());
    }
    let pool: CompressPool | undefined;
    try {
      // A new file is written under a temporary name and renamed into place only once
      // complete, so no crash can leave it looking like the image: the writer's ordering
      // flushes would only wait for the disk, which a raw copy into a new file does not.
      // Once the copy asks for durability (--flush, checkpoints), they are made again.
      const durable = { wanted: (inner as { partialPath?: string }).partialPath === undefined };
      const writer = await Qcow2Writer.create({
        limit: inner.size,
        pwrite: (buf, offset) => inner.write(buf, offset),
        flush: () => durable.wanted ? inner.flush() : Promise.resolve(),
      }, {
        size,
        clusterSize: options.clusterSize,
        compressionType: options.compress ?? options.compressionType,
        backingFile: options.backing?.name,
        backingFormat,
      });
      if (options.compress) {
        pool = new CompressPool(
          options.compress,
          writer.clusterSize,
          options.threads ?? navigator.hardwareConcurrency,
        );
      }
      return new Qcow2Destination(inner, writer, pool, backing, durable);
    } catch (error) {
      await backing?.close();
      throw error;
    }
  }

  /** Reads what the backing file has at `offset` (zeroes past its end). */
  async #readBacking(buf: Uint8Array, offset: number): Promise<void> {
    const backing = this.#backing!;
    const n = Math.max(0, Math.min(buf.length, backing.size - offset));
    if (n > 0) await backing.read(buf.subarray(0, n), offset);
    buf.fill(0, n);
  }

  /** Stores whole clusters (compressed where that saves space). */
  async #store(cluster: number, data: Uint8Array): Promise<void> {
    if (!this.#pool) return await this.#writer.writeData(cluster, data);
    const cs = this.#clusterSize;
    if (data.length % cs !== 0) {
      // The image's last cluster: compressed whole, as readers inflate whole clusters.
      const padded = new Uint8Array(Math.ceil(data.length / cs) * cs);
      padded.set(data);
      data = padded;
    }
    const results = await this.#pool.compress(data);
    const writes: Promise<void>[] = [];
    let plain = -1; // first cluster of a run stored plain
    for (let i = 0; i <= results.length; i++) {
      const compressed = i < results.length ? results[i] : undefined;
      if (i < results.length && !compressed) {
        if (plain < 0) plain = i;
        continue;
      }
      if (plain >= 0) {
        writes.push(
          this.#writer.writeData(cluster + plain, data.subarray(plain * cs, i * cs)),
        );
        plain = -1;
      }
      if (compressed) writes.push(this.#writer.writeCompressed(cluster + i, compressed));
    }
    await Promise.all(writes);
  }

  /** Writes whole clusters; over a backing file, only those that differ from it. */
  override async write(buf: Uint8Array, offset: number): Promise<void> {
    const cs = this.#clusterSize;
    if (offset % cs !== 0) throw new Error(`an unaligned write at ${offset}`);
    const first = offset / cs;
    if (!this.#backing) return await this.#store(first, buf);
    const below = new Uint8Array(buf.length);
    await this.#readBacking(below, offset);
    const writes: Promise<void>[] = [];
    let run = -1;
    const count = Math.ceil(buf.length / cs);
    for (let i = 0; i <= count; i++) {
      const same = i < count && equalBytes(
        buf.subarray(i * cs, (i + 1) * cs),
        below.subarray(i * cs, (i + 1) * cs),
      );
      if (i < count && !same) {
        if (run < 0) run = i;
        continue;
      }
      if (run >= 0) {
        writes.push(this.#store(first + run, buf.subarray(run * cs, Math.min(buf.length, i * cs))));
        run = -1;
      }
    }
    await Promise.all(writes);
  }

  /**
   * A range that reads as zeroes: nothing to do in a new image; over a
   * backing file, zero clusters where the backing file is not zero.
   */
  override async zero(offset: number, length: number): Promise<void> {
    if (!this.#backing) return;
    const cs = this.#clusterSize;
    if (offset % cs !== 0) throw new Error(`an unaligned zero at ${offset}`);
    const step = 256 * cs > 16 << 20 ? cs : 256 * cs;
    const below = new Uint8Array(step);
    for (let at = offset; at < offset + length; at += step) {
      const n = Math.min(step, offset + length - at);
      const piece = below.subarray(0, n);
      await this.#readBacking(piece, at);
      for (let i = 0; i * cs < n; i++) {
        if (!isZero(piece.subarray(i * cs, (i + 1) * cs))) {
          this.#writer.zeroClusters(at / cs + i, 1);
        }
      }
    }
  }

  /** Makes the data written so far durable, and from now on the metadata written at the end. */
  override flush(): Promise<void> {
    this.#durable.wanted = true;
    return this.#inner.flush();
  }

  /** Passes the abort on. */
  override abort(reason: Error): void {
    this.#inner.abort(reason);
  }

  /** More connections for the endpoint below. */
  override useConnections(connections?: number): Promise<void> {
    return this.#inner.useConnections(connections);
  }

  /**
   * After a complete copy, writes the metadata and the header, sizes a file
   * to the image, and closes; otherwise closes (a new file is removed).
   */
  override async close(complete: boolean): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#pool?.close();
    try {
      if (complete) {
        const length = await this.#writer.finish();
        if (this.#inner.size === undefined) await this.#inner.finish(length);
      }
    } catch (error) {
      await this.#inner.close(false).catch(() => {});
      throw error;
    } finally {
      await this.#backing?.close();
    }
    await this.#inner.close(complete);
  }

  /** What the endpoint below says. */
  override incompleteNote(): string {
    return this.#inner.incompleteNote();
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  if (a.byteOffset % 4 === 0 && b.byteOffset % 4 === 0 && a.length % 4 === 0) {
    const x = new Uint32Array(a.buffer, a.byteOffset, a.length / 4);
    const y = new Uint32Array(b.buffer, b.byteOffset, b.length / 4);
    for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
    return true;
  }
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function isZero(a: Uint8Array): boolean {
  for (let i = 0; i < a.length; i++) if (a[i] !== 0) return false;
  return true;
}

/** "qcow2" or "raw", from a local file's first bytes. */
async function localFormat(path: string): Promise<string> {
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (error) {
    throw new Error(`cannot open the backing file ${path}: ${(error as Error).message}`);
  }
  try {
    const magic = new Uint8Array(4);
    const n = await file.read(magic);
    return n === 4 && isQcow2(magic) ? "qcow2" : "raw";
  } finally {
    file.close();
  }
}

/**
 * The path a backing name recorded in an image at `imagePath` stands for,
 * as qemu resolves it: relative names are relative to the image's directory.
 */
export async function backingPath(name: string, imagePath: string | undefined): Promise<string> {
  const { dirname, isAbsolute, resolve } = await import("node:path");
  if (isAbsolute(name) || imagePath === undefined) return name;
  return resolve(dirname(imagePath), name);
}

/** Whether the first bytes of a source endpoint are a qcow2 header. */
async function looksLikeQcow2(inner: Endpoint): Promise<boolean> {
  if (inner.sequential || inner.size === undefined || inner.size < 4) return false;
  const magic = new Uint8Array(4);
  await readAligned(inner, magic, 0);
  return isQcow2(magic);
}

/**
 * Opens the source a SOURCE argument names, read as `format`: raw, qcow2,
 * or auto (qcow2 when its first bytes say so; streams are raw).
 */
export async function openFormattedSource(
  spec: EndpointSpec,
  format: ImageFormat,
  options: OpenOptions,
): Promise<Endpoint> {
  const inner = await openSource(spec, options);
  if (format === "raw") return inner;
  try {
    if (format === "auto" && !(await looksLikeQcow2(inner))) return inner;
    return await Qcow2Source.open(inner);
  } catch (error) {
    await inner.close(false).catch(() => {});
    throw error;
  }
}

/**
 * Opens the destination a DESTINATION argument names for a new qcow2
 * image of the source's size: a file is created (or replaced) and sized
 * to the image at the end; an NBD export must be large enough to hold it.
 */
export async function openQcow2Destination(
  spec: EndpointSpec,
  source: Endpoint,
  options: OpenOptions,
  write: Qcow2WriteOptions,
): Promise<Endpoint> {
  if (write.compress === "zstd" && !(await loadCompression(), hasZstdCompression())) {
    throw new UsageError("--compression-type=zstd: this runtime has no zstd compression");
  }
  if (source.size === undefined) {
    throw new UsageError("writing qcow2 needs a source of known size, not a stream");
  }
  let inner: Endpoint;
  if (spec.kind === "path") {
    const { FileDestination } = await import("./file_destination.ts");
    const { FileSource } = await import("./file_source.ts");
    // Sized at the end, to the image (the source's size says nothing about it).
    const from = source instanceof Qcow2Source ? source.inner : source;
    inner = await FileDestination.open(
      spec.path,
      undefined,
      from instanceof FileSource ? from.identity : undefined,
    );
  } else if (spec.kind === "nbd" || spec.kind === "command") {
    inner = await openDestination(spec, source, options);
  } else {
    throw new UsageError(
      "a qcow2 destination must be a file or an NBD export (not a stream or null:)",
    );
  }
  const backing = write.backing && {
    name: write.backing.name,
    path: await backingPath(write.backing.name, spec.kind === "path" ? spec.path : undefined),
  };
  try {
    return await Qcow2Destination.open(inner, source.size, { ...write, backing });
  } catch (error) {
    await inner.close(false).catch(() => {});
    throw error;
  }
}

/**
 * Opens the destination a DESTINATION argument names, written as `format`.
 * A raw file destination of a qcow2 source still refuses to overwrite the
 * file the image is read from.
 */
export async function openFormattedDestination(
  spec: EndpointSpec,
  source: Endpoint,
  format: "raw" | "qcow2",
  options: OpenOptions,
  write: Qcow2WriteOptions,
): Promise<Endpoint> {
  if (format === "qcow2") return await openQcow2Destination(spec, source, options, write);
  if (spec.kind === "path" && source instanceof Qcow2Source) {
    const { FileDestination } = await import("./file_destination.ts");
    const { FileSource } = await import("./file_source.ts");
    const inner = source.inner;
    return await FileDestination.open(
      spec.path,
      source.size,
      inner instanceof FileSource ? inner.identity : undefined,
    );
  }
  return await openDestination(spec, source, options);
}
