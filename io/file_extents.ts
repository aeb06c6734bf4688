/**
 * The allocation of a range of a file, from lseek's SEEK_DATA and
 * SEEK_HOLE: which runs hold data and which read as zeroes. Shared by the
 * file plugin's block status and the copy's file source.
 *
 * @module
 */

import { seekData, seekHole } from "./libc.ts";

/** A run of a file: data, or a hole (or the space past its end) that reads as zeroes. */
export interface FileExtent {
  /** Offset of the run. */
  offset: number;
  /** Length in bytes. */
  length: number;
  /** The run reads as zeroes. */
  zero: boolean;
}

/**
 * The runs covering `length` bytes at `offset` of `fd`, in order and
 * without gaps; undefined when the descriptor does not support SEEK_DATA
 * (or FFI is unavailable), and the caller must take it all as data.
 * What lies past the end of the file reads as zeroes. A file that shrinks
 * under the call reports the rest of the range as data, so that reading it
 * is what finds out.
 */
export function fileExtents(fd: number, offset: number, length: number): FileExtent[] | undefined {
  const end = offset + length;
  const out: FileExtent[] = [];
  let pos = offset;
  while (pos < end) {
    // The next data at or after pos; Infinity when only a hole (or the end of the file) follows.
    const data = seekData(fd, pos);
    if (data === undefined) return undefined;
    if (data > pos) {
      const n = Math.min(data, end) - pos;
      out.push({ offset: pos, length: n, zero: true });
      pos += n;
      continue;
    }
    // The end of the file counts as a hole. Unsupported here, or no hole after data that
    // was just found (the file shrank): the rest is data.
    const hole = seekHole(fd, pos);
    const n = (hole !== undefined && hole > pos ? Math.min(hole, end) : end) - pos;
    out.push({ offset: pos, length: n, zero: false });
    pos += n;
  }
  return out;
}
