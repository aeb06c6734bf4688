/**
 * Waiting a while.
 *
 * @module
 */

/** Resolves after `ms` milliseconds (immediately for 0). */
export function sleep(ms: number): Promise<void> {
  if (ms <= 0) return Promise.resolve();
  return new Promise((resolve) => setTimeout(resolve, ms));
}
