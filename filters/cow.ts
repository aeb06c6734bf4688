/**
 * The `cow` filter: copy-on-write. Writes and zeroes go to an overlay in
 * a temporary file (deleted at once, so it vanishes with the process); the
 * layer below is only ever read. The overlay is shared by all connections,
 * so every client sees the same disk and multi-conn stays coherent.
 * Unchanged blocks are read from below. Trims are accepted and ignored
 * (trimmed bytes are unspecified until written again).
 *
 * ```
 * nbd serve --filter=cow pattern 1G
 * nbd serve --filter=cow --filter=xz split disk.img.xz cow-on-read=true
 * ```
 *
 * Parameters:
 * - `cow-block-size=SIZE`: overlay granularity (power of two, ≥ 4K;
 *   default 64K).
 * - `cow-on-read=BOOL|/PATH`: also copy blocks that are read into the
 *   overlay (when PATH: only while PATH exists). Default false.
 * - `cow-on-cache=BOOL`: copy blocks named by CACHE requests into the
 *   overlay. Default false.
 *
 * The overlay file lives in `$TMPDIR` (default /tmp).
 *
 * @module
 */

import { open as openFile } from "node:fs/promises";
import type { FileHandle } from "node:fs/promises";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";
import {
  type Backend,
  type Capabilities,
  type Extent,
  type ExtentsFlags,
  type Filter,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";
import { parseBoolean } from "../util/parse.ts";
import { UsageError } from "../util/usage_error.ts";
import { KeyedLocks } from "../util/locks.ts";

/** State of an overlay block: its data is in the file, or it reads as zeroes. */
const DATA = 1;
const ZERO = 2;

/** A switch that is fixed, or on while a file exists. */
export type Toggle = boolean | string;

/** Parses `true`/`false` or an absolute path. */
export function parseToggle(text: string, what: string): Toggle {
  if (text.startsWith("/")) return text;
  return parseBoolean(text, what);
}

/** Whether a toggle is on now. */
export function toggleOn(toggle: Toggle): boolean {
  if (typeof toggle === "boolean") return toggle;
  try {
    Deno.statSync(toggle);
    return true;
  } catch {
    return false;
  }
}

/** Reads exactly `buf.length` bytes at `position` from a file handle. */
async function readFull(file: FileHandle, buf: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await file.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) {
      buf.fill(0, done); // never-written tail of a sparse file
      return;
    }
    done += bytesRead;
  }
}

/** Writes all of `buf` at `position`. */
async function writeFull(file: FileHandle, buf: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await file.write(buf, done, buf.length - done, position + done);
    done += bytesWritten;
  }
}

/** The overlay shared by every connection. */
export class Overlay {
  /** Block size. */
  readonly blockSize: number;
  /** Virtual size (that of the layer below). */
  readonly size: number;
  /** Changed blocks: DATA (in the file) or ZERO. */
  readonly states = new Map<number, number>();
  readonly #file: FileHandle;
  readonly #locks = new KeyedLocks();
  /**
   * Where each block that ever held data lives in the file: slots are handed
   * out in order, so the file stays as small as the data (and far below file
   * size limits, whatever the virtual size).
   */
  readonly #slots = new Map<number, number>();

  private constructor(file: FileHandle, size: number, blockSize: number) {
    this.#file = file;
    this.size = size;
    this.blockSize = blockSize;
  }

  /** Creates an empty overlay backed by a deleted temporary file. */
  static async create(size: number, blockSize: number): Promise<Overlay> {
    const path = await Deno.makeTempFile({ prefix: "nbd-cow-" });
    const file = await openFile(path, "r+");
    await Deno.remove(path);
    return new Overlay(file, size, blockSize);
  }

