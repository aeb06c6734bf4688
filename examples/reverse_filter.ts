/**
 * A filter that maps offsets: it serves the blocks of the layer below in
 * reverse order (block i of the export is block n-1-i below), for reads,
 * writes, trims, zeroes and block status. Each request is split at block
 * boundaries and every piece is sent to its mapped place.
 *
 * ```
 * nbd serve --filter=./examples/reverse_filter.ts memory 1M block=4K
 * ```
 *
 * @module
 */

import { defineFilter, NbdError } from "../mod.ts";

/** One piece of a request: where it goes below, and where it sits in the request. */
interface Piece {
  /** Offset in the layer below. */
  below: number;
  /** Offset within the request. */
  done: number;
  /** Length. */
  length: number;
}

/** The pieces of [offset, offset+length), each within one block, mapped to their place below. */
export function pieces(block: number, size: number, offset: number, length: number): Piece[] {
  const blocks = size / block;
  const out: Piece[] = [];
  for (let done = 0; done < length;) {
    const pos = offset + done;
    const index = Math.floor(pos / block);
    const within = pos % block;
    const n = Math.min(block - within, length - done);
    out.push({ below: (blocks - 1 - index) * block + within, done, length: n });
    done += n;
  }
  return out;
}

export default defineFilter({
  name: "reverse",
  summary: "serve the blocks of the layer below in reverse order",
  params: [
    {
      name: "block",
      value: "SIZE",
      type: "size",
      default: "4K",
      description: "block size (the export size must be a multiple of it)",
    },
  ],
  create: (params) => ({ block: params.takeSize("block") ?? 4096 }),
  open() {
    if (this.next.size() % this.config.block !== 0) {
      throw new NbdError("EINVAL", `the size is not a multiple of block=${this.config.block}`);
    }
  },
  async pread(buf, offset) {
    const { block } = this.config;
    for (const p of pieces(block, this.next.size(), offset, buf.length)) {
      await this.next.pread(buf.subarray(p.done, p.done + p.length), p.below);
    }
  },
  async pwrite(buf, offset, flags) {
    const { block } = this.config;
    for (const p of pieces(block, this.next.size(), offset, buf.length)) {
      await this.next.pwrite(buf.subarray(p.done, p.done + p.length), p.below, flags);
    }
  },
  async trim(offset, length, flags) {
    for (const p of pieces(this.config.block, this.next.size(), offset, length)) {
      await this.next.trim(p.below, p.length, flags);
    }
  },
  async zero(offset, length, flags) {
    for (const p of pieces(this.config.block, this.next.size(), offset, length)) {
      await this.next.zero(p.below, p.length, flags);
    }
  },
  async extents(offset, length, flags) {
    // The first piece only: block status may describe less than was asked.
    const [first] = pieces(this.config.block, this.next.size(), offset, length);
    const extents = await this.next.extents(first!.below, first!.length, flags);
    let left = first!.length;
    const out = [];
    for (const e of extents) {
      if (left <= 0) break;
      const n = Math.min(e.length, left);
      out.push({ length: n, flags: e.flags });
      left -= n;
    }
    return out;
  },
});
