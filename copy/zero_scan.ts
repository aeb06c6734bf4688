/**
 * Finding all-zero blocks in data that was read, so that they can become
 * zero requests (or nothing, on a destination that is already zero)
 * instead of writes.
 *
 * @module
 */

/** A run of blocks in a buffer: `[start, end)` all zero, or not. */
export interface ZeroRun {
  /** First byte of the run. */
  start: number;
  /** One past the last byte. */
  end: number;
  /** Every byte of the run is zero. */
  zero: boolean;
}

/**
 * Whether `bytes[start, end)` is all zero. `words` must view the same
 * memory as `bytes` from the same byte offset, which must be 4-aligned: the
 * bulk of the range is checked 4 bytes at a time and stops at the first
 * non-zero word, so data costs almost nothing to scan.
 */
export function rangeIsZero(
  bytes: Uint8Array,
  words: Int32Array,
  start: number,
  end: number,
): boolean {
  let i = start;
  while (i < end && (i & 3) !== 0) if (bytes[i++] !== 0) return false;
  const wordEnd = end >>> 2;
  for (let w = i >>> 2; w < wordEnd; w++) if (words[w] !== 0) return false;
  for (let j = Math.max(i, wordEnd << 2); j < end; j++) if (bytes[j] !== 0) return false;
  return true;
}

/**
 * Splits `bytes[0, length)` into runs of whole `blockSize` blocks (the last
 * may be short) that are all zero or not, merging neighbours of the same kind.
 *
 * @example
 * ```ts
 * const buf = new Uint8Array(8192);
 * buf[5000] = 1;
 * zeroRuns(buf, new Int32Array(buf.buffer), buf.length, 4096);
 * // [{ start: 0, end: 4096, zero: true }, { start: 4096, end: 8192, zero: false }]
 * ```
 */
export function zeroRuns(
  bytes: Uint8Array,
  words: Int32Array,
  length: number,
  blockSize: number,
): ZeroRun[] {
  const runs: ZeroRun[] = [];
  let current: ZeroRun | undefined;
  for (let start = 0; start < length; start += blockSize) {
    const end = Math.min(start + blockSize, length);
    const zero = rangeIsZero(bytes, words, start, end);
    if (current && current.zero === zero) current.end = end;
    else {
      current = { start, end, zero };
      runs.push(current);
    }
  }
  return runs;
}
