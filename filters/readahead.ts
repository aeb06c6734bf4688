/**
 * The `readahead` filter: turns a client's sequential reads into fewer,
 * larger reads of the layer below, fetched ahead of the client. Useful over
 * a plugin where each request costs a round trip (http, s3, nbd).
 *
 * ```
 * nbd serve --filter=readahead http https://example.com/disk.img
 * ```
 *
 * Each connection keeps a few windows of data read ahead. A read that
 * continues where the previous one ended (or lands in a window) counts as
 * sequential: the window doubles, up to `readahead-max`, and once the client
 * is half way through the last window the next one is fetched in the
 * background. Any other read starts over with a small window. Writes, zeroes
 * and trims drop the windows they overlap.
 *
 * @module
 */

import {
  type Backend,
  type Capabilities,
  type Filter,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";

/** The first window, and the window after a read that is not sequential. */
const MIN_WINDOW = 64 * 1024;
/** Windows kept per connection: the one being read, the one ahead, and one behind for stragglers. */
const KEPT_WINDOWS = 3;

/** Bytes of the layer below, read (or being read) ahead. */
interface Window {
  start: number;
  end: number;
  /** The bytes; rejects when the read below failed. */
  data: Promise<Uint8Array>;
}

class ReadaheadBackend extends PassthroughBackend {
  readonly #max: number;
  #windows: Window[] = [];
  #size = MIN_WINDOW;
  /** Where the previous read ended: a read starting there is sequential. */
  #expected = 0;

  constructor(next: Backend, max: number) {
    super(next);
    this.#max = max;
  }

  override capabilities(): Capabilities {
    const caps = this.next.capabilities();
    // Windows are per connection: another connection's writes would not drop them.
    return caps.writable ? { ...caps, multiConn: false } : caps;
  }

  #find(offset: number): Window | undefined {
    return this.#windows.find((w) => w.start <= offset && offset < w.end);
  }

  /** Starts reading `[start, start + length)` from below and keeps it as a window. */
  #fetch(start: number, length: number): Window {
    const buf = new Uint8Array(length);
    const window: Window = {
      start,
      end: start + length,
      data: this.next.pread(buf, start).then(() => buf),
    };
    // A window read ahead may never be used: its failure surfaces only if a read needs it.
    window.data.catch(() => {});
    this.#windows.push(window);
    if (this.#windows.length > KEPT_WINDOWS) this.#windows.shift();
    return window;
  }

  /** Starts the window after the last one once the client is half way through it. */
  #readAhead(position: number): void {
    const last = this.#windows[this.#windows.length - 1];
    const total = this.next.size();
    if (!last || last.end >= total || position < (last.start + last.end) / 2) return;
    this.#size = Math.min(this.#size * 2, this.#max);
    this.#fetch(last.end, Math.min(this.#size, total - last.end));
  }

  override async pread(buf: Uint8Array, offset: number): Promise<void> {
    const end = offset + buf.length;
    const sequential = offset === this.#expected || this.#find(offset) !== undefined;
    this.#expected = end;
    if (!sequential) {
      this.#windows = [];
      this.#size = MIN_WINDOW;
    }
    const total = this.next.size();
    const pieces: Array<{ window: Window; at: number; length: number }> = [];
    for (let at = offset; at < end;) {
      let window = this.#find(at);
      if (!window) {
        if (sequential) this.#size = Math.min(Math.max(this.#size * 2, buf.length), this.#max);
        window = this.#fetch(at, Math.min(total - at, Math.max(this.#size, end - at)));
      }
      const length = Math.min(end, window.end) - at;
      pieces.push({ window, at, length });
      at += length;
    }
    if (sequential) this.#readAhead(end);
    await Promise.all(pieces.map(async ({ window, at, length }) => {
      const into = buf.subarray(at - offset, at - offset + length);
      let data: Uint8Array;
      try {
        data = await window.data;
      } catch {
        // A window can fail where this read alone would not (it reaches further): read this
        // piece on its own, and report its own error if it has one.
        this.#drop(window.start, window.end);
        return await this.next.pread(into, at);
      }
      into.set(data.subarray(at - window.start, at - window.start + length));
    }));
  }

  /** Forgets the windows that overlap `[start, end)`. */
  #drop(start: number, end: number): void {
    this.#windows = this.#windows.filter((w) => w.end <= start || w.start >= end);
  }

  /** Runs a change of `[offset, offset + length)`, dropping the windows it makes stale. */
  async #changing(offset: number, length: number, change: () => Promise<void>): Promise<void> {
    // Before, so that no later read uses them; after, for a window fetched meanwhile.
    this.#drop(offset, offset + length);
    try {
      await change();
    } finally {
      this.#drop(offset, offset + length);
    }
  }

  override pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.#changing(offset, buf.length, () => this.next.pwrite(buf, offset, flags));
  }
  override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.#changing(offset, length, () => this.next.zero(offset, length, flags));
  }
  override trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.#changing(offset, length, () => this.next.trim(offset, length, flags));
  }
}

/** The readahead filter. */
export const readaheadFilter: Filter = {
  name: "readahead",
  summary: "read ahead of sequential reads, in growing windows",
  description: "Examples:\n  nbd serve --filter=readahead http https://example.com/disk.img\n" +
    "  nbd serve --filter=readahead nbd hostname=remote readahead-max=16M",
  params: [
    {
      name: "readahead-max",
      value: "SIZE",
      type: "size",
      default: "8M",
      description: "largest window read ahead (64K to 256M)",
    },
  ],
  create(params) {
    const max = params.takeSize("readahead-max") ?? 8 * 1024 * 1024;
    if (max < MIN_WINDOW || max > 256 * 1024 * 1024) {
      throw new UsageError(`readahead-max must be from 64K to 256M, got ${max}`);
    }
    return Promise.resolve({
      wrap: (next) => Promise.resolve(new ReadaheadBackend(next, max)),
    });
  },
};
