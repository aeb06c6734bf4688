/**
 * The `cache` filter: an in-memory block cache in front of a slow layer,
 * shared by all connections (so multi-conn stays coherent), bounded by
 * `cache-max-size` with least-recently-used eviction.
 *
 * Modes (`cache=`):
 * - `writeback` (default): writes stay in the cache until FLUSH (or FUA,
 *   or eviction) writes them below.
 * - `writethrough`: writes go below at once and update the cache.
 * - `unsafe`: like writeback but FLUSH does nothing; dirty blocks reach
 *   the layer below only when evicted. Data can be lost.
 *
 * ```
 * nbd serve --filter=cache split disk.img cache=writethrough cache-max-size=256M
 * nbd serve --filter=cache http url=https://example.com/disk.img cache-on-read=true
 * ```
 *
 * Parameters:
 * - `cache=writeback|writethrough|unsafe`.
 * - `cache-max-size=SIZE`: memory bound (default 256M).
 * - `cache-high-threshold=PCT`, `cache-low-threshold=PCT`: when the cache
 *   exceeds high% of the maximum, blocks are evicted down to low%
 *   (defaults 95 and 80).
 * - `cache-on-read=BOOL|/PATH`: also cache data that is read (while PATH
 *   exists). Default false.
 * - `cache-min-block-size=SIZE`: block size (power of two, ≥ 4K; default 64K).
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import {
  type Backend,
  type Capabilities,
  type Filter,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";
import { KeyedLocks, RwLock } from "../util/locks.ts";
import { parseToggle, type Toggle, toggleOn } from "./cow.ts";

/** How writes and flushes are handled. */
export type CacheMode = "writeback" | "writethrough" | "unsafe";

/** Settings of the cache. */
export interface CacheOptions {
  /** Write policy. */
  mode: CacheMode;
  /** Block size. */
  blockSize: number;
  /** Memory bound in bytes. */
  maxSize: number;
  /** Eviction starts above this share of maxSize... */
  high: number;
  /** ...and stops below this one. */
  low: number;
  /** Cache data that is read. */
  onRead: Toggle;
}

interface Block {
  data: Uint8Array;
  dirty: boolean;
}

/** The cache shared by every connection. */
export class BlockCache {
  readonly options: CacheOptions;
  /** Virtual size of the disk. */
  readonly size: number;
  /** Cached blocks in least-recently-used order (first = oldest). */
  readonly blocks = new Map<number, Block>();
  readonly #locks = new KeyedLocks();
  /** Range operations (zero, trim, flush) are exclusive; block operations share it. */
  readonly #rw = new RwLock();

  /** Creates an empty cache for a disk of `size` bytes. */
  constructor(size: number, options: CacheOptions) {
    this.size = size;
    this.options = options;
  }

  /** Bytes held. */
  get bytes(): number {
    return this.blocks.size * this.options.blockSize;
  }

