/**
 * The write thread of a file destination (write_thread.ts): takes requests
 * from the ring in order, writes each from the shared arena with a
 * positional write (io/file_io.ts),
 * makes the write-behind calls in line, and reports each request done,
 * with its errno when it failed.
 *
 * @module
 */

/// <reference no-default-lib="true" />
/// <reference lib="deno.worker" />

import {
  dropCacheHere,
  SYNC_FILE_RANGE_WAIT_AFTER,
  SYNC_FILE_RANGE_WAIT_BEFORE,
  SYNC_FILE_RANGE_WRITE,
  syncFileRangeHere,
} from "../io/libc.ts";
import { errnoOfError, fileIo } from "../io/file_io.ts";
import { platform } from "../io/platform.ts";
import { Control, REQUEST_FIELDS, RING_SLOTS, type WriteThreadSetup } from "./write_thread.ts";
import { WritebackWindows } from "./writeback.ts";

const EIO = 5;

/** Writes all of `data` at `position`: 0, or the errno of the call that failed. */
function writeAll(fd: number, data: Uint8Array, position: number): number {
  let done = 0;
  while (done < data.length) {
    let n: number;
    try {
      n = fileIo.writeAt(fd, data.subarray(done), position + done);
    } catch (error) {
      return errnoOfError(error) || EIO;
    }
    // Nothing written and no error: give up rather than spin.
    if (n === 0) return EIO;
    done += n;
  }
  return 0;
}

function run(setup: WriteThreadSetup): void {
  // node:fs descriptors are the opening thread's own: on the portable paths this one opens the file.
  const own = fileIo.path === "portable" && setup.path !== undefined;
  let fd = setup.fd;
  /** Why the file could not be opened here: every request fails with it. */
  let openErrno = 0;
  if (own) {
    try {
      fd = fileIo.open(setup.path!, "readWrite");
    } catch (error) {
      openErrno = errnoOfError(error) || EIO;
    }
  }
  const control = new Int32Array(setup.control);
  const requests = new Int32Array(setup.requests);
  const positions = new Float64Array(setup.positions);
  const arena = new Uint8Array(setup.arena);
  const windows = new WritebackWindows(setup.step, setup.budget);
  // Write-behind is a Linux fast path; the portable paths leave writeback to the system.
  let writeback = platform().linuxFast;
  let done = 0;
  Atomics.store(control, Control.READY, 1);
  for (;;) {
    // Read before looking for work, so that a post or stop in between ends the wait at once.
    const signal = Atomics.load(control, Control.SIGNAL);
    if (Atomics.load(control, Control.HEAD) === done) {
      if (Atomics.load(control, Control.STOP) === 1) break;
      Atomics.wait(control, Control.SIGNAL, signal);
      continue;
    }
    const slot = done % RING_SLOTS;
    const base = slot * REQUEST_FIELDS;
    const start = requests[base]!;
    const length = requests[base + 1]!;
    const position = positions[slot]!;
    const errno = openErrno || writeAll(fd, arena.subarray(start, start + length), position);
    requests[base + 2] = errno;
    if (errno === 0 && writeback) writeback = writeBehind(fd, windows, position, length);
    done++;
    Atomics.store(control, Control.DONE, done);
    Atomics.notify(control, Control.DONE);
  }
  if (own && !openErrno) fileIo.close(fd);
  self.postMessage({ type: "stopped" });
  self.close();
}

/**
 * Starts the writeback of a window once it is full and retires the oldest
 * beyond the budget; false once the calls are unsupported here (the
 * kernel's own writeback then does).
 */
function writeBehind(
  fd: number,
  windows: WritebackWindows,
  position: number,
  length: number,
): boolean {
  const full = windows.add(position, length);
  if (!full) return true;
  if (!syncFileRangeHere(fd, full.start, full.end - full.start, SYNC_FILE_RANGE_WRITE)) {
    return false;
  }
  for (let window = windows.due(); window; window = windows.due()) {
    const span = window.end - window.start;
    const flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
    if (!syncFileRangeHere(fd, window.start, span, flags)) return false;
    dropCacheHere(fd, window.start, span);
    windows.retired();
  }
  return true;
}

self.onmessage = (event: MessageEvent<WriteThreadSetup>) => run(event.data);
