/**
 * The `blocksize` filter: lets clients send any request to a layer below
 * that needs aligned or bounded ones. Large requests are split; unaligned
 * heads and tails of reads are widened, of writes and zeroes done by
 * read-modify-write, and of trims dropped (a trim is only a hint). The size
 * is rounded down to the alignment.
 *
 * ```
 * nbd serve --filter=blocksize memory 1G minblock=4K maxdata=1M
 * ```
 *
 * Parameters:
 * - `minblock=SIZE`: alignment passed below (power of two, at most 64K;
 *   default: the minimum block size of the layer below).
 * - `maxdata=SIZE`: largest read or write passed below (default: 64M or
 *   the layer's maximum, whichever is smaller).
 * - `maxlen=SIZE`: largest trim, zero, cache or block-status request
 *   passed below (default: 4G - minblock).
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import {
  type Backend,
  type Capabilities,
  type Extent,
  type ExtentsFlags,
  type Filter,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";
import { RwLock } from "../util/locks.ts";

/** Alignment and limits used for one connection. */
export interface BlockLimits {
  /** Alignment (power of two). */
  minblock: number;
  /** Largest read/write. */
  maxdata: number;
  /** Largest request without data. */
  maxlen: number;
}

class BlocksizeBackend extends PassthroughBackend {
  readonly #l: BlockLimits;
  readonly #size: number;
  /**
   * Read-modify-write cycles hold it exclusively and aligned writes share
   * it, so a cycle can never put back stale bytes over another write.
   */
  readonly #lock: RwLock;

