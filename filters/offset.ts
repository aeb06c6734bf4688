/**
 * The `offset` filter: serves the window `[offset, offset+range)` of the
 * layer below.
 *
 * ```
 * nbd serve --filter=offset memory 1G offset=1M range=100M
 * ```
 *
 * Parameters:
 * - `offset=SIZE`: start of the window (default 0).
 * - `range=SIZE`: length of the window (default: to the end).
 *
 * @module
 */

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

/**
 * A window of the backend below: every offset is shifted by `start`.
 * Shared by the offset and partition filters.
 */
export class WindowBackend extends PassthroughBackend {
  readonly #start: number;
  readonly #length: number;

  /** Serves `length` bytes of `next` from `start`; throws if the window does not fit. */
  constructor(next: Backend, start: number, length: number) {
    super(next);
    if (start + length > next.size()) {
      throw new NbdError(
        "EINVAL",
        `the window ${start}+${length} lies beyond the end of the disk (size ${next.size()})`,
      );
    }
    this.#start = start;
    this.#length = length;
    // Shifting offsets does not change data, so zero-copy reads stay available.
    if (next.readView) this.readView = (offset, n) => next.readView!(offset + start, n);
  }
  /** Length of the window. */
  override size(): number {
    return this.#length;
  }
  /** Reads inside the window. */
  override pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.next.pread(buf, offset + this.#start);
  }
  /** Writes inside the window. */
  override pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.next.pwrite(buf, offset + this.#start, flags);
  }
  /** Trims inside the window. */
  override trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.next.trim(offset + this.#start, length, flags);
  }
  /** Zeroes inside the window. */
  override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.next.zero(offset + this.#start, length, flags);
  }
  /** Block status inside the window. */
  override extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    return this.next.extents(offset + this.#start, length, flags);
  }
  /** Prefetch inside the window. */
  override cache(offset: number, length: number): Promise<void> {
    return this.next.cache(offset + this.#start, length);
  }
}

/** The offset filter. */
export const offsetFilter: Filter = {
  name: "offset",
  summary: "serve a window (offset and length) of the layer below",
  description: "Example:\n  nbd serve --filter=offset memory 1G offset=1M range=100M",
  params: [
    {
      name: "offset",
      value: "SIZE",
      type: "size",
      default: "0",
      description: "start of the window",
    },
    {
      name: "range",
      value: "SIZE",
      type: "size",
      default: "to the end",
      description: "length of the window",
    },
  ],
  create(params) {
    const start = params.takeSize("offset") ?? 0;
    const range = params.takeSize("range");
    return Promise.resolve({
      async wrap(next) {
        const size = next.size();
        if (start > size) {
          throw new NbdError("EINVAL", `offset=${start} is beyond the end of the disk (${size})`);
        }
        return await Promise.resolve(new WindowBackend(next, start, range ?? size - start));
      },
    });
  },
};
