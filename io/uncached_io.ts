/**
 * File I/O that keeps data out of the page cache (the file plugin's
 * `cache=none`), on the Linux fast paths. Aligned transfers go through a
 * descriptor opened with O_DIRECT, staged in page-aligned bounce buffers
 * (O_DIRECT needs the memory, the offset and the length aligned, and a
 * request's buffer rarely is). Whatever cannot go direct (an unaligned
 * request, a filesystem that refuses O_DIRECT) uses the ordinary
 * descriptor and is evicted afterwards: reads by posix_fadvise(DONTNEED),
 * writes once their writeback, started at once, has finished a few writes
 * later, since only clean pages can be dropped.
 *
 * @module
 */

import {
  dropCache,
  preadOnThread,
  pwriteOnThread,
  SYNC_FILE_RANGE_WAIT_AFTER,
  SYNC_FILE_RANGE_WAIT_BEFORE,
  SYNC_FILE_RANGE_WRITE,
  syncFileRange,
} from "./libc.ts";

/** The alignment of direct transfers: a page, which covers 512- and 4096-byte sectors. */
export const DIRECT_ALIGNMENT = 4096;

/** How many written ranges wait for their writeback before they are evicted. */
const EVICTION_WINDOW = 8;

/** Bytes of bounce buffers kept for reuse at most. */
const POOL_BYTES = 32 * 1024 * 1024;

function addressOf(buf: Uint8Array): number {
  return Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
}

/** A buffer of `length` bytes whose first byte sits at a multiple of `alignment` in memory. */
export function alignedBuffer(length: number, alignment = DIRECT_ALIGNMENT): Uint8Array {
  const raw = new Uint8Array(length + alignment);
  const skip = (alignment - (addressOf(raw) % alignment)) % alignment;
  return raw.subarray(skip, skip + length);
}

/** Whether a transfer of `length` bytes at `offset` may go through O_DIRECT. */
export function directAligned(offset: number, length: number): boolean {
  return length > 0 && offset % DIRECT_ALIGNMENT === 0 && length % DIRECT_ALIGNMENT === 0;
}

/** Reused aligned buffers, by length: requests of a client mostly have one or two sizes. */
class BouncePool {
  #free = new Map<number, Uint8Array[]>();
  #bytes = 0;

  take(length: number): Uint8Array {
    const list = this.#free.get(length);
    const buf = list?.pop();
    if (buf) {
      this.#bytes -= length;
      return buf;
    }
    return alignedBuffer(length);
  }

  give(buf: Uint8Array): void {
    if (this.#bytes + buf.length > POOL_BYTES) return;
    this.#bytes += buf.length;
    const list = this.#free.get(buf.length);
    if (list) list.push(buf);
    else this.#free.set(buf.length, [buf]);
  }
}

const pool = new BouncePool();

/**
 * pread through an O_DIRECT descriptor (`directAligned` ranges only), on a
 * runtime thread: the count, or -1 on failure.
 */
export async function readDirect(fd: number, buf: Uint8Array, offset: number): Promise<number> {
  if (addressOf(buf) % DIRECT_ALIGNMENT === 0) return (await preadOnThread(fd, buf, offset)) ?? -1;
  const bounce = pool.take(buf.length);
  try {
    const n = (await preadOnThread(fd, bounce, offset)) ?? -1;
    if (n > 0) buf.set(bounce.subarray(0, n));
    return n;
  } finally {
    pool.give(bounce);
  }
}

/** pwrite through an O_DIRECT descriptor, like `readDirect`: the count, or -1 on failure. */
export async function writeDirect(fd: number, buf: Uint8Array, offset: number): Promise<number> {
  if (addressOf(buf) % DIRECT_ALIGNMENT === 0) return (await pwriteOnThread(fd, buf, offset)) ?? -1;
  const bounce = pool.take(buf.length);
  try {
    bounce.set(buf);
    return (await pwriteOnThread(fd, bounce, offset)) ?? -1;
  } finally {
    pool.give(bounce);
  }
}

/**
 * Evicts ranges of one descriptor from the page cache after buffered I/O:
 * read ranges at once, written ranges once their writeback is done.
 */
export class PageCacheEviction {
  readonly #fd: number;
  /** Written ranges whose writeback was started and that are not yet evicted, oldest first. */
  #written: Array<[number, number]> = [];

  /** Evicts ranges of `fd`. */
  constructor(fd: number) {
    this.#fd = fd;
  }

  /** Drops a range just read. */
  async afterRead(offset: number, length: number): Promise<void> {
    await dropPages(this.#fd, offset, length);
  }

  /** Starts the writeback of a range just written; evicts the oldest ranges past the window. */
  async afterWrite(offset: number, length: number): Promise<void> {
    await syncFileRange(this.#fd, offset, length, SYNC_FILE_RANGE_WRITE);
    this.#written.push([offset, length]);
    while (this.#written.length > EVICTION_WINDOW) await this.#evictOldest();
  }

  /** Waits for the writeback of every written range and evicts them all. */
  async drain(): Promise<void> {
    while (this.#written.length > 0) await this.#evictOldest();
  }

  async #evictOldest(): Promise<void> {
    const [offset, length] = this.#written.shift()!;
    await syncFileRange(
      this.#fd,
      offset,
      length,
      SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER,
    );
    await dropPages(this.#fd, offset, length);
  }
}

/** Drops the cached pages a range touches: posix_fadvise(DONTNEED) itself keeps partial pages. */
function dropPages(fd: number, offset: number, length: number): Promise<boolean> {
  const start = offset - offset % DIRECT_ALIGNMENT;
  const end = Math.ceil((offset + length) / DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT;
  return dropCache(fd, start, end - start);
}
