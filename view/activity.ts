/**
 * Aggregation of per-request events into block-map frames for the live
 * view: between two frames every block touched is remembered in a bitmap
 * under the kind of the last request that touched it, so a frame reports
 * all of them however many requests there were (a page painting them shows
 * what it would have shown painting each request), and memory stays
 * bounded by the number of cells.
 *
 * @module
 */

import type { IoEvent } from "../server/stats.ts";

/** Kinds of activity painted on the block map, in the order frames list them. */
const ACTIVITY_KINDS = [
  "READ",
  "WRITE",
  "TRIM",
  "WRITE_ZEROES",
  "CACHE",
  "BLOCK_STATUS",
  "ERROR",
] as const;
/** A kind of activity on the block map. */
export type ActivityKind = (typeof ACTIVITY_KINDS)[number];

/** Most cells a block map may have; with 7 kinds this bounds one subscriber to ~1.8 MiB. */
export const MAX_CELLS = 1 << 21;
/** Smallest block size chosen automatically (one cell per 4 KiB, the usual page size). */
const DEFAULT_MIN_BLOCK = 4096;

const KIND_INDEX: Readonly<Record<string, number>> = Object.fromEntries(
  ACTIVITY_KINDS.map((k, i) => [k, i]),
);
const ERROR_INDEX = ACTIVITY_KINDS.indexOf("ERROR");

/**
 * Chooses the block size for a map of at most `maxCells` cells: the smallest
 * power of two, at least `minBlock`, that makes the whole export fit.
 *
 * @example
 * ```ts
 * chooseBlockSize(2 ** 30, 1_000_000); // 4096: 262144 cells fit
 * chooseBlockSize(2 ** 40, 1_000_000); // 2 MiB
 * ```
 */
export function chooseBlockSize(
  size: number,
  maxCells: number,
  minBlock = DEFAULT_MIN_BLOCK,
): number {
  const cells = Math.max(1, Math.min(Math.floor(maxCells), MAX_CELLS));
  let block = Math.max(1, minBlock);
  while (Math.ceil(size / block) > cells) block *= 2;
  return block;
}

/** Runs of touched cells for one kind: flat pairs [start, count, start, count, ...]. */
export type Runs = number[];

/** One frame of the block map: what happened since the previous frame. */
export interface ActivityFrame {
  /** Export the frame is about. */
  export: string;
  /** Export size in bytes. */
  size: number;
  /** Bytes per cell. */
  block: number;
  /** Number of cells. */
  cells: number;
  /**
   * Touched cells per kind of the last request that touched them in this
   * frame: no cell is listed under two kinds, so the order does not matter.
   */
  kinds: Array<[ActivityKind, Runs]>;
  /** Requests per command in this frame, failed ones included (FLUSH touches no cell). */
  requests: Record<string, number>;
}

/**
 * Collects the blocks touched by one export's requests between frames.
 * `add` is called on the data path, so it only sets bits; `take` (once per
 * frame) turns them into runs and clears them.
 */
export class ActivityAggregator {
  /** Export followed. */
  readonly exportName: string;
  readonly #requestedBlock: number | undefined;
  readonly #maxCells: number;
  #size = -1;
  #block = 0;
  #cells = 0;
  #bits: Uint32Array[] = [];
  #low: number[] = [];
  #high: number[] = [];
  #requests = new Map<string, number>();

  /**
   * Follows `exportName`. With `block` the cell size is fixed; otherwise it
   * is chosen so the export fits in `maxCells` cells once its size is known.
   */
  constructor(exportName: string, options: { block?: number; maxCells?: number } = {}) {
    this.exportName = exportName;
    this.#requestedBlock = options.block;
    this.#maxCells = Math.min(options.maxCells ?? MAX_CELLS, MAX_CELLS);
  }

  /** Bytes per cell, or 0 before the size is known. */
  get block(): number {
    return this.#block;
  }

  /** Number of cells, or 0 before the size is known. */
  get cells(): number {
    return this.#cells;
  }

  /** Export size the map is laid out for, or -1. */
  get size(): number {
    return this.#size;
  }

