/**
 * Parsers for the values people type: sizes with binary suffixes,
 * durations, booleans; and sizes formatted back the same way.
 *
 * @module
 */

import { UsageError } from "./usage_error.ts";

const SIZE_SUFFIXES: Record<string, number> = {
  "": 1,
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

/**
 * Parses a size such as `1024`, `512K`, `64M`, `1G`, `2T` (binary
 * multiples, optional `B`/`iB`). Throws `UsageError` naming `what`.
 *
 * @example
 * ```ts
 * parseSize("64M"); // 67108864
 * ```
 */
export function parseSize(text: string, what = "size"): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeE]?)(?:i?[bB])?\s*$/.exec(text);
  if (!match) {
    throw new UsageError(`${what}: cannot parse "${text}" as a size (e.g. 1024, 512K, 64M, 1G)`);
  }
  const value = Number(match[1]) * SIZE_SUFFIXES[match[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(value)) {
    throw new UsageError(`${what}: "${text}" is not a whole number of bytes below 2^53`);
  }
  return value;
}

/** Parses a boolean parameter (true/false, on/off, yes/no, 1/0). */
export function parseBoolean(text: string, what: string): boolean {
  const v = text.toLowerCase();
  if (["1", "true", "yes", "on"].includes(v)) return true;
  if (["0", "false", "no", "off"].includes(v)) return false;
  throw new UsageError(`${what}: expected true or false, got "${text}"`);
}

/**
 * Parses a duration as nbdkit does: a bare number is seconds, `NNms` is
 * milliseconds (`NNs` and fractions are accepted too). Returns milliseconds.
 *
 * @example
 * ```ts
 * parseDuration("100ms", "rdelay"); // 100
 * parseDuration("2", "retry-delay"); // 2000
 * ```
 */
export function parseDuration(text: string, what: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$/.exec(text);
  if (!match) {
    throw new UsageError(`${what}: cannot parse "${text}" as a duration (e.g. 2, 0.5s, 100ms)`);
  }
  const value = Number(match[1]) * (match[2] === "ms" ? 1 : 1000);
  if (!Number.isFinite(value) || value > 2 ** 31) {
    throw new UsageError(`${what}: duration "${text}" is too long`);
  }
  return value;
}

/** Formats a byte count the way people read it: 1048576 → "1M". */
export function formatSize(bytes: number): string {
  for (
    const [suffix, unit] of [["E", 2 ** 60], ["P", 2 ** 50], ["T", 2 ** 40], ["G", 2 ** 30], [
      "M",
      2 ** 20,
    ], [
      "K",
      2 ** 10,
    ]] as const
  ) {
    if (bytes >= unit && bytes % unit === 0) return `${bytes / unit}${suffix}`;
  }
  return `${bytes}`;
}
