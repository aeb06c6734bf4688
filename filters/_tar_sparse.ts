/**
 * Sparse tar members: the map of where a member's stored pieces go, and a
 * read-only backend that serves the member at its full size, holes reading
 * as zeroes.
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import type { Extent } from "../protocol/transmission.ts";
import type { Backend, ExtentsFlags } from "../core/backend.ts";
import { ReadonlyBackend } from "./readonly.ts";

/** One stored piece of a sparse member. */
export interface SparseSegment {
  /** Where the piece lies in the member. */
  offset: number;
  /** Its length. */
  length: number;
  /** Where it is stored, from the start of the member's stored data. */
  stored: number;
}

/**
 * Checks a sparse map (offset, length pairs in member order) against the
 * member's full size and the bytes stored, and places each piece: pieces
 * are stored one after the other. Empty pieces are dropped.
 */
export function parseSparseMap(
  map: Array<{ offset: number; length: number }>,
  realSize: number,
  storedSize: number,
  at: number,
): SparseSegment[] {
  const bad = (why: string) =>
    new NbdError("EINVAL", `tar: not a valid tar header at offset ${at}: ${why}`);
  const segments: SparseSegment[] = [];
  let end = 0;
  let stored = 0;
  for (const { offset, length } of map) {
    if (offset < end) throw bad("the sparse map is out of order");
    if (offset + length > realSize) throw bad("the sparse map goes past the member's size");
    if (length === 0) continue;
    segments.push({ offset, length, stored });
    stored += length;
    end = offset + length;
  }
  if (stored > storedSize) throw bad("the sparse map holds more than the member stores");
  return segments;
}

/**
 * A sparse member, read-only: its pieces from the archive at `start`, zeroes
 * between them, and the gaps reported as holes.
 */
export class SparseMemberBackend extends ReadonlyBackend {
  readonly #start: number;
  readonly #size: number;
  readonly #segments: SparseSegment[];

  /** Serves `segments` stored from `start` of `next` as a member of `realSize` bytes. */
  constructor(
    next: Backend,
    start: number,
    realSize: number,
    segments: SparseSegment[],
  ) {
    super(next);
    this.#start = start;
    this.#size = realSize;
    this.#segments = segments;
    this.readView = undefined;
  }

  /** The member's full size. */
  override size(): number {
    return this.#size;
  }

  /** Block status is known from the map. */
  override capabilities() {
    return { ...super.capabilities(), extents: true, cache: "none" as const };
  }

  /** Index of the first segment ending after `offset`. */
  #first(offset: number): number {
    let lo = 0;
    let hi = this.#segments.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const s = this.#segments[mid]!;
      if (s.offset + s.length <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Stored pieces from the archive, zeroes elsewhere. */
  override async pread(buf: Uint8Array, offset: number): Promise<void> {
    const end = offset + buf.length;
    const reads: Promise<void>[] = [];
    let filled = offset;
    for (let i = this.#first(offset); i < this.#segments.length; i++) {
      const s = this.#segments[i]!;
      if (s.offset >= end) break;
      const from = Math.max(offset, s.offset);
      const to = Math.min(end, s.offset + s.length);
      buf.fill(0, filled - offset, from - offset);
      reads.push(
        this.next.pread(
          buf.subarray(from - offset, to - offset),
          this.#start + s.stored + from - s.offset,
        ),
      );
      filled = to;
    }
    buf.fill(0, filled - offset);
    await Promise.all(reads);
  }

  /** Data where the map has pieces, holes elsewhere. */
  override extents(offset: number, length: number, _flags: ExtentsFlags): Promise<Extent[]> {
    const end = Math.min(offset + length, this.#size);
    const out: Extent[] = [];
    const push = (to: number, flags: number) => {
      if (to <= offset) return;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += to - offset;
      else out.push({ length: to - offset, flags });
      offset = to;
    };
    for (let i = this.#first(offset); i < this.#segments.length && offset < end; i++) {
      const s = this.#segments[i]!;
      push(Math.min(s.offset, end), NBD_STATE_HOLE | NBD_STATE_ZERO);
      push(Math.min(s.offset + s.length, end), 0);
    }
    push(end, NBD_STATE_HOLE | NBD_STATE_ZERO);
    return Promise.resolve(out);
  }

  /** Nothing to prefetch below that a read would not fetch. */
  override cache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }
}
