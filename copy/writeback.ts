/**
 * How much of a copy's written data may wait in the page cache, and the
 * bookkeeping that keeps it there: writes are grouped in windows whose
 * writeback starts as each one fills, and the oldest are retired (waited
 * for and dropped from the cache) once more than a budget is pending. The
 * calls themselves are made by the writer: on a helper thread of the
 * runtime for writes made on the event loop's thread (`WriteBehind`
 * below), or in line by the write thread (write_worker.ts).
 *
 * @module
 */

import {
  dropCache,
  SYNC_FILE_RANGE_WAIT_AFTER,
  SYNC_FILE_RANGE_WAIT_BEFORE,
  SYNC_FILE_RANGE_WRITE,
  syncFileRange,
} from "../io/libc.ts";
import { platform } from "../io/platform.ts";

/** Most written data a copy leaves in the page cache, whatever the memory. */
export const WRITE_BEHIND_BUDGET = 64 << 20;

/** Bytes of writes grouped into one writeback window. */
export const WRITE_BEHIND_STEP = 8 << 20;

/**
 * How much written data a copy may leave in the page cache: `WRITE_BEHIND_BUDGET`,
 * or less on a machine where half of what the kernel lets accumulate before
 * its own background writeback starts (vm.dirty_background_bytes, or _ratio
 * of the available memory) is less, so that the kernel never has to
 * throttle the copy.
 */
function dirtyBudget(): number {
  try {
    const read = (name: string) => Number(Deno.readTextFileSync(`/proc/sys/vm/${name}`).trim());
    let limit = read("dirty_background_bytes");
    if (!(limit > 0)) {
      const ratio = read("dirty_background_ratio");
      const available = /MemAvailable:\s+(\d+) kB/.exec(Deno.readTextFileSync("/proc/meminfo"));
      if (!(ratio > 0) || !available) return WRITE_BEHIND_BUDGET;
      limit = Number(available[1]) * 1024 * ratio / 100;
    }
    return Math.max(16 << 20, Math.min(WRITE_BEHIND_BUDGET, Math.floor(limit / 2)));
  } catch {
    return WRITE_BEHIND_BUDGET;
  }
}

/** A range of the file that writes covered, and how many bytes they wrote in it. */
export interface WritebackWindow {
  start: number;
  end: number;
  bytes: number;
}

/** Which ranges to write back and when to retire them; makes no calls itself. */
export class WritebackWindows {
  readonly #step: number;
  #budget: number;
  /** The window being filled. */
  #start = Infinity;
  #end = 0;
  #bytes = 0;
  /** Full windows not yet retired, oldest first, and their bytes. */
  readonly #full: WritebackWindow[] = [];
  #pending = 0;
  /** Every window is due, whatever the budget (another writer took over). */
  #draining = false;

  /** Windows of `step` bytes, retired once more than `budget` bytes are pending. */
  constructor(step: number, budget: number) {
    this.#step = step;
    this.#budget = Math.max(budget, step);
  }

  /** Bytes allowed in windows not yet retired. */
  get budget(): number {
    return this.#budget;
  }
  set budget(bytes: number) {
    this.#budget = Math.max(bytes, this.#step);
  }

  /** Bytes in full windows not yet retired. */
  get pending(): number {
    return this.#pending;
  }