  /** File position of block `index`, allocating its slot on first use. */
  #position(index: number): number {
    let slot = this.#slots.get(index);
    if (slot === undefined) {
      slot = this.#slots.size;
      this.#slots.set(index, slot);
    }
    return slot * this.blockSize;
  }

  /** Length of block `index` (the last one may be short). */
  blockLength(index: number): number {
    return Math.min(this.blockSize, this.size - index * this.blockSize);
  }

  /** Reads `buf` at `offset`: changed blocks from the overlay, the rest from `below`. */
  async read(below: Backend, buf: Uint8Array, offset: number, copyUp: boolean): Promise<void> {
    const bs = this.blockSize;
    const end = offset + buf.length;
    let pos = offset;
    while (pos < end) {
      const index = Math.floor(pos / bs);
      const state = this.states.get(index);
      // Extend the run while the next blocks have the same state (overlay blocks are
      // read one at a time: they sit wherever their slot in the file is).
      let runEnd = Math.min((index + 1) * bs, end);
      while (runEnd < end && state !== DATA && this.states.get(runEnd / bs) === state) {
        runEnd = Math.min(runEnd + bs, end);
      }
      const piece = buf.subarray(pos - offset, runEnd - offset);
      if (state === DATA) {
        await readFull(this.#file, piece, this.#position(index) + pos - index * bs);
      } else if (state === ZERO) piece.fill(0);
      else if (copyUp) {
        for (let b = index; b * bs < runEnd; b++) await this.#copyUp(below, b);
        continue; // re-read the run from the overlay
      } else await below.pread(piece, pos);
      pos = runEnd;
    }
  }

  /** Copies block `index` from below into the overlay unless it is there already. */
  #copyUp(below: Backend, index: number): Promise<void> {
    return this.#locks.run(index, async () => {
      if (this.states.has(index)) return;
      const block = new Uint8Array(this.blockLength(index));
      await below.pread(block, index * this.blockSize);
      await writeFull(this.#file, block, this.#position(index));
      this.states.set(index, DATA);
    });
  }

  /**
   * Changes [offset, offset+length): `data` gives the bytes (undefined =
   * zeroes). Each block is updated under its own lock, reading the rest of
   * a partly changed block from below first.
   */
  async change(
    below: Backend,
    data: Uint8Array | undefined,
    offset: number,
    length: number,
  ): Promise<void> {
    const bs = this.blockSize;
    const end = offset + length;
    const first = Math.floor(offset / bs);
    const last = Math.floor((end - 1) / bs);
    if (data) {
      for (let index = first; index <= last; index++) {
        await this.#changeBlock(below, data, offset, length, index);
      }
      return;
    }
    // Zeroing: a whole block that is not in the overlay and already reads as zero
    // below needs nothing, so only the other blocks are visited. This keeps zeroing
    // a huge, mostly empty disk cheap.
    const indexes = new Set<number>([first, last]);
    const runs = await this.#zeroRuns(below, offset, length);
    let pos = offset;
    for (const [from, to] of [...runs, [end, end] as [number, number]]) {
      // Bytes [pos, from) are not known to be zero below: every block there.
      for (let index = Math.floor(pos / bs); index * bs < from; index++) indexes.add(index);
      if (from < to) {
        indexes.add(Math.floor(from / bs));
        indexes.add(Math.floor((to - 1) / bs));
      }
      pos = Math.max(pos, to);
    }
    for (const index of this.states.keys()) {
      if (index >= first && index <= last) indexes.add(index);
    }
    for (const index of [...indexes].sort((x, y) => x - y)) {
      await this.#changeBlock(below, undefined, offset, length, index);
    }
  }

  /** Applies a change of [offset, offset+length) to block `index`, under its lock. */
  #changeBlock(
    below: Backend,
    data: Uint8Array | undefined,
    offset: number,
    length: number,
    index: number,
  ): Promise<void> {
    const bs = this.blockSize;
    const start = index * bs;
    const blockLength = this.blockLength(index);
    const from = Math.max(offset, start);
    const to = Math.min(offset + length, start + blockLength);
    const n = to - from;
    const within = from - start;
    const piece = data?.subarray(from - offset, to - offset);
    return this.#locks.run(index, async () => {
      const state = this.states.get(index);
      if (n === blockLength) {
        if (piece) {
          await writeFull(this.#file, piece, this.#position(index));
          this.states.set(index, DATA);
        } else {
          this.states.set(index, ZERO);
        }
        return;
      }
      if (state === DATA) {
        await writeFull(this.#file, piece ?? new Uint8Array(n), this.#position(index) + within);
        return;
      }
      // A partial change of a block not yet in the overlay: build the whole block.
      const block = new Uint8Array(blockLength);
      if (state !== ZERO) await below.pread(block, start);
      if (piece) block.set(piece, within);
      else block.fill(0, within, within + n);
      await writeFull(this.#file, block, this.#position(index));
      this.states.set(index, DATA);
    });
  }

  /** Ranges [from, to) that read as zero below, when the layer below can tell. */
  async #zeroRuns(below: Backend, offset: number, length: number): Promise<[number, number][]> {
    if (!below.capabilities().extents) return [];
    const runs: [number, number][] = [];
    let pos = offset;
    try {
      for (const e of await below.extents(offset, length, { reqOne: false })) {
        if (e.flags & NBD_STATE_ZERO) runs.push([pos, pos + e.length]);
        pos += e.length;
      }
    } catch {
      return []; // no answer: record every block
    }
    return runs;
  }

  /** Block status: changed blocks from the overlay, the rest from below. */
  async extents(below: Backend, offset: number, length: number, flags: ExtentsFlags) {
    const bs = this.blockSize;
    const end = offset + length;
    const out: Extent[] = [];
    const push = (n: number, f: number) => {
      const last = out[out.length - 1];
      if (last && last.flags === f) last.length += n;
      else out.push({ length: n, flags: f });
    };
    let pos = offset;
    while (pos < end) {
      const index = Math.floor(pos / bs);
      const state = this.states.get(index);
      const blockEnd = Math.min((index + 1) * bs, end);
      if (state !== undefined) {
        push(blockEnd - pos, state === ZERO ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0);
        pos = blockEnd;
      } else {
        // Ask below for the whole run of unchanged blocks.
        let runEnd = blockEnd;
        while (runEnd < end && !this.states.has(runEnd / bs)) runEnd = Math.min(runEnd + bs, end);
        const caps = below.capabilities();
        const extents = caps.extents
          ? await below.extents(pos, runEnd - pos, flags)
          : [{ length: runEnd - pos, flags: 0 }];
        let covered = 0;
        for (const e of extents) {
          const n = Math.min(e.length, runEnd - pos - covered);
          if (n <= 0) break;
          push(n, e.flags);
          covered += n;
        }
        if (covered === 0) throw new NbdError("EIO", "the layer below returned no extents");
        pos += covered;
      }
      if (flags.reqOne && out.length > 0) break;
    }
    return out;
  }

  /** Copies the blocks of a range into the overlay (for cow-on-cache). */
  async copyRange(below: Backend, offset: number, length: number): Promise<void> {
    const bs = this.blockSize;
    for (let index = Math.floor(offset / bs); index * bs < offset + length; index++) {
      if (!this.states.has(index)) await this.#copyUp(below, index);
    }
  }

  /** Closes the file (its storage is freed). */
  async close(): Promise<void> {
    await this.#file.close();
  }
}