  constructor(next: Backend, limits: BlockLimits, lock: RwLock) {
    super(next);
    this.#l = limits;
    this.#size = Math.floor(next.size() / limits.minblock) * limits.minblock;
    this.#lock = lock;
  }
  override size(): number {
    return this.#size;
  }
  override capabilities(): Capabilities {
    const caps = this.next.capabilities();
    return {
      ...caps,
      blockSize: {
        minimum: 1,
        preferred: Math.max(this.#l.minblock, caps.blockSize.preferred),
        maximum: Math.max(caps.blockSize.maximum, this.#l.maxdata),
      },
    };
  }

  /** Reads an aligned range in pieces of at most maxdata. */
  async #readAligned(buf: Uint8Array, offset: number): Promise<void> {
    for (let done = 0; done < buf.length; done += this.#l.maxdata) {
      const n = Math.min(this.#l.maxdata, buf.length - done);
      await this.next.pread(buf.subarray(done, done + n), offset + done);
    }
  }

  override async pread(buf: Uint8Array, offset: number): Promise<void> {
    const b = this.#l.minblock;
    const end = offset + buf.length;
    let pos = offset;
    if (pos % b !== 0) {
      // Unaligned head: read its whole block and copy the part asked for.
      const start = Math.floor(pos / b) * b;
      const block = new Uint8Array(b);
      await this.next.pread(block, start);
      const n = Math.min(start + b, end) - pos;
      buf.set(block.subarray(pos - start, pos - start + n), 0);
      pos += n;
    }
    const midEnd = Math.floor(end / b) * b;
    if (midEnd > pos) {
      await this.#readAligned(buf.subarray(pos - offset, midEnd - offset), pos);
      pos = midEnd;
    }
    if (pos < end) {
      const block = new Uint8Array(b);
      await this.next.pread(block, pos);
      buf.set(block.subarray(0, end - pos), pos - offset);
    }
  }

  /** Read-modify-write of the block holding `pos`, with `patch` applied to it. */
  #patchBlock(pos: number, patch: (block: Uint8Array, within: number) => void): Promise<void> {
    const b = this.#l.minblock;
    const start = Math.floor(pos / b) * b;
    return this.#lock.exclusive(async () => {
      const block = new Uint8Array(b);
      await this.next.pread(block, start);
      patch(block, pos - start);
      await this.next.pwrite(block, start, { fua: false });
    });
  }

  override async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    const b = this.#l.minblock;
    const end = offset + buf.length;
    let pos = offset;
    // Unaligned head (possibly the whole request inside one block).
    if (pos % b !== 0) {
      const blockEnd = Math.floor(pos / b) * b + b;
      const n = Math.min(blockEnd, end) - pos;
      await this.#patchBlock(pos, (block, within) => block.set(buf.subarray(0, n), within));
      pos += n;
    }
    const midEnd = Math.floor(end / b) * b;
    while (pos < midEnd) {
      const n = Math.min(this.#l.maxdata, midEnd - pos);
      const piece = buf.subarray(pos - offset, pos - offset + n);
      const at = pos;
      await this.#lock.shared(() => this.next.pwrite(piece, at, { fua: false }));
      pos += n;
    }
    if (pos < end) {
      const n = end - pos;
      const from = pos - offset;
      await this.#patchBlock(pos, (block) => block.set(buf.subarray(from, from + n), 0));
    }
    if (flags.fua) await this.next.flush();
  }

  override async trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    const b = this.#l.minblock;
    const midStart = Math.ceil(offset / b) * b;
    const midEnd = Math.floor((offset + length) / b) * b;
    for (let pos = midStart; pos < midEnd;) {
      const n = Math.min(this.#l.maxlen, midEnd - pos);
      await this.next.trim(pos, n, flags);
      pos += n;
    }
  }

  override async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const b = this.#l.minblock;
    const end = offset + length;
    const midEnd = Math.floor(end / b) * b;
    if (flags.fast && (offset % b !== 0 || end % b !== 0)) {
      throw new NbdError("ENOTSUP", "an unaligned zero needs read-modify-write, which is not fast");
    }
    let pos = offset;
    if (pos % b !== 0) {
      const n = Math.min(Math.floor(pos / b) * b + b, end) - pos;
      await this.#patchBlock(pos, (block, within) => block.fill(0, within, within + n));
      pos += n;
    }
    while (pos < midEnd) {
      const n = Math.min(this.#l.maxlen, midEnd - pos);
      const at = pos;
      await this.#lock.shared(() => this.next.zero(at, n, { ...flags, fua: false }));
      pos += n;
    }
    if (pos < end) {
      const n = end - pos;
      await this.#patchBlock(pos, (block) => block.fill(0, 0, n));
    }
    if (flags.fua) await this.next.flush();
  }

  override async extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    const b = this.#l.minblock;
    const start = Math.floor(offset / b) * b;
    const end = Math.min(this.#size, Math.ceil((offset + length) / b) * b);
    const span = Math.min(this.#l.maxlen, end - start);
    const extents = await this.next.extents(start, span, flags);
    // Drop what lies before the requested offset.
    let skip = offset - start;
    const out: Extent[] = [];
    for (const e of extents) {
      if (skip >= e.length) {
        skip -= e.length;
        continue;
      }
      out.push({ length: e.length - skip, flags: e.flags });
      skip = 0;
    }
    return out;
  }

  override async cache(offset: number, length: number): Promise<void> {
    const b = this.#l.minblock;
    const start = Math.floor(offset / b) * b;
    const end = Math.min(this.#size, Math.ceil((offset + length) / b) * b);
    for (let pos = start; pos < end;) {
      const n = Math.min(this.#l.maxlen, end - pos);
      await this.next.cache(pos, n);
      pos += n;
    }
  }
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** The blocksize filter. */
export const blocksizeFilter: Filter = {
  name: "blocksize",
  summary: "split large and align small requests for the layer below (read-modify-write)",
  description: "Example:\n  nbd serve --filter=blocksize memory 1G minblock=4K maxdata=1M",
  params: [
    {
      name: "minblock",
      value: "SIZE",
      type: "size",
      default: "the minimum below",
      description: "alignment passed below (power of 2, ≤ 64K)",
    },
    {
      name: "maxdata",
      value: "SIZE",
      type: "size",
      default: "the maximum below, at most 64M",
      description: "largest read/write passed below",
    },
    {
      name: "maxlen",
      value: "SIZE",
      type: "size",
      default: "4G less one, down to a multiple of minblock",
      description: "largest trim/zero/cache/extents passed below",
    },
  ],
  create(params) {
    const minblock = params.takeSize("minblock");
    const maxdata = params.takeSize("maxdata");
    const maxlen = params.takeSize("maxlen");
    if (minblock !== undefined && (!isPowerOfTwo(minblock) || minblock > 65536)) {
      throw new UsageError("minblock: must be a power of two no larger than 64K");
    }
    if (minblock !== undefined && maxdata !== undefined && maxdata % minblock !== 0) {
      throw new UsageError("maxdata: must be a multiple of minblock");
    }
    if (minblock !== undefined && maxlen !== undefined && maxlen % minblock !== 0) {
      throw new UsageError("maxlen: must be a multiple of minblock");
    }
    const lock = new RwLock();
    return Promise.resolve({
      async wrap(next) {
        const below = next.capabilities().blockSize;
        const min = minblock ?? Math.max(1, below.minimum);
        const data = maxdata ?? Math.min(64 * 1024 * 1024, below.maximum);
        const len = maxlen ?? Math.floor(0xffffffff / min) * min;
        if (data < min || data % min !== 0) {
          throw new NbdError("EINVAL", `maxdata=${data} must be a multiple of minblock=${min}`);
        }
        if (len < min || len % min !== 0) {
          throw new NbdError("EINVAL", `maxlen=${len} must be a multiple of minblock=${min}`);
        }
        return await Promise.resolve(
          new BlocksizeBackend(next, { minblock: min, maxdata: data, maxlen: len }, lock),
        );
      },
    });
  },
};
