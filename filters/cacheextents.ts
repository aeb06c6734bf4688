/**
 * The `cacheextents` filter: keeps the last block-status answer of the layer
 * below and answers later block-status requests inside it without asking
 * again. For plugins where block status is slow (a remote server, a large
 * sparse file) and clients that ask for one extent at a time.
 *
 * ```
 * nbd serve --filter=cacheextents nbd hostname=remote
 * ```
 *
 * The layer below is asked for all the extents of the requested range even
 * when the client wants one (`NBD_CMD_FLAG_REQ_ONE`), so that the following
 * requests find them. The answer is shared by the connections to the same
 * export; any write, zero or trim forgets it.
 *
 * @module
 */

import {
  type Backend,
  type Extent,
  type ExtentsFlags,
  type Filter,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";

/** The block-status answer kept, shared by the connections of one export. */
class ExtentsCache {
  /** Where the kept extents start, and the extents, consecutive from there. */
  start = 0;
  extents: Extent[] = [];
  end = 0;
  /** Bumped by every change, so that an answer computed across a change is not kept. */
  generation = 0;

  /** The kept extents from `offset` up to at most `offset + length`, or undefined if not kept. */
  lookup(offset: number, length: number, reqOne: boolean): Extent[] | undefined {
    if (offset < this.start || offset >= this.end) return undefined;
    const out: Extent[] = [];
    const limit = offset + length;
    let at = this.start;
    for (const extent of this.extents) {
      const from = Math.max(at, offset);
      const to = Math.min(at + extent.length, limit);
      at += extent.length;
      if (to <= from) {
        if (at >= limit) break;
        continue;
      }
      out.push({ length: to - from, flags: extent.flags });
      if (reqOne || at >= limit) break;
    }
    return out;
  }

  keep(offset: number, extents: Extent[]): void {
    this.start = offset;
    this.extents = extents;
    this.end = offset + extents.reduce((n, e) => n + e.length, 0);
  }

  forget(): void {
    this.generation++;
    this.extents = [];
    this.start = this.end = 0;
  }
}

class CacheExtentsBackend extends PassthroughBackend {
  readonly #cache: ExtentsCache;

  constructor(next: Backend, cache: ExtentsCache) {
    super(next);
    this.#cache = cache;
  }

  override async extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    const cache = this.#cache;
    const kept = cache.lookup(offset, length, flags.reqOne);
    if (kept) return kept;
    const generation = cache.generation;
    const extents = await this.next.extents(offset, length, { ...flags, reqOne: false });
    if (generation !== cache.generation || extents.length === 0) return extents;
    cache.keep(offset, extents);
    return cache.lookup(offset, length, flags.reqOne) ?? extents;
  }

  /** Runs a change, forgetting the kept answer before (for later requests) and after it. */
  async #changing(change: () => Promise<void>): Promise<void> {
    this.#cache.forget();
    try {
      await change();
    } finally {
      this.#cache.forget();
    }
  }

  override pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.#changing(() => this.next.pwrite(buf, offset, flags));
  }
  override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.#changing(() => this.next.zero(offset, length, flags));
  }
  override trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.#changing(() => this.next.trim(offset, length, flags));
  }
}

/** The cacheextents filter. */
export const cacheextentsFilter: Filter = {
  name: "cacheextents",
  summary: "keep the last block-status answer and answer requests inside it",
  description: "Examples:\n  nbd serve --filter=cacheextents nbd hostname=remote\n" +
    "  nbd serve --filter=cacheextents --filter=readahead http https://example.com/disk.img",
  params: [],
  create() {
    const caches = new Map<string, ExtentsCache>();
    return Promise.resolve({
      wrap(next, context) {
        let cache = caches.get(context.exportName);
        if (!cache) caches.set(context.exportName, cache = new ExtentsCache());
        return Promise.resolve(new CacheExtentsBackend(next, cache));
      },
    });
  },
};
