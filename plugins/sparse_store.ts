/**
 * A sparse byte store in memory: fixed-size pages allocated on first write,
 * freed again when trimmed or zeroed whole. Unallocated ranges read as
 * zeroes and report as holes. Used by the memory and data plugins and by
 * overlay filters.
 *
 * @module
 */

import type { Extent, ReadSegment } from "../core/backend.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";

/** Page size of the store. */
export const PAGE_SIZE = 64 * 1024;
/** Pages per directory entry: lets extents skip large empty regions quickly. */
const DIR_SHIFT = 10;

function isAllZero(bytes: Uint8Array): boolean {
  // Compare 32-bit words when aligned; pages always are.
  if (bytes.byteOffset % 4 === 0 && bytes.length % 4 === 0) {
    const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
    for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
    return true;
  }
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** A sparse, page-allocated byte array of a fixed virtual size. */
export class SparseStore {
  #pages = new Map<number, Uint8Array>();
  /** Allocated page count per directory entry (index = page >> DIR_SHIFT). */
  #directory = new Map<number, number>();
  /** Virtual size in bytes. */
  size: number;

  /** Creates an empty (all-zero) store of `size` bytes. */
  constructor(size: number) {
    this.size = size;
  }

  /** Bytes of memory held by allocated pages. */
  get allocatedBytes(): number {
    return this.#pages.size * PAGE_SIZE;
  }

  #page(index: number, create: boolean): Uint8Array | undefined {
    let page = this.#pages.get(index);
    if (!page && create) {
      page = new Uint8Array(PAGE_SIZE);
      this.#pages.set(index, page);
      const dir = index >> DIR_SHIFT;
      this.#directory.set(dir, (this.#directory.get(dir) ?? 0) + 1);
    }
    return page;
  }

  /**
   * Allocates the missing page where `buf` (written at `offset`) has reached
   * `done`, together with the following pages this write fills that are
   * missing too and not all zero, as views of one buffer: a later write of
   * the same range can then be received in place as one run.
   */
  #allocateRun(buf: Uint8Array, offset: number, done: number): Uint8Array {
    const first = Math.floor((offset + done) / PAGE_SIZE);
    let count = 1;
    for (let pos = (first + 1) * PAGE_SIZE; pos < offset + buf.length; pos += PAGE_SIZE) {
      const index = first + count;
      if (this.#pages.has(index)) break;
      const from = pos - offset;
      if (isAllZero(buf.subarray(from, Math.min(from + PAGE_SIZE, buf.length)))) break;
      count++;
    }
    if (count === 1) return this.#page(first, true)!;
    const run = new Uint8Array(count * PAGE_SIZE);
    for (let i = 0; i < count; i++) {
      this.#pages.set(first + i, run.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
      const dir = (first + i) >> DIR_SHIFT;
      this.#directory.set(dir, (this.#directory.get(dir) ?? 0) + 1);
    }
    return this.#pages.get(first)!;
  }

  #free(index: number): void {
    if (!this.#pages.delete(index)) return;
    const dir = index >> DIR_SHIFT;
    const count = this.#directory.get(dir)! - 1;
    if (count === 0) this.#directory.delete(dir);
    else this.#directory.set(dir, count);
  }

  /** Copies the bytes at `offset` into `buf`. */
  read(buf: Uint8Array, offset: number): void {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const within = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - within, buf.length - done);
      const page = this.#pages.get(index);
      if (page) buf.set(page.subarray(within, within + n), done);
      else buf.fill(0, done, done + n);
      done += n;
    }
  }

  /** Views of the stored bytes (no copy) and zero runs covering the range. */
  segments(offset: number, length: number): ReadSegment[] {
    const out: ReadSegment[] = [];
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const within = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - within, length - done);
      const page = this.#pages.get(index);
      if (page) out.push(page.subarray(within, within + n));
      else if (typeof out[out.length - 1] === "number") (out[out.length - 1] as number) += n;
      else out.push(n);
      done += n;
    }
    return out;
  }

  /**
   * Views of the stored bytes of a range, for writing into in place; undefined
   * unless every page of the range is allocated (a write into a hole goes
   * through `write`, which keeps all-zero pages holes).
   */
  writeViews(offset: number, length: number): Uint8Array[] | undefined {
    const out: Uint8Array[] = [];
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const within = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - within, length - done);
      const page = this.#pages.get(index);
      if (!page) return undefined;
      // Pages allocated together by one write are adjacent in one buffer: one view for the run.
      const last = out[out.length - 1];
      if (
        last && last.buffer === page.buffer &&
        last.byteOffset + last.length === page.byteOffset + within
      ) {
        out[out.length - 1] = new Uint8Array(last.buffer, last.byteOffset, last.length + n);
      } else out.push(page.subarray(within, within + n));
      done += n;
    }
    return out;
  }

  /** Writes `buf` at `offset`, allocating pages as needed. */
  write(buf: Uint8Array, offset: number): void {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const within = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - within, buf.length - done);
      const chunk = buf.subarray(done, done + n);
      let page = this.#pages.get(index);
      if (!page) {
        // Writing zeroes into a hole changes nothing: keep it a hole.
        if (isAllZero(chunk)) {
          done += n;
          continue;
        }
        page = this.#allocateRun(buf, offset, done);
      }
      page.set(chunk, within);
      done += n;
    }
  }

  /** Makes a range read as zeroes, freeing every page it covers completely. */
  zero(offset: number, length: number): void {
    const end = offset + length;
    const partial = (pos: number, n: number) => {
      const index = Math.floor(pos / PAGE_SIZE);
      const page = this.#pages.get(index);
      if (!page) return;
      const within = pos - index * PAGE_SIZE;
      page.fill(0, within, within + n);
      if (isAllZero(page)) this.#free(index);
    };
    const firstFull = Math.ceil(offset / PAGE_SIZE);
    const endFull = Math.floor(end / PAGE_SIZE);
    if (firstFull >= endFull) {
      // No whole page inside: one or two partial pages.
      let pos = offset;
      while (pos < end) {
        const n = Math.min((Math.floor(pos / PAGE_SIZE) + 1) * PAGE_SIZE, end) - pos;
        partial(pos, n);
        pos += n;
      }
      return;
    }
    if (offset < firstFull * PAGE_SIZE) partial(offset, firstFull * PAGE_SIZE - offset);
    if (endFull - firstFull > this.#pages.size) {
      // A huge range (a whole-disk trim): visit only the allocated pages.
      for (const index of [...this.#pages.keys()]) {
        if (index >= firstFull && index < endFull) this.#free(index);
      }
    } else {
      for (let index = firstFull; index < endFull; index++) this.#free(index);
    }
    if (end > endFull * PAGE_SIZE) partial(endFull * PAGE_SIZE, end - endFull * PAGE_SIZE);
  }

  /** Allocation status from `offset`: data for allocated pages, hole+zero elsewhere. */
  extents(offset: number, length: number): Extent[] {
    const out: Extent[] = [];
    const end = offset + length;
    const push = (n: number, flags: number) => {
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += n;
      else out.push({ length: n, flags });
    };
    let pos = offset;
    while (pos < end) {
      const index = Math.floor(pos / PAGE_SIZE);
      const dir = index >> DIR_SHIFT;
      if (!this.#directory.has(dir)) {
        // The whole directory entry is empty: skip it in one step.
        const dirEnd = (dir + 1) * (PAGE_SIZE << DIR_SHIFT);
        const n = Math.min(dirEnd, end) - pos;
        push(n, NBD_STATE_HOLE | NBD_STATE_ZERO);
        pos += n;
        continue;
      }
      const pageEnd = (index + 1) * PAGE_SIZE;
      const n = Math.min(pageEnd, end) - pos;
      push(n, this.#pages.has(index) ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO);
      pos += n;
    }
    return out;
  }

  /** Changes the virtual size; bytes beyond a smaller size are dropped. */
  resize(size: number): void {
    if (size < this.size) this.zero(size, this.size - size);
    this.size = size;
  }

  /** Every allocated page in offset order (for tests and dumps). */
  *allocatedPages(): Generator<[offset: number, bytes: Uint8Array]> {
    const indexes = [...this.#pages.keys()].sort((a, b) => a - b);
    for (const index of indexes) yield [index * PAGE_SIZE, this.#pages.get(index)!];
  }
}
