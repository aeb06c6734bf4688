/**
 * The `xz` filter: serves the uncompressed contents of an .xz file read
 * from the layer below, read-only, with random access by block: a read
 * decodes only the blocks it touches (recently used blocks are kept). Make
 * files with many small blocks for fast random access:
 * `xz --block-size=16MiB disk.img`.
 *
 * The decoder is our own LZMA2 implementation (no dependency): random
 * access needs block-at-a-time decoding, which streaming decoders on npm
 * do not offer, and it keeps the program self-contained. Files using
 * BCJ or delta filters are refused with a clear error.
 *
 * ```
 * nbd serve --filter=xz split file=disk.img.xz
 * ```
 *
 * Parameters:
 * - `xz-max-block=SIZE`: refuse files with larger blocks (default 512M).
 * - `xz-max-depth=N`: decoded blocks kept in memory, shared by all
 *   connections (default 8).
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import type { Backend, Capabilities, Filter } from "../core/backend.ts";
import { PassthroughBackend } from "../core/backend.ts";
import { formatSize } from "../util/parse.ts";
import { LzmaError } from "./_lzma2.ts";
import { decodeXzBlock, type ReadAt, readXzIndex, type XzBlock } from "./_xz_format.ts";

function readerOf(backend: Backend): ReadAt {
  return async (offset, length) => {
    const buf = new Uint8Array(length);
    await backend.pread(buf, offset);
    return buf;
  };
}

/** Finds the block holding uncompressed `offset` (binary search). */
function findBlock(blocks: XzBlock[], offset: number): number {
  let lo = 0;
  let hi = blocks.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (blocks[mid]!.uncompressedOffset <= offset) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** The decoded file shared by every connection: its index and recently used blocks. */
class XzImage {
  readonly blocks: XzBlock[];
  readonly size: number;
  readonly #depth: number;
  readonly #cache = new Map<number, Promise<Uint8Array>>();

  constructor(blocks: XzBlock[], depth: number) {
    this.blocks = blocks;
    const last = blocks[blocks.length - 1];
    this.size = last ? last.uncompressedOffset + last.uncompressedSize : 0;
    this.#depth = depth;
  }

  /** The decoded block `index`, from the cache or decoded with `below`. */
  block(index: number, below: Backend): Promise<Uint8Array> {
    let entry = this.#cache.get(index);
    if (entry) {
      this.#cache.delete(index);
      this.#cache.set(index, entry);
      return entry;
    }
    entry = decodeXzBlock(readerOf(below), this.blocks[index]!).catch((error) => {
      this.#cache.delete(index);
      if (error instanceof LzmaError) throw new NbdError("EIO", error.message);
      throw error;
    });
    this.#cache.set(index, entry);
    while (this.#cache.size > this.#depth) this.#cache.delete(this.#cache.keys().next().value!);
    return entry;
  }
}

class XzBackend extends PassthroughBackend {
  readonly #image: XzImage;
  constructor(next: Backend, image: XzImage) {
    super(next);
    this.#image = image;
  }
  override size(): number {
    return this.#image.size;
  }
  override capabilities(): Capabilities {
    return {
      ...this.next.capabilities(),
      writable: false,
      trim: false,
      zero: false,
      fastZero: false,
      fua: "none",
      extents: false,
      cache: "emulate",
    };
  }
  override async pread(buf: Uint8Array, offset: number): Promise<void> {
    const blocks = this.#image.blocks;
    let pos = offset;
    const end = offset + buf.length;
    for (let i = findBlock(blocks, offset); pos < end; i++) {
      const block = blocks[i]!;
      const data = await this.#image.block(i, this.next);
      const from = pos - block.uncompressedOffset;
      const n = Math.min(block.uncompressedSize - from, end - pos);
      buf.set(data.subarray(from, from + n), pos - offset);
      pos += n;
    }
  }
  override pwrite(): Promise<void> {
    return Promise.reject(new NbdError("EPERM", "the xz filter is read-only"));
  }
  override trim(): Promise<void> {
    return Promise.reject(new NbdError("EPERM", "the xz filter is read-only"));
  }
  override zero(): Promise<void> {
    return Promise.reject(new NbdError("EPERM", "the xz filter is read-only"));
  }
  override extents(_offset: number, length: number) {
    return Promise.resolve([{ length, flags: 0 }]);
  }
  override async cache(offset: number, length: number): Promise<void> {
    await this.pread(new Uint8Array(Math.min(length, 1 << 20)), offset);
  }
}

/** The xz filter. */
export const xzFilter: Filter = {
  name: "xz",
  summary: "serve the uncompressed contents of an .xz file (random access by block, read-only)",
  description: "Compress with small blocks for fast random access, e.g.\n" +
    "  xz --block-size=16MiB disk.img\n\nExample:\n  nbd serve --filter=xz split file=disk.img.xz",
  params: [
    {
      name: "xz-max-block",
      value: "SIZE",
      type: "size",
      default: "512M",
      description: "refuse files with larger blocks",
    },
    {
      name: "xz-max-depth",
      value: "N",
      type: "integer",
      default: "8",
      description: "decoded blocks kept in memory (1 to 65536)",
    },
  ],
  create(params) {
    const maxBlock = params.takeSize("xz-max-block") ?? 512 * 1024 * 1024;
    const depth = params.takeInteger("xz-max-depth", 1, 1 << 16) ?? 8;
    let image: Promise<XzImage> | undefined;
    return Promise.resolve({
      async wrap(next) {
        image ??= (async () => {
          try {
            const blocks = await readXzIndex(readerOf(next), next.size());
            const big = blocks.find((b) => b.uncompressedSize > maxBlock);
            if (big) {
              throw new NbdError(
                "EINVAL",
                `the xz file has a ${
                  formatSize(big.uncompressedSize)
                } block, larger than xz-max-block=${formatSize(maxBlock)}`,
              );
            }
            return new XzImage(blocks, depth);
          } catch (error) {
            image = undefined; // let the next connection try again
            if (error instanceof LzmaError) throw new NbdError("EINVAL", error.message);
            throw error;
          }
        })();
        return new XzBackend(next, await image);
      },
    });
  },
};