  #length(index: number): number {
    return Math.min(this.options.blockSize, this.size - index * this.options.blockSize);
  }

  #touch(index: number, block: Block): void {
    this.blocks.delete(index);
    this.blocks.set(index, block);
  }

  /** Reads through the cache; `fill` caches what was missing (default: cache-on-read). */
  read(below: Backend, buf: Uint8Array, offset: number, fill?: boolean): Promise<void> {
    return this.#rw.shared(async () => {
      const bs = this.options.blockSize;
      fill ??= toggleOn(this.options.onRead);
      const end = offset + buf.length;
      let pos = offset;
      while (pos < end) {
        const index = Math.floor(pos / bs);
        const start = index * bs;
        let block = this.blocks.get(index);
        if (!block && fill) block = await this.#fill(below, index);
        if (block) {
          const n = Math.min(start + bs, end) - pos;
          buf.set(block.data.subarray(pos - start, pos - start + n), pos - offset);
          this.#touch(index, block);
          pos += n;
          continue;
        }
        // A run of uncached blocks: one read from below.
        let runEnd = Math.min(start + bs, end);
        while (runEnd < end && !this.blocks.has(runEnd / bs)) runEnd = Math.min(runEnd + bs, end);
        await below.pread(buf.subarray(pos - offset, runEnd - offset), pos);
        pos = runEnd;
      }
      if (fill) await this.#evict(below);
    });
  }

  /** Loads block `index` from below (under its lock) unless it got cached meanwhile. */
  #fill(below: Backend, index: number): Promise<Block> {
    return this.#locks.run(index, async () => {
      const cached = this.blocks.get(index);
      if (cached) return cached;
      const block = { data: new Uint8Array(this.options.blockSize), dirty: false };
      await below.pread(
        block.data.subarray(0, this.#length(index)),
        index * this.options.blockSize,
      );
      this.blocks.set(index, block);
      return block;
    });
  }

  /** Writes through the cache according to the mode. */
  write(below: Backend, buf: Uint8Array, offset: number, fua: boolean): Promise<void> {
    return this.#rw.shared(async () => {
      const bs = this.options.blockSize;
      const first = Math.floor(offset / bs);
      const last = Math.floor((offset + buf.length - 1) / bs);
      if (this.options.mode === "writethrough") {
        // Hold the blocks so a concurrent fill cannot cache what we are replacing.
        await this.#locks.runRange(first, last, async () => {
          await below.pwrite(buf, offset, { fua });
          this.#patch(buf, offset);
        });
        return;
      }
      for (let index = first; index <= last; index++) {
        await this.#locks.run(index, async () => {
          const start = index * bs;
          const length = this.#length(index);
          let block = this.blocks.get(index);
          const from = Math.max(offset, start);
          const to = Math.min(offset + buf.length, start + length);
          if (!block) {
            block = { data: new Uint8Array(bs), dirty: false };
            // Partly overwritten: the rest of the block comes from below.
            if (to - from < length) await below.pread(block.data.subarray(0, length), start);
          }
          block.data.set(buf.subarray(from - offset, to - offset), from - start);
          block.dirty = true;
          this.#touch(index, block);
          if (fua) await this.#writeBack(below, index, block);
        });
      }
      if (fua) await below.flush();
      await this.#evict(below);
    });
  }

  /** Copies `buf` into the cached blocks it overlaps (leaving their dirty state). */
  #patch(buf: Uint8Array, offset: number): void {
    const bs = this.options.blockSize;
    const end = offset + buf.length;
    for (let index = Math.floor(offset / bs); index * bs < end; index++) {
      const block = this.blocks.get(index);
      if (!block) continue;
      const start = index * bs;
      const from = Math.max(offset, start);
      const to = Math.min(end, start + bs);
      block.data.set(buf.subarray(from - offset, to - offset), from - start);
    }
  }

  /**
   * Zeroes or trims a range: passed below at once in every mode, and the
   * cached copies are updated. Exclusive, so no block operation interleaves.
   */
  discard(below: Backend, offset: number, length: number, run: () => Promise<void>) {
    return this.#rw.exclusive(async () => {
      const bs = this.options.blockSize;
      const end = offset + length;
      // Dirty blocks partly inside the range must reach below first, or
      // writing them back later would undo the zeroing around them.
      for (const [index, block] of this.blocks) {
        const start = index * bs;
        if (start < end && start + bs > offset && block.dirty) {
          await this.#writeBack(below, index, block);
        }
      }
      await run();
      // Visit the cached blocks, not the range: a range can be the whole (huge) disk.
      for (const [index, block] of [...this.blocks]) {
        const start = index * bs;
        if (start >= end || start + bs <= offset) continue;
        if (start >= offset && start + this.#length(index) <= end) {
          this.blocks.delete(index);
        } else {
          block.data.fill(0, Math.max(offset, start) - start, Math.min(end, start + bs) - start);
        }
      }
    });
  }

  async #writeBack(below: Backend, index: number, block: Block): Promise<void> {
    if (!block.dirty) return;
    const data = block.data.subarray(0, this.#length(index));
    block.dirty = false;
    try {
      await below.pwrite(data, index * this.options.blockSize, { fua: false });
    } catch (error) {
      block.dirty = true;
      throw error;
    }
  }

  /** Writes every dirty block below, in offset order, then flushes below. */
  flush(below: Backend): Promise<void> {
    if (this.options.mode === "unsafe") return Promise.resolve();
    return this.#rw.exclusive(async () => {
      const dirty = [...this.blocks].filter(([, b]) => b.dirty).sort(([a], [b]) => a - b);
      for (const [index, block] of dirty) await this.#writeBack(below, index, block);
      if (below.capabilities().flush) await below.flush();
    });
  }

  /** Evicts least recently used blocks when over the high threshold. */
  async #evict(below: Backend): Promise<void> {
    const { maxSize, high, low } = this.options;
    if (this.bytes <= maxSize * high) return;
    while (this.bytes > maxSize * low && this.blocks.size > 0) {
      const index = this.blocks.keys().next().value!;
      await this.#locks.run(index, async () => {
        const block = this.blocks.get(index);
        if (!block) return;
        await this.#writeBack(below, index, block);
        if (!block.dirty) this.blocks.delete(index);
      });
    }
  }
}

