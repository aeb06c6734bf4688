/**
 * Clean-ups to run at once when the process is about to die without the
 * usual orderly close (a second Ctrl-C): stop the servers started for the
 * copy, remove a temporary file that would otherwise be left behind.
 * Each must be synchronous and quick.
 *
 * @module
 */

const cleanups = new Set<() => void>();

/** Registers `fn`; the returned function unregisters it (call it after the orderly clean-up). */
export function registerCleanup(fn: () => void): () => void {
  cleanups.add(fn);
  return () => cleanups.delete(fn);
}

/** Runs every registered clean-up now, ignoring their errors. */
export function runCleanupsNow(): void {
  for (const fn of [...cleanups]) {
    cleanups.delete(fn);
    try {
      fn();
    } catch { /* best effort: the process is going away */ }
  }
}
