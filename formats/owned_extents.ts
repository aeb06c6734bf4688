/**
 * What a filesystem analysis produces: byte ranges of a disk, each named
 * by the file, directory or metadata structure that owns it.
 *
 * @module
 */

/** What owns a range: a file's data, a directory's entries, or filesystem metadata. */
export type OwnerKind = "file" | "directory" | "metadata";

/** A range of the disk and its owner. */
export interface OwnedExtent {
  /** Offset on the disk in bytes. */
  offset: number;
  /** Length in bytes. */
  length: number;
  /** A path (`/dir/file`, `/dir/` for a directory) or a structure (`<inode table, group 0>`). */
  owner: string;
  /** What kind of owner. */
  kind: OwnerKind;
}

/** Collects owned ranges relative to a base offset (a partition's), then sorts and merges them. */
export class ExtentCollector {
  readonly #extents: OwnedExtent[] = [];

  /** Records that [offset, offset + length) belongs to `owner`. */
  add(offset: number, length: number, owner: string, kind: OwnerKind): void {
    if (length <= 0) return;
    this.#extents.push({ offset, length, owner, kind });
  }

  /** Number of ranges recorded so far. */
  get count(): number {
    return this.#extents.length;
  }

  /** The ranges by offset, adjacent ranges of the same owner merged into one. */
  result(): OwnedExtent[] {
    const sorted = [...this.#extents].sort((a, b) => a.offset - b.offset || b.length - a.length);
    const out: OwnedExtent[] = [];
    for (const e of sorted) {
      const last = out[out.length - 1];
      if (last && last.owner === e.owner && last.offset + last.length >= e.offset) {
        last.length = Math.max(last.length, e.offset + e.length - last.offset);
      } else {
        out.push({ ...e });
      }
    }
    return out;
  }
}

/** The extent containing byte `offset` of a sorted, merged list, or undefined (binary search). */
export function ownerAt(extents: readonly OwnedExtent[], offset: number): OwnedExtent | undefined {
  let low = 0;
  let high = extents.length - 1;
  while (low <= high) {
    const mid = (low + high) >> 1;
    const e = extents[mid]!;
    if (offset < e.offset) high = mid - 1;
    else if (offset >= e.offset + e.length) low = mid + 1;
    else return e;
  }
  return undefined;
}
