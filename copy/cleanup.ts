/**
 * Clean-ups to run at once when the process is about to die without the
 * usual orderly close (a second Ctrl-C): stop the servers started for the
 * copy, remove a temporary file that would otherwise be left behind.
 * Each must be synchronous and quick. The registry is the process's
 * (util/signals.ts), which runs it on a second signal or the hard stop.
 *
 * @module
 */

export { registerCleanup, runCleanupsNow } from "../util/signals.ts";
