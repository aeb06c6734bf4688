/**
 * A disk in shared memory, for the memory plugin when several serve workers
 * share it: one flat region of the disk's size (the kernel gives it pages on
 * first write) and one byte per 64 KiB page saying whether the page may hold
 * data, so extents still report holes. Every thread reads and writes the
 * same bytes, so a write is visible to all connections once it is answered.
 * Zeroing clears bytes but does not give memory back.
 *
 * @module
 */

import type { ReadSegment } from "../core/backend.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import type { Extent } from "../protocol/transmission.ts";
import { sharedRegion } from "../util/shared_buffers.ts";
import { PAGE_SIZE } from "./sparse_store.ts";

/** A disk of `size` bytes in shared regions named after `name`. */
export class SharedStore {
  /** Virtual size in bytes. */
  readonly size: number;
  readonly #bytes: Uint8Array;
  /** 1 where a page may hold data, 0 where it is known to be zero. */
  readonly #used: Uint8Array;

  /** Opens (on the main thread: creates) the regions of store `name`. */
  constructor(name: string, size: number) {
    this.size = size;
    const pages = Math.ceil(size / PAGE_SIZE);
    this.#bytes = new Uint8Array(sharedRegion(`${name}.bytes`, size));
    this.#used = new Uint8Array(sharedRegion(`${name}.pages`, Math.max(1, pages)));
  }

  /** Copies the bytes at `offset` into `buf`. */
  read(buf: Uint8Array, offset: number): void {
    buf.set(this.#bytes.subarray(offset, offset + buf.length));
  }

  /** Views of the stored bytes (no copy) and zero runs for pages never written. */
  segments(offset: number, length: number): ReadSegment[] {
    const out: ReadSegment[] = [];
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const n = Math.min((index + 1) * PAGE_SIZE - pos, length - done);
      const last = out[out.length - 1];
      if (this.#used[index]) {
        if (last instanceof Uint8Array && last.byteOffset + last.length === pos) {
          out[out.length - 1] = this.#bytes.subarray(last.byteOffset, pos + n);
        } else out.push(this.#bytes.subarray(pos, pos + n));
      } else if (typeof last === "number") out[out.length - 1] = last + n;
      else out.push(n);
      done += n;
    }
    return out;
  }

  /** The stored bytes of a range, marked as data, for writing into in place. */
  writeViews(offset: number, length: number): Uint8Array[] {
    this.#mark(offset, length);
    return [this.#bytes.subarray(offset, offset + length)];
  }

  #mark(offset: number, length: number): void {
    // Mark first: a reader on another thread that sees the mark reads the bytes, old or new.
    const last = Math.floor((offset + length - 1) / PAGE_SIZE);
    for (let index = Math.floor(offset / PAGE_SIZE); index <= last; index++) {
      if (!this.#used[index]) Atomics.store(this.#used, index, 1);
    }
  }

  /** Writes `buf` at `offset`. */
  write(buf: Uint8Array, offset: number): void {
    this.#mark(offset, buf.length);
    this.#bytes.set(buf, offset);
  }

  /** Makes a range read as zeroes; pages it covers completely become holes again. */
  zero(offset: number, length: number): void {
    if (length === 0) return;
    const end = offset + length;
    const firstFull = Math.ceil(offset / PAGE_SIZE);
    const endFull = Math.floor(end / PAGE_SIZE);
    // Only pages that may hold data need clearing.
    const first = Math.floor(offset / PAGE_SIZE);
    const last = Math.floor((end - 1) / PAGE_SIZE);
    for (let index = first; index <= last; index++) {
      if (!this.#used[index]) continue;
      const from = Math.max(offset, index * PAGE_SIZE);
      const to = Math.min(end, (index + 1) * PAGE_SIZE);
      if (index >= firstFull && index < endFull) Atomics.store(this.#used, index, 0);
      this.#bytes.fill(0, from, to);
    }
  }

  /** Allocation status from `offset`: data for pages written, hole+zero elsewhere. */
  extents(offset: number, length: number): Extent[] {
    const out: Extent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const index = Math.floor(pos / PAGE_SIZE);
      const n = Math.min((index + 1) * PAGE_SIZE, end) - pos;
      const flags = this.#used[index] ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO;
      const previous = out[out.length - 1];
      if (previous && previous.flags === flags) previous.length += n;
      else out.push({ length: n, flags });
      pos += n;
    }
    return out;
  }
}
