/**
 * A read-only disk computed on the fly: every 512-byte sector holds its
 * own number as text ("sector 42"), padded with spaces, the last byte a
 * newline. Nothing is stored; `size` and `pread` are all it writes.
 *
 * ```
 * nbd serve ./examples/computed_disk.ts 1M
 * ```
 *
 * @module
 */

import { definePlugin } from "../mod.ts";

/** Bytes of one sector's text. */
const SECTOR = 512;

/** The text of sector `n`, exactly SECTOR bytes. */
export function sectorText(n: number): Uint8Array {
  const text = `sector ${n}`.padEnd(SECTOR - 1, " ") + "\n";
  return new TextEncoder().encode(text);
}

export default definePlugin({
  name: "computed",
  summary: "read-only disk whose sectors hold their own numbers",
  params: [
    { name: "size", value: "SIZE", type: "size", description: "virtual size", required: true },
  ],
  magicParam: "size",
  create(params) {
    const size = params.takeSize("size")!;
    return {
      size: () => size,
      pread(buf, offset) {
        // Sector by sector, copying the part of each that the request covers.
        for (let done = 0; done < buf.length;) {
          const pos = offset + done;
          const sector = Math.floor(pos / SECTOR);
          const within = pos % SECTOR;
          const n = Math.min(SECTOR - within, buf.length - done);
          buf.set(sectorText(sector).subarray(within, within + n), done);
          done += n;
        }
        return Promise.resolve();
      },
    };
  },
});