class CacheBackend extends PassthroughBackend {
  readonly #cache: BlockCache;
  constructor(next: Backend, cache: BlockCache) {
    super(next);
    this.#cache = cache;
  }
  override capabilities(): Capabilities {
    const caps = this.next.capabilities();
    // FUA is honoured by the cache itself; FLUSH is always meaningful to it.
    return { ...caps, flush: true, fua: caps.writable ? "native" : "none", cache: "native" };
  }
  override pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.#cache.read(this.next, buf, offset);
  }
  override pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.#cache.write(this.next, buf, offset, flags.fua);
  }
  override flush(): Promise<void> {
    return this.#cache.flush(this.next);
  }
  override trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.#cache.discard(
      this.next,
      offset,
      length,
      () => this.next.trim(offset, length, flags),
    );
  }
  override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.#cache.discard(
      this.next,
      offset,
      length,
      () => this.next.zero(offset, length, flags),
    );
  }
  override async cache(offset: number, length: number): Promise<void> {
    // Prefetch into the cache: a read that fills, into a bounded scratch buffer.
    const scratch = new Uint8Array(Math.min(length, 1 << 20));
    for (let done = 0; done < length; done += scratch.length) {
      const n = Math.min(scratch.length, length - done);
      await this.#cache.read(this.next, scratch.subarray(0, n), offset + done, true);
    }
  }
}

/** The cache filter. */
export const cacheFilter: Filter = {
  name: "cache",
  summary: "in-memory block cache (writeback, writethrough or unsafe) with a size limit",
  description: "The cache is shared by all connections and bounded by cache-max-size.\n\n" +
    "Examples:\n  nbd serve --filter=cache split disk.img cache=writethrough cache-max-size=256M\n" +
    "  nbd serve --filter=cache memory 1G cache=unsafe",
  params: [
    {
      name: "cache",
      value: "MODE",
      type: "enum",
      choices: ["writeback", "writethrough", "unsafe"],
      default: "writeback",
      description: "when writes reach the layer below (unsafe ignores flushes)",
    },
    {
      name: "cache-max-size",
      value: "SIZE",
      type: "size",
      default: "256M",
      description: "memory bound",
    },
    {
      name: "cache-high-threshold",
      value: "PCT",
      type: "integer",
      default: "95",
      description: "start evicting above PCT% of the maximum (1 to 100)",
    },
    {
      name: "cache-low-threshold",
      value: "PCT",
      type: "integer",
      default: "80",
      description: "evict down to PCT% of the maximum (1 to 100)",
    },
    {
      name: "cache-on-read",
      value: "BOOL|/PATH",
      type: "string",
      default: "false",
      description: "cache data that is read too (with /PATH: while PATH exists)",
    },
    {
      name: "cache-min-block-size",
      value: "SIZE",
      type: "size",
      default: "64K",
      description: "cache block size (power of two, at least 4K)",
    },
  ],
  create(params) {
    const mode = params.take("cache") ?? "writeback";
    if (mode !== "writeback" && mode !== "writethrough" && mode !== "unsafe") {
      throw new UsageError(`cache: expected writeback, writethrough or unsafe, got "${mode}"`);
    }
    const blockSize = params.takeSize("cache-min-block-size") ?? 65536;
    if (blockSize < 4096 || (blockSize & (blockSize - 1)) !== 0 || blockSize > 2 ** 30) {
      throw new UsageError("cache-min-block-size: must be a power of two of at least 4K");
    }
    const maxSize = params.takeSize("cache-max-size") ?? 256 * 1024 * 1024;
    const high = params.takeInteger("cache-high-threshold", 1, 100) ?? 95;
    const low = params.takeInteger("cache-low-threshold", 1, 100) ?? 80;
    if (low >= high) throw new UsageError("cache-low-threshold must be below cache-high-threshold");
    if (maxSize < blockSize) throw new UsageError("cache-max-size must hold at least one block");
    const onReadText = params.take("cache-on-read");
    const options: CacheOptions = {
      mode,
      blockSize,
      maxSize,
      high: high / 100,
      low: low / 100,
      onRead: onReadText === undefined ? false : parseToggle(onReadText, "cache-on-read"),
    };
    let cache: BlockCache | undefined;
    return Promise.resolve({
      async wrap(next) {
        cache ??= new BlockCache(next.size(), options);
        if (next.size() !== cache.size) {
          throw new NbdError("EIO", "the layer below changed size; the cache cannot follow");
        }
        return await Promise.resolve(new CacheBackend(next, cache));
      },
    });
  },
};