  /** Records a write; returns the window it filled, whose writeback should start now. */
  add(offset: number, length: number): WritebackWindow | undefined {
    if (offset < this.#start) this.#start = offset;
    if (offset + length > this.#end) this.#end = offset + length;
    this.#bytes += length;
    return this.#bytes < this.#step ? undefined : this.#close();
  }

  /** Closes the window being filled; returns it. */
  #close(): WritebackWindow {
    const window = { start: this.#start, end: this.#end, bytes: this.#bytes };
    this.#full.push(window);
    this.#pending += window.bytes;
    this.#start = Infinity;
    this.#end = 0;
    this.#bytes = 0;
    return window;
  }

  /** The oldest window while more than the budget is pending; `retired` once it is done. */
  due(): WritebackWindow | undefined {
    return this.#draining || this.#pending > this.#budget ? this.#full[0] : undefined;
  }

  /**
   * Makes every window due, from now on, whatever the budget: returns the
   * one being filled, now closed, whose writeback should start now.
   */
  drain(): WritebackWindow | undefined {
    this.#draining = true;
    return this.#bytes === 0 ? undefined : this.#close();
  }

  /** Forgets the oldest window (what `due` returned), now written back and dropped. */
  retired(): void {
    const window = this.#full.shift();
    if (window) this.#pending -= window.bytes;
  }
}

/**
 * Keeps the written data of a copy from piling up in the page cache, as
 * nbdcopy does (see `WritebackWindows`). So a copy of any size cycles through the
 * same few MiB of memory, and neither crowds other programs out of the
 * cache nor waits for fresh memory: on virtual machines whose free memory
 * goes back to the host, each page touched for the first time is slow
 * (docs/performance.md).
 * Writers only wait when the disk falls more than a budget behind. The
 * calls run on a helper thread of the runtime, three per window, never one
 * per write.
 */
export class WriteBehind {
  readonly #fd: number;
  readonly #windows: WritebackWindows;
  #retiring: Promise<void> | undefined;
  /** Writebacks started and not yet returned. */
  readonly #started = new Set<Promise<unknown>>();
  /** A Linux fast path (sync_file_range, posix_fadvise): skipped on the portable paths. */
  #enabled = platform().linuxFast;

  /** Writes back behind writes to `fd` in windows of `step` bytes, `budget` bytes behind. */
  constructor(
    fd: number,
    step = WRITE_BEHIND_STEP,
    budget = dirtyBudget(),
  ) {
    this.#fd = fd;
    this.#windows = new WritebackWindows(step, budget);
  }

  /** The budget in bytes. */
  get budget(): number {
    return this.#windows.budget;
  }
  set budget(bytes: number) {
    this.#windows.budget = bytes;
  }

  /**
   * Called after each write of `length` bytes at `offset`: a promise when
   * the writer must wait for the disk, else undefined.
   */
  written(offset: number, length: number): Promise<void> | undefined {
    if (!this.#enabled) return;
    const window = this.#windows.add(offset, length);
    if (!window) return;
    this.#startWriteback(window);
    if (!this.#windows.due()) return;
    const retiring = this.#retire();
    return this.#windows.pending > 2 * this.#windows.budget ? retiring : undefined;
  }

  /** Starts the writeback of a window: usually over by the time the window is retired. */
  #startWriteback(window: WritebackWindow): void {
    const started = syncFileRange(
      this.#fd,
      window.start,
      window.end - window.start,
      SYNC_FILE_RANGE_WRITE,
    );
    this.#started.add(started);
    void started.finally(() => this.#started.delete(started));
  }

  /**
   * Writes back and drops all that was written so far, in the background:
   * another writer (a write thread, with a budget of its own) takes over.
   */
  drain(): void {
    if (!this.#enabled) return;
    const last = this.#windows.drain();
    if (last) this.#startWriteback(last);
    void this.#retire();
  }

  /** Waits for and drops the oldest windows until a budget at most is pending. */
  #retire(): Promise<void> {
    this.#retiring ??= (async () => {
      const fd = this.#fd;
      for (
        let window = this.#windows.due();
        window && this.#enabled;
        window = this.#windows.due()
      ) {
        const length = window.end - window.start;
        const flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
          SYNC_FILE_RANGE_WAIT_AFTER;
        // Not supported here (or no FFI): the kernel's own writeback will do.
        if (!(await syncFileRange(fd, window.start, length, flags))) this.#enabled = false;
        if (!this.#enabled) break;
        await dropCache(fd, window.start, length);
        this.#windows.retired();
      }
    })().finally(() => this.#retiring = undefined);
    return this.#retiring;
  }

  /**
   * Stops for good and resolves once no call on the descriptor is left
   * running, so that it can be closed: a call made after the close would
   * reach whatever file reused its number.
   */
  async stop(): Promise<void> {
    this.#enabled = false;
    await this.#retiring;
    await Promise.all(this.#started);
  }
}
