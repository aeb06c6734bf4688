/**
 * The `pattern` plugin: a read-only disk whose every 8-byte big-endian word
 * holds its own offset. Deterministic, never zero past the first word,
 * and free to generate: a good source for copy and filter tests.
 *
 * ```
 * nbd serve pattern 1G
 * ```
 *
 * @module
 */

import { completeBackend, type Plugin } from "../core/backend.ts";

/** Fills `buf` with the pattern for the bytes starting at `offset`. */
export function fillPattern(buf: Uint8Array, offset: number): void {
  const start = offset - (offset % 8);
  const skip = offset - start;
  if (skip === 0 && buf.byteOffset % 4 === 0 && buf.length % 8 === 0) {
    fillAligned(buf, start);
    return;
  }
  // Unaligned: generate whole words into a scratch buffer and copy the window.
  const words = Math.ceil((skip + buf.length) / 8);
  const scratch = new Uint8Array(words * 8);
  fillAligned(scratch, start);
  buf.set(scratch.subarray(skip, skip + buf.length));
}

function fillAligned(buf: Uint8Array, offset: number): void {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let hi = Math.floor(offset / 0x1_0000_0000);
  let lo = offset % 0x1_0000_0000;
  for (let pos = 0; pos < buf.length; pos += 8) {
    view.setUint32(pos, hi);
    view.setUint32(pos + 4, lo);
    lo += 8;
    if (lo >= 0x1_0000_0000) {
      lo -= 0x1_0000_0000;
      hi++;
    }
  }
}

/** The pattern plugin. */
export const patternPlugin: Plugin = {
  name: "pattern",
  summary: "read-only disk where each 8-byte word holds its own offset (big-endian)",
  description: "Example:\n  nbd serve pattern 1G",
  params: [
    { name: "size", value: "SIZE", type: "size", description: "size of the disk", required: true },
  ],
  magicParam: "size",
  create(params) {
    const size = params.takeSize("size")!;
    return Promise.resolve({
      open: () =>
        Promise.resolve(completeBackend({
          size: () => size,
          capabilities: () => ({ multiConn: true, cache: "native" }),
          pread(buf, offset) {
            fillPattern(buf, offset);
            return Promise.resolve();
          },
          cache: () => Promise.resolve(),
        })),
    });
  },
};
