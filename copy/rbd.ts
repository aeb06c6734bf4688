/**
 * A Ceph RBD image as a copy endpoint, through librbd (io/librbd.ts):
 * `rbd:[POOL/[NAMESPACE/]]IMAGE[@SNAPSHOT][:conf=FILE][:id=NAME][:keyring=FILE]`,
 * the form qemu uses. As a source it reports allocation from the object
 * map (holes are not read); as a destination a missing image is created
 * with the source's size (and removed again if the copy fails), and zero
 * runs become rbd_aio_write_zeroes. Requests run several at once, each
 * awaited on the FFI thread pool.
 *
 * @module
 */

import type { BlockSize } from "../protocol/handshake.ts";
import { UsageError } from "../util/usage_error.ts";
import { parseRbdSpec, type RbdSpec } from "../plugins/rbd.ts";
import {
  CephError,
  createImage,
  LibraryMissingError,
  RadosCluster,
  type RadosIoContext,
  RbdImage,
  removeImage,
} from "../io/librbd.ts";
import { BaseEndpoint, type CopyExtent, type Role } from "./endpoint.ts";

/** Bytes a copy keeps in flight to or from an image (eight 4 MiB objects). */
export const RBD_BYTES_IN_FLIGHT = 32 << 20;

/** Whether a copy argument names an RBD image. */
export function isRbdUri(text: string): boolean {
  return text.startsWith("rbd:");
}

/** An `rbd:` argument, parsed. */
export interface RbdUri extends RbdSpec {
  /** ceph.conf path. */
  conf?: string;
  /** Client id. */
  id?: string;
  /** Keyring path. */
  keyring?: string;
}

/** Parses `rbd:POOL/IMAGE[@SNAP][:key=value...]` (qemu's form; `\:` is a literal colon). */
export function parseRbdUri(text: string): RbdUri {
  if (!isRbdUri(text)) throw new UsageError(`not an rbd: image: ${text}`);
  const fields = text.slice(4).split(/(?<!\\):/).map((f) => f.replaceAll("\\:", ":"));
  const uri: RbdUri = parseRbdSpec(fields[0]!);
  for (const field of fields.slice(1)) {
    const eq = field.indexOf("=");
    const key = field.slice(0, eq);
    const value = field.slice(eq + 1);
    if (eq <= 0) throw new UsageError(`${text}: expected key=value after ":", got "${field}"`);
    if (key === "conf") uri.conf = value;
    else if (key === "id") uri.id = value;
    else if (key === "keyring") uri.keyring = value;
    else throw new UsageError(`${text}: unknown option ${key}= (conf, id, keyring)`);
  }
  return uri;
}

/** An RBD image being read or written by `nbd copy`. */
export class RbdEndpoint extends BaseEndpoint {
  readonly name: string;
  readonly kind = "rbd";
  readonly size: number;
  override readonly canExtents = true;
  /**
   * Whole objects in flight beyond a few only queue in librbd and the OSDs
   * while their buffers cost page faults here (docs/performance.md).
   */
  override readonly maxBytesInFlight = RBD_BYTES_IN_FLIGHT;
  override readonly isZero: boolean;
  readonly blockSize: BlockSize;
  readonly #cluster: RadosCluster;
  readonly #io: RadosIoContext;
  readonly #image: RbdImage;
  /** The image was created for this copy (and is removed if it fails). */
  readonly #created: string | undefined;

  private constructor(
    name: string,
    cluster: RadosCluster,
    io: RadosIoContext,
    image: RbdImage,
    created: string | undefined,
  ) {
    super();
    this.name = name;
    this.#cluster = cluster;
    this.#io = io;
    this.#image = image;
    this.#created = created;
    this.size = image.size;
    this.isZero = created !== undefined;
    this.blockSize = { minimum: 1, preferred: image.objectSize, maximum: 32 << 20 };
  }

