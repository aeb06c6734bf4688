/**
 * The `truncate` filter: changes the apparent size of the layer below.
 * Bytes past the real end read as zeroes; writing zeroes there succeeds,
 * anything else fails with EIO.
 *
 * ```
 * nbd serve --filter=truncate memory 1000 round-up=512
 * nbd serve --filter=truncate pattern 1G truncate=100M
 * ```
 *
 * Parameters:
 * - `truncate=SIZE`: the new size.
 * - `round-up=N`: round the size up to a multiple of N.
 * - `round-down=N`: round the size down to a multiple of N.
 *
 * @module
 */

import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";
import {
  type Backend,
  type Extent,
  type ExtentsFlags,
  type Filter,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";

function allZero(bytes: Uint8Array): boolean {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** The layer below seen with a different size. */
export class TruncateBackend extends PassthroughBackend {
  readonly #size: number;
  readonly #real: number;

  /** Presents `next` with `size` bytes. */
  constructor(next: Backend, size: number) {
    super(next);
    this.#size = size;
    this.#real = next.size();
    if (next.readView) {
      this.readView = (offset, length) => {
        const inside = Math.max(0, Math.min(length, this.#real - offset));
        if (inside === 0) return [length];
        const segments = next.readView!(offset, inside);
        return segments && inside < length ? [...segments, length - inside] : segments;
      };
    }
  }
  /** The new size. */
  override size(): number {
    return this.#size;
  }
  /** How many bytes of [offset, offset+length) lie inside the real disk. */
  #inside(offset: number, length: number): number {
    return Math.max(0, Math.min(length, this.#real - offset));
  }
  /** Reads; past the real end, zeroes. */
  override async pread(buf: Uint8Array, offset: number): Promise<void> {
    const inside = this.#inside(offset, buf.length);
    if (inside > 0) await this.next.pread(buf.subarray(0, inside), offset);
    buf.fill(0, inside);
  }
  /** Writes; past the real end only zeroes are accepted. */
  override async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    const inside = this.#inside(offset, buf.length);
    if (!allZero(buf.subarray(inside))) {
      throw new NbdError("EIO", "non-zero write beyond the end of the underlying disk");
    }
    if (inside > 0) await this.next.pwrite(buf.subarray(0, inside), offset, flags);
  }
  /** Trims the part inside the real disk. */
  override async trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    const inside = this.#inside(offset, length);
    if (inside > 0) await this.next.trim(offset, inside, flags);
  }
  /** Zeroes the part inside the real disk (the rest already reads as zero). */
  override async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const inside = this.#inside(offset, length);
    if (inside > 0) await this.next.zero(offset, inside, flags);
  }
  /** Block status; past the real end, a hole. */
  override async extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    const inside = this.#inside(offset, length);
    const tail = { length: length - inside, flags: NBD_STATE_HOLE | NBD_STATE_ZERO };
    if (inside === 0) return [tail];
    const extents = await this.next.extents(offset, inside, flags);
    // Clip what the layer below reports to the real end, then add the tail.
    const out: Extent[] = [];
    let covered = 0;
    for (const e of extents) {
      const n = Math.min(e.length, inside - covered);
      if (n <= 0) break;
      out.push({ length: n, flags: e.flags });
      covered += n;
    }
    if (covered === inside && tail.length > 0 && !flags.reqOne) out.push(tail);
    return out;
  }
  /** Prefetches the part inside the real disk. */
  override async cache(offset: number, length: number): Promise<void> {
    const inside = this.#inside(offset, length);
    if (inside > 0) await this.next.cache(offset, inside);
  }
}

/** The truncate filter. */
export const truncateFilter: Filter = {
  name: "truncate",
  summary: "change the size of the layer below (cut, extend, round up or down)",
  description: "Examples:\n" +
    "  nbd serve --filter=truncate memory 1000 round-up=512\n" +
    "  nbd serve --filter=truncate pattern 1G truncate=100M",
  params: [
    {
      name: "truncate",
      value: "SIZE",
      type: "size",
      default: "the size below",
      description: "the new size",
    },
    {
      name: "round-up",
      value: "N",
      type: "size",
      description: "round the size up to a multiple of N",
    },
    {
      name: "round-down",
      value: "N",
      type: "size",
      description: "round the size down to a multiple of N",
    },
  ],
  create(params) {
    const truncate = params.takeSize("truncate");
    const up = params.takeSize("round-up");
    const down = params.takeSize("round-down");
    if (up === 0 || down === 0) throw new UsageError("truncate: round-up/round-down must be > 0");
    return Promise.resolve({
      async wrap(next) {
        let size = truncate ?? next.size();
        if (up !== undefined) size = Math.ceil(size / up) * up;
        if (down !== undefined) size = Math.floor(size / down) * down;
        if (!Number.isSafeInteger(size)) throw new NbdError("EINVAL", "the new size is too large");
        return await Promise.resolve(new TruncateBackend(next, size));
      },
    });
  },
};
