/**
 * A writable disk kept in a key-value store: one entry per 4 KiB block,
 * keyed by block number. Missing blocks read as zeroes and report as
 * holes; trim and zero delete entries. The store here is a `Map` shared
 * by all connections; swap `MapStore` for any store with get/set/delete
 * (a database, an object store) and the rest stays the same.
 *
 * ```
 * nbd serve ./examples/kv_disk.ts 64M
 * ```
 *
 * @module
 */

import { definePlugin, type Extent, NBD_STATE_HOLE, NBD_STATE_ZERO } from "../mod.ts";

/** Block size: the unit of the store. */
export const BLOCK = 4096;

/** What the disk needs of a key-value store. */
export interface BlockStore {
  /** The block, or undefined when it was never written (reads as zeroes). */
  get(key: number): Uint8Array | undefined;
  /** Stores a whole block (the store keeps `value`). */
  set(key: number, value: Uint8Array): void;
  /** Forgets a block. */
  delete(key: number): void;
}

/** The simplest store: a Map in memory. */
export class MapStore implements BlockStore {
  readonly #map = new Map<number, Uint8Array>();
  /** Reads a block. */
  get(key: number): Uint8Array | undefined {
    return this.#map.get(key);
  }
  /** Writes a block. */
  set(key: number, value: Uint8Array): void {
    this.#map.set(key, value);
  }
  /** Deletes a block. */
  delete(key: number): void {
    this.#map.delete(key);
  }
}

/** Calls `fn` for each block piece of [offset, offset+length): block, start within it, length, position in the request. */
function eachBlock(
  offset: number,
  length: number,
  fn: (key: number, within: number, n: number, done: number) => void,
): void {
  for (let done = 0; done < length;) {
    const pos = offset + done;
    const key = Math.floor(pos / BLOCK);
    const within = pos % BLOCK;
    const n = Math.min(BLOCK - within, length - done);
    fn(key, within, n, done);
    done += n;
  }
}

export default definePlugin({
  name: "kv",
  summary: "writable disk stored as one key-value entry per 4K block",
  params: [
    { name: "size", value: "SIZE", type: "size", description: "virtual size", required: true },
  ],
  magicParam: "size",
  create(params) {
    const size = params.takeSize("size")!;
    const store: BlockStore = new MapStore();
    const clear = (offset: number, length: number) =>
      eachBlock(offset, length, (key, within, n) => {
        const block = store.get(key);
        if (!block) return;
        if (n === BLOCK) store.delete(key);
        else block.fill(0, within, within + n);
      });
    return {
      size: () => size,
      capabilities: () => ({ multiConn: true, fua: "native" }),
      pread(buf, offset) {
        eachBlock(offset, buf.length, (key, within, n, done) => {
          const block = store.get(key);
          if (block) buf.set(block.subarray(within, within + n), done);
          else buf.fill(0, done, done + n);
        });
        return Promise.resolve();
      },
      pwrite(buf, offset) {
        eachBlock(offset, buf.length, (key, within, n, done) => {
          let block = store.get(key);
          if (!block) {
            block = new Uint8Array(BLOCK);
            store.set(key, block);
          }
          // Copied: buf is the server's again once this resolves.
          block.set(buf.subarray(done, done + n), within);
        });
        return Promise.resolve();
      },
      flush: () => Promise.resolve(),
      trim(offset, length) {
        clear(offset, length);
        return Promise.resolve();
      },
      zero(offset, length) {
        clear(offset, length);
        return Promise.resolve();
      },
      extents(offset, length) {
        const out: Extent[] = [];
        eachBlock(offset, length, (key, _within, n) => {
          const flags = store.get(key) ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO;
          const last = out[out.length - 1];
          if (last && last.flags === flags) last.length += n;
          else out.push({ length: n, flags });
        });
        return Promise.resolve(out);
      },
    };
  },
});
