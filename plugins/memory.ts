/**
 * The `memory` plugin: a sparse RAM disk shared by all connections. Pages
 * are allocated on first write; trimmed or zeroed pages are freed and
 * report as holes. The contents vanish when the server exits.
 *
 * ```
 * nbd serve memory 1G
 * nbd serve memory size=1T
 * ```
 *
 * @module
 */

import type { Plugin, PluginBackend } from "../core/backend.ts";
import { completeBackend } from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";
import { SparseStore } from "./sparse_store.ts";
import { SharedStore } from "./shared_store.ts";
import { sharing } from "../util/shared_buffers.ts";

/** Largest size accepted: the store indexes pages with safe integers. */
const MAX_MEMORY_SIZE = 2 ** 53 - 2 ** 16;

/** What `storeBackend` needs of a store: the sparse one, or the shared one of serve workers. */
export type Store = Pick<
  SparseStore,
  "size" | "read" | "segments" | "writeViews" | "write" | "zero" | "extents"
>;

/** Backend methods over a sparse store, shared by the memory and data plugins. */
export function storeBackend(store: Store): PluginBackend {
  return {
    size: () => store.size,
    capabilities: () => ({
      fua: "native",
      cache: "native",
      multiConn: true,
      fastZero: true,
    }),
    pread(buf, offset) {
      store.read(buf, offset);
      return Promise.resolve();
    },
    readView: (offset, length) => store.segments(offset, length),
    // A write is done once its bytes are in the store, FUA included: payloads can land there.
    writeView: (offset, length) => store.writeViews(offset, length),
    pwrite(buf, offset) {
      store.write(buf, offset);
      return Promise.resolve();
    },
    flush: () => Promise.resolve(),
    trim(offset, length) {
      store.zero(offset, length);
      return Promise.resolve();
    },
    zero(offset, length) {
      store.zero(offset, length);
      return Promise.resolve();
    },
    extents: (offset, length) => Promise.resolve(store.extents(offset, length)),
    cache: () => Promise.resolve(),
  };
}

/** Memory disks created so far in shared memory (names their regions). */
let sharedStores = 0;

/** The memory plugin. */
export const memoryPlugin: Plugin = {
  name: "memory",
  summary: "sparse RAM disk, shared by all connections, discarded at exit",
  description: "Examples:\n  nbd serve memory 1G\n  nbd serve memory size=1T",
  params: [
    {
      name: "size",
      value: "SIZE",
      type: "size",
      description: "virtual size of the disk, e.g. 1G",
      required: true,
    },
    {
      name: "allocator",
      value: "ALLOCATOR",
      type: "enum",
      choices: ["sparse"],
      default: "sparse",
      description: "allocation strategy",
    },
  ],
  magicParam: "size",
  create(params) {
    const size = params.takeSize("size")!;
    if (size > MAX_MEMORY_SIZE) {
      throw new UsageError(`memory: size must be at most ${MAX_MEMORY_SIZE}`);
    }
    const allocator = params.take("allocator");
    if (allocator !== undefined && allocator !== "sparse") {
      throw new UsageError(`memory: allocator=${allocator} is not supported (only sparse)`);
    }
    // Serve workers share one disk in shared memory; the creation order names it alike in each.
    let store: Store;
    if (sharing()) {
      try {
        store = new SharedStore(`memory.${sharedStores++}`, size);
      } catch (error) {
        throw new UsageError(
          `memory: cannot share ${size} bytes between workers: ${(error as Error).message}`,
        );
      }
    } else store = new SparseStore(size);
    return Promise.resolve({
      open: () => Promise.resolve(completeBackend(storeBackend(store))),
    });
  },
};