  /**
   * Opens `text` as the source, or as the destination of `sourceSize`
   * bytes (creating the image when it does not exist).
   */
  static async open(text: string, role: Role, sourceSize?: number): Promise<RbdEndpoint> {
    const uri = parseRbdUri(text);
    if (role === "destination" && uri.snapshot !== undefined) {
      throw new UsageError(`${text}: a snapshot cannot be written`);
    }
    let cluster: RadosCluster | undefined;
    let io: RadosIoContext | undefined;
    try {
      cluster = await RadosCluster.connect(uri);
      io = cluster.ioContext(uri.pool, uri.namespace);
      const label = [uri.pool, uri.namespace, uri.image].filter(Boolean).join("/");
      let created: string | undefined;
      let image: RbdImage;
      try {
        image = await RbdImage.open(io, uri.image, {
          snapshot: uri.snapshot,
          readonly: role === "source",
          label,
        });
      } catch (error) {
        const missing = error instanceof CephError && error.errno === 2;
        if (!missing || role !== "destination" || sourceSize === undefined) throw error;
        await createImage(io, uri.image, sourceSize);
        created = uri.image;
        image = await RbdImage.open(io, uri.image, { label });
      }
      if (role === "destination" && sourceSize !== undefined && image.size < sourceSize) {
        await image.close();
        throw new Error(`${label} is smaller (${image.size} bytes) than the source`);
      }
      return new RbdEndpoint(text, cluster, io, image, created);
    } catch (error) {
      io?.destroy();
      await cluster?.shutdown();
      if (error instanceof LibraryMissingError || error instanceof CephError) {
        throw new Error(`${text}: ${error.message}`);
      }
      throw error;
    }
  }

  /** One rbd_aio_read. */
  override async read(buf: Uint8Array, offset: number): Promise<number> {
    await this.#image.read(buf, offset);
    return buf.length;
  }

  /** Allocation from rbd_diff_iterate2 (per object with a valid fast-diff map). */
  override async extents(offset: number, length: number): Promise<CopyExtent[]> {
    const span = Math.min(length, 4 * 1024 ** 3);
    const allocated = await this.#image.allocated(offset, span, this.#image.fastDiff);
    const out: CopyExtent[] = [];
    let pos = offset;
    const end = offset + span;
    for (const extent of allocated) {
      const start = Math.max(pos, extent.offset);
      const stop = Math.min(end, extent.offset + extent.length);
      if (stop <= start) continue;
      if (start > pos) out.push({ offset: pos, length: start - pos, zero: true });
      out.push({ offset: start, length: stop - start, zero: false });
      pos = stop;
    }
    if (pos < end) out.push({ offset: pos, length: end - pos, zero: true });
    return out;
  }

  /** One rbd_aio_write. */
  override async write(buf: Uint8Array, offset: number): Promise<void> {
    await this.#image.write(buf, offset);
  }

  /** rbd_aio_write_zeroes (thick when asked to stay allocated), else a discard. */
  override async zero(offset: number, length: number, allocate: boolean): Promise<void> {
    if (this.#image.canWriteZeroes) return await this.#image.writeZeroes(offset, length, allocate);
    if (!allocate) return await this.#image.discard(offset, length);
    throw new Error(`${this.name}: this librbd cannot write zeroes`);
  }

  /** rbd_aio_flush. */
  override async flush(): Promise<void> {
    await this.#image.flush();
  }

  /** Closes the image; a failed copy removes an image it created. */
  override async close(complete: boolean): Promise<void> {
    try {
      await this.#image.close();
      if (!complete && this.#created !== undefined) {
        await removeImage(this.#io, this.#created).catch(() => {});
      }
    } finally {
      this.#io.destroy();
      await this.#cluster.shutdown();
    }
  }

  /** What a failed copy left. */
  override incompleteNote(): string {
    return this.#created !== undefined ? `${this.name} was removed` : `${this.name} is incomplete`;
  }
}