/** Options of the cow filter. */
interface CowOptions {
  onRead: Toggle;
  onCache: boolean;
}

class CowBackend extends PassthroughBackend {
  readonly #overlay: Overlay;
  readonly #options: CowOptions;

  constructor(next: Backend, overlay: Overlay, options: CowOptions) {
    super(next);
    this.#overlay = overlay;
    this.#options = options;
  }
  override capabilities(): Capabilities {
    const caps = this.next.capabilities();
    return {
      ...caps,
      writable: true,
      flush: true,
      trim: true,
      zero: true,
      fastZero: true,
      fua: "native",
      extents: true,
      cache: "native",
      multiConn: true,
    };
  }
  override pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.#overlay.read(this.next, buf, offset, toggleOn(this.#options.onRead));
  }
  override pwrite(buf: Uint8Array, offset: number, _flags: WriteFlags): Promise<void> {
    return this.#overlay.change(this.next, buf, offset, buf.length);
  }
  override flush(): Promise<void> {
    // The overlay is temporary: there is nothing to make durable.
    return Promise.resolve();
  }
  override trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    // Trimmed bytes are unspecified until written again, so the overlay need not change:
    // a discard of the whole disk (mkfs does one) costs nothing.
    return Promise.resolve();
  }
  override zero(offset: number, length: number, _flags: ZeroFlags): Promise<void> {
    return this.#overlay.change(this.next, undefined, offset, length);
  }
  override extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    return this.#overlay.extents(this.next, offset, length, flags);
  }
  override async cache(offset: number, length: number): Promise<void> {
    if (this.#options.onCache) await this.#overlay.copyRange(this.next, offset, length);
    else if (this.next.capabilities().cache !== "none") await this.next.cache(offset, length);
  }
}

/** The cow filter. */
export const cowFilter: Filter = {
  name: "cow",
  summary: "copy-on-write: writes go to a temporary overlay, the layer below is never written",
  description: "All connections share one overlay; it is discarded when the server exits.\n\n" +
    "Examples:\n  nbd serve --filter=cow pattern 1G\n" +
    "  nbd serve --filter=cow --filter=xz split disk.img.xz cow-on-read=true",
  params: [
    {
      name: "cow-block-size",
      value: "SIZE",
      type: "size",
      default: "64K",
      description: "overlay block size (power of two from 4K to 1G)",
    },
    {
      name: "cow-on-read",
      value: "BOOL|/PATH",
      type: "string",
      default: "false",
      description: "copy blocks that are read into the overlay (with /PATH: while PATH exists)",
    },
    {
      name: "cow-on-cache",
      value: "BOOL",
      type: "boolean",
      default: "false",
      description: "copy blocks named by CACHE requests into the overlay",
    },
  ],
  create(params) {
    const blockSize = params.takeSize("cow-block-size") ?? 65536;
    if (blockSize < 4096 || (blockSize & (blockSize - 1)) !== 0 || blockSize > 2 ** 30) {
      throw new UsageError("cow-block-size: must be a power of two from 4K to 1G");
    }
    const onReadText = params.take("cow-on-read");
    const options: CowOptions = {
      onRead: onReadText === undefined ? false : parseToggle(onReadText, "cow-on-read"),
      onCache: params.takeBoolean("cow-on-cache") ?? false,
    };
    let overlay: Promise<Overlay> | undefined;
    return Promise.resolve({
      async wrap(next) {
        overlay ??= Overlay.create(next.size(), blockSize);
        const shared = await overlay;
        if (next.size() !== shared.size) {
          throw new NbdError("EIO", "the layer below changed size; the overlay cannot follow");
        }
        return new CowBackend(next, shared, options);
      },
      async close() {
        if (overlay) await (await overlay).close();
      },
    });
  },
};