  /**
   * Lays the map out for an export of `size` bytes (again when the size
   * changes, dropping what was pending). Throws RangeError when a fixed
   * block size would need more than MAX_CELLS cells.
   */
  resize(size: number): void {
    if (size === this.#size) return;
    const block = this.#requestedBlock ?? chooseBlockSize(size, this.#maxCells);
    const cells = Math.max(1, Math.ceil(size / block));
    if (cells > MAX_CELLS) {
      throw new RangeError(
        `Cannot lay out the block map: ${cells} cells of ${block} bytes exceed ${MAX_CELLS}`,
      );
    }
    this.#size = size;
    this.#block = block;
    this.#cells = cells;
    const words = Math.ceil(cells / 32);
    this.#bits = ACTIVITY_KINDS.map(() => new Uint32Array(words));
    this.#low = ACTIVITY_KINDS.map(() => Infinity);
    this.#high = ACTIVITY_KINDS.map(() => -1);
    this.#requests.clear();
  }

  /** Records one finished request (the data-path hook: a few bit operations). */
  add(event: IoEvent): void {
    if (event.exportName !== this.exportName || this.#cells === 0) return;
    const count = this.#requests.get(event.command) ?? 0;
    this.#requests.set(event.command, count + 1);
    const kind = event.ok ? KIND_INDEX[event.command] : ERROR_INDEX;
    if (kind === undefined || event.length === 0) return; // FLUSH: counted, no cells
    const first = Math.floor(event.offset / this.#block);
    if (first >= this.#cells) return; // a failed request past the end
    const last = Math.min(
      Math.floor((event.offset + event.length - 1) / this.#block),
      this.#cells - 1,
    );
    // This request is now the last to touch these cells: other kinds let go of them.
    for (let k = 0; k < ACTIVITY_KINDS.length; k++) {
      if (k !== kind && this.#high[k]! >= first && this.#low[k]! <= last) {
        clearBits(this.#bits[k]!, first, last);
      }
    }
    setBits(this.#bits[kind]!, first, last);
    if (first < this.#low[kind]!) this.#low[kind] = first;
    if (last > this.#high[kind]!) this.#high[kind] = last;
  }

  /** Whether anything happened since the last `take`. */
  get pending(): boolean {
    return this.#requests.size > 0;
  }

  /** Returns the frame collected since the last call and starts a new one. */
  take(): ActivityFrame | undefined {
    if (this.#cells === 0) return undefined;
    const kinds: Array<[ActivityKind, Runs]> = [];
    for (let k = 0; k < ACTIVITY_KINDS.length; k++) {
      if (this.#high[k]! < 0) continue;
      const runs = takeRuns(this.#bits[k]!, this.#low[k]!, this.#high[k]!);
      // A kind whose cells were all taken over by later requests has nothing to show.
      if (runs.length) kinds.push([ACTIVITY_KINDS[k]!, runs]);
      this.#low[k] = Infinity;
      this.#high[k] = -1;
    }
    const requests = Object.fromEntries(this.#requests);
    this.#requests.clear();
    return {
      export: this.exportName,
      size: this.#size,
      block: this.#block,
      cells: this.#cells,
      kinds,
      requests,
    };
  }
}

/** Sets bits first..last (inclusive), a word at a time where possible. */
export function setBits(bits: Uint32Array, first: number, last: number): void {
  let word = first >>> 5;
  const lastWord = last >>> 5;
  const headMask = (0xffffffff << (first & 31)) >>> 0;
  const tailMask = 0xffffffff >>> (31 - (last & 31));
  if (word === lastWord) {
    bits[word]! |= headMask & tailMask;
    return;
  }
  bits[word]! |= headMask;
  for (word++; word < lastWord; word++) bits[word] = 0xffffffff;
  bits[lastWord]! |= tailMask;
}

/** Clears bits first..last (inclusive). */
export function clearBits(bits: Uint32Array, first: number, last: number): void {
  let word = first >>> 5;
  const lastWord = last >>> 5;
  const headMask = (0xffffffff << (first & 31)) >>> 0;
  const tailMask = 0xffffffff >>> (31 - (last & 31));
  if (word === lastWord) {
    bits[word]! &= ~(headMask & tailMask);
    return;
  }
  bits[word]! &= ~headMask;
  for (word++; word < lastWord; word++) bits[word] = 0;
  bits[lastWord]! &= ~tailMask;
}

/** Collects the set bits between cells low..high into runs and clears them. */
export function takeRuns(bits: Uint32Array, low: number, high: number): Runs {
  const runs: Runs = [];
  let start = -1;
  const lastWord = high >>> 5;
  for (let word = low >>> 5; word <= lastWord; word++) {
    const value = bits[word]!;
    if (value === 0 || value === 0xffffffff) {
      // Whole words are the common case for large requests: no per-bit work.
      if (value === 0 && start >= 0) {
        runs.push(start, word * 32 - start);
        start = -1;
      } else if (value !== 0 && start < 0) {
        start = word * 32;
      }
    } else {
      for (let bit = 0; bit < 32; bit++) {
        const set = (value >>> bit) & 1;
        const cell = word * 32 + bit;
        if (set && start < 0) start = cell;
        else if (!set && start >= 0) {
          runs.push(start, cell - start);
          start = -1;
        }
      }
    }
    bits[word] = 0;
  }
  if (start >= 0) runs.push(start, (lastWord + 1) * 32 - start);
  return runs;
}
