/**
 * What the file source and destination share: opening a path, finding
 * what it is, enlarging a FIFO's pipe, and reporting a failure as node:fs
 * would ("Cannot open x: no such file or directory").
 *
 * On the Linux fast paths files are opened, read, written and resized with
 * plain synchronous libc calls through FFI, not node:fs: loading the Node
 * compatibility layer alone slows a copy's start-up, and node:fs runs
 * positional I/O on the event loop's thread anyway, with more overhead.
 * Handing each call to a worker thread (FFI "nonblocking") cost the event
 * loop more than the copy it saves (docs/performance.md). On the portable
 * paths the same calls go through node:fs (io/file_io.ts).
 *
 * @module
 */

import { fileIo, type OpenMode } from "../io/file_io.ts";
import { closeFd, O_NONBLOCK, O_RDWR, openFd } from "../io/libc.ts";
import { enlargePipe } from "../io/pipes.ts";
import { platform } from "../io/platform.ts";

/**
 * An error from a file with the system's error code, as node:fs reports it,
 * its message cut down to the reason ("ENOENT: no such file or directory,
 * open 'x'" → "no such file or directory").
 */
export function fsError(error: unknown, what: string): Error {
  const code = (error as { code?: string }).code;
  const message = ((error as Error).message ?? String(error))
    .replace(/^E[A-Z]+: /, "")
    .replace(/, [a-z]+ '[^']*'$/, "")
    .replace(/\s*\(os error \d+\)$/, "");
  const wrapped = new Error(`${what}: ${message.charAt(0).toLowerCase()}${message.slice(1)}`, {
    cause: error,
  });
  if (code) (wrapped as Error & { code: string }).code = code;
  return wrapped;
}

/** Opens `path` in `mode`; a failure is reported as `what` and the reason. */
export function openPath(path: string, mode: OpenMode, what: string): number {
  try {
    return fileIo.open(path, mode);
  } catch (error) {
    throw fsError(error, what);
  }
}

/**
 * Enlarges the pipe of a FIFO that is open at both ends (see io/pipes.ts),
 * through a descriptor of its own: the runtime does not give out the one
 * it reads or writes through, and the size belongs to the pipe, not to a
 * descriptor. Opened for reading and writing, a FIFO never blocks the open.
 * Skipped on the portable paths.
 */
export function enlargeFifo(path: string): void {
  if (!platform().linuxFast) return;
  try {
    const fd = openFd(path, O_RDWR | O_NONBLOCK);
    if (fd === undefined) return;
    enlargePipe(fd);
    closeFd(fd);
  } catch {
    // Gone or not ours to open: it keeps its size.
  }
}

/** What a path is, following symbolic links; undefined when it does not exist. */
export async function statPath(path: string): Promise<Deno.FileInfo | undefined> {
  try {
    return await Deno.stat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw fsError(error, `Cannot access ${path}`);
  }
}
