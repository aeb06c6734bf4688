/**
 * The checksum algorithms by name, apart from their implementation
 * (checksum.ts), so that parsing a command line does not load the hash code.
 *
 * @module
 */

import { UsageError } from "../util/usage_error.ts";

/** The algorithms `--algorithm` and `--checksum=` accept. */
export const CHECKSUM_ALGORITHMS = ["sha256", "blkhash"] as const;

/** A checksum algorithm. */
export type ChecksumAlgorithm = typeof CHECKSUM_ALGORITHMS[number];

/** Parses an algorithm name; anything else is a usage error. */
export function parseAlgorithm(text: string, option = "--algorithm"): ChecksumAlgorithm {
  const name = text.toLowerCase();
  if ((CHECKSUM_ALGORITHMS as readonly string[]).includes(name)) return name as ChecksumAlgorithm;
  throw new UsageError(
    `${option}: unknown algorithm "${text}" (known: ${CHECKSUM_ALGORITHMS.join(", ")})`,
  );
}
