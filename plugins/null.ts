/**
 * The `null` plugin: a disk that reads as zeroes and discards writes, and
 * the `zero` plugin: a disk of size 0. Useful as benchmark sinks and for
 * edge cases.
 *
 * ```
 * nbd serve null 1G
 * nbd serve zero
 * ```
 *
 * @module
 */

import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import { completeBackend, type Plugin, type PluginBackend } from "../core/backend.ts";

function nullBackend(size: number): PluginBackend {
  return {
    size: () => size,
    capabilities: () => ({ multiConn: true, fua: "native", cache: "native", fastZero: true }),
    pread(buf) {
      buf.fill(0);
      return Promise.resolve();
    },
    readView: (_offset, length) => [length],
    pwrite: () => Promise.resolve(),
    flush: () => Promise.resolve(),
    trim: () => Promise.resolve(),
    zero: () => Promise.resolve(),
    extents: (_offset, length) =>
      Promise.resolve([{ length, flags: NBD_STATE_HOLE | NBD_STATE_ZERO }]),
    cache: () => Promise.resolve(),
  };
}

/** The null plugin. */
export const nullPlugin: Plugin = {
  name: "null",
  summary: "disk that reads as zeroes and discards writes",
  description: "Example:\n  nbd serve null 1G",
  params: [
    { name: "size", value: "SIZE", type: "size", default: "0", description: "size of the disk" },
  ],
  magicParam: "size",
  create(params) {
    const size = params.takeSize("size") ?? 0;
    return Promise.resolve({ open: () => Promise.resolve(completeBackend(nullBackend(size))) });
  },
};

/** The zero plugin: an empty (0-byte) disk. */
export const zeroPlugin: Plugin = {
  name: "zero",
  summary: "empty disk of size 0",
  params: [],
  create() {
    return Promise.resolve({
      open: () =>
        Promise.resolve(completeBackend({
          size: () => 0,
          capabilities: () => ({ multiConn: true, cache: "native" }),
          pread: () => Promise.resolve(),
          cache: () => Promise.resolve(),
        })),
    });
  },
};
