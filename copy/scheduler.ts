/**
 * The copy engine. A work queue walks the source in offset order, turning
 * its extents into items: data runs cut at request-size boundaries, and
 * zero runs (holes). A fixed number of lanes — the requests in flight —
 * each take the next item, read it into the lane's own buffer and write
 * it, so memory stays at lanes × request size whatever the image size.
 *
 * Zero runs, and all-zero blocks found in data that was read, are skipped
 * when the destination already reads as zero, and otherwise become zero
 * requests (allocating ones with `allocated`). Block status for the next
 * window of the source is fetched while the current one is being copied.
 *
 * @module
 */

import { Interrupted } from "../util/signals.ts";
import { WRITE_HEADROOM } from "../protocol/transmission.ts";
import type { CopyExtent, Endpoint, Role } from "./endpoint.ts";
import { zeroRuns } from "./zero_scan.ts";

/** Options of `copyImage`. */
export interface CopyOptions {
  /** Requests in flight in total (lanes). */
  requests: number;
  /** Largest read or write. */
  requestSize: number;
  /** Granularity of zero detection in data that was read; 0 turns it off. */
  sparseSize: number;
  /** Zero runs are written as allocated zeroes, never holes or skipped. */
  allocated: boolean;
  /** Trust that the destination reads as zero before the copy. */
  destinationIsZero: boolean;
  /** Ask the source for extents (holes are then never read). */
  extents: boolean;
  /** Stops the copy (Ctrl-C). */
  signal?: AbortSignal;
  /** Called after each piece with the bytes of the image done so far. */
  onProgress?: (done: number) => void;
  /**
   * Called when a range of the destination is done (written, zeroed or
   * skipped as already zero): how resumable copies keep their progress.
   */
  onDone?: (offset: number, length: number) => void;
  /** Called after each read with the bytes read. */
  onRead?: (bytes: number) => void;
  /**
   * Hands out the parts of the image this copy does, in turn; undefined
   * when none is left. Without it the copy does the whole image. Parts are
   * how threads share a copy (shards.ts): each claims the next part when
   * it runs out, so none sits idle while another has a backlog.
   */
  claim?: () => ImagePart | undefined;
}

/** A range of the image: `[offset, end)`. */
export interface ImagePart {
  /** First byte. */
  offset: number;
  /** One past the last byte. */
  end: number;
}

/** What a copy did. */
export interface CopyStats {
  /** Size of the image (for a stream source: what it delivered). */
  size: number;
  /** Bytes read from the source. */
  read: number;
  /** Bytes written as data. */
  written: number;
  /** Bytes turned into zero requests. */
  zeroed: number;
  /** Bytes of zeroes skipped because the destination already had them. */
  skipped: number;
  /** The request size used. */
  requestSize: number;
  /** Lanes used. */
  lanes: number;
}

/** A read, write or zero request failed: names the endpoint, the offset and the cause. */
export class CopyError extends Error {
  /** Which side failed. */
  readonly role: Role;
  /** The endpoint's name. */
  readonly endpoint: string;
  /** What was being done: "read", "write", "zero", "extents". */
  readonly operation: string;
  /** Offset of the failed request. */
  readonly offset: number;

  /** Wraps `cause`. */
  constructor(role: Role, endpoint: string, operation: string, offset: number, cause: unknown) {
    super(
      `${role} ${endpoint}: ${operation} at offset ${offset} failed: ${describeCause(cause)}`,
      { cause },
    );
    this.name = "CopyError";
    this.role = role;
    this.endpoint = endpoint;
    this.operation = operation;
    this.offset = offset;
  }
}

/** The copy was stopped by a signal (the process's stop signals are `Interrupted` too). */
export class CopyInterrupted extends Interrupted {
  /** Creates the error; `signal` is the name of what stopped the copy. */
  constructor(signal: Deno.Signal = "SIGINT") {
    super(signal);
    this.name = "CopyInterrupted";
  }
}

/**
 * The useful part of an error for a one-line message: the errno name and
 * the server's or system's text, without the request description that the
 * message already gives.
 */
export function describeCause(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const e = error as Error & { errno?: unknown; code?: unknown; serverMessage?: string };
  if (e.name === "NbdRequestError" && typeof e.errno === "string") {
    // Servers often repeat the errno name at the start of their message.
    const text = e.serverMessage?.replace(new RegExp(`^${e.errno}:\\s*`), "");
    return text ? `${e.errno} (${text})` : e.errno;
  }
  const message = e.message.replace(/\s*\(os error \d+\)$/, "");
  if (typeof e.code === "string" && /^E[A-Z]+$/.test(e.code) && !message.includes(e.code)) {
    return `${e.code} (${message})`;
  }
  return message;
}

/** A piece of the image for one lane. */
interface WorkItem {
  offset: number;
  length: number;
  zero: boolean;
}

/** Largest zero run handed out as one item (keeps progress moving on huge holes). */
const MAX_ZERO_ITEM = 1 << 30;
/** How much of the source one block-status request asks about. */
const EXTENT_WINDOW = 1 << 30;

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}
function roundDown(n: number, to: number): number {
  return Math.floor(n / to) * to;
}

/**
 * Hands out work items in offset order. With extents, block status for the
 * next window is already on its way while the current one is handed out.
 */
class WorkQueue {
  readonly #source: Endpoint;
  readonly #requestSize: number;
  readonly #align: number;
  readonly #useExtents: boolean;
  readonly #claim: (() => ImagePart | undefined) | undefined;
  /** End of the image. */
  #end: number;
  /** End of the part being handed out. */
  #partEnd: number;
  #offset = 0;
  /** Normalized runs not yet handed out; the first may be partly consumed. */
  #runs: CopyExtent[] = [];
  #runIndex = 0;
  /** Where the next block-status window starts. */
  #fetchFrom = 0;
  #lookahead: Promise<CopyExtent[]> | undefined;
  #lock: Promise<unknown> = Promise.resolve();

  constructor(
    source: Endpoint,
    requestSize: number,
    align: number,
    useExtents: boolean,
    claim?: () => ImagePart | undefined,
  ) {
    this.#source = source;
    this.#requestSize = requestSize;
    this.#align = align;
    this.#end = source.size ?? Infinity;
    this.#partEnd = this.#end;
    this.#useExtents = useExtents && source.size !== undefined;
    this.#claim = claim;
    if (claim) this.#partEnd = this.#offset = this.#fetchFrom = 0;
  }

  /** The source is a stream that ended at `size`. */
  endAt(size: number): void {
    if (size < this.#end) this.#end = size;
    if (size < this.#partEnd) this.#partEnd = size;
  }

  /** Moves on to the next claimed part; false when there is none. */
  #nextPart(): boolean {
    const part = this.#claim?.();
    if (!part) return false;
    this.#offset = this.#fetchFrom = part.offset;
    this.#partEnd = Math.min(part.end, this.#end);
    this.#runs = [];
    this.#runIndex = 0;
    this.#lookahead = undefined;
    return true;
  }

  /** The next item, or undefined at the end. */
  next(): Promise<WorkItem | undefined> {
    const result = this.#lock.then(() => this.#next());
    this.#lock = result.catch(() => {});
    return result;
  }

  async #next(): Promise<WorkItem | undefined> {
    while (this.#offset >= this.#partEnd) {
      if (!this.#claim || !this.#nextPart()) return undefined;
    }
    const offset = this.#offset;
    const rs = this.#requestSize;
    if (!this.#useExtents) {
      const length = Math.min(rs - (offset % rs), this.#partEnd - offset);
      this.#offset += length;
      return { offset, length, zero: false };
    }
    let run = this.#runs[this.#runIndex];
    while (!run || run.offset + run.length <= offset) {
      if (run) this.#runIndex++;
      if (this.#runIndex >= this.#runs.length) {
        this.#runs = await this.#fetch();
        this.#runIndex = 0;
      }
      run = this.#runs[this.#runIndex];
    }
    const runEnd = run.offset + run.length;
    const length = run.zero
      ? Math.min(runEnd - offset, MAX_ZERO_ITEM)
      : Math.min(runEnd - offset, rs - (offset % rs));
    this.#offset += length;
    return { offset, length, zero: run.zero };
  }

  /** The next window of runs (awaiting the lookahead), and starts fetching the one after. */
  async #fetch(): Promise<CopyExtent[]> {
    const runs = await (this.#lookahead ?? this.#query(this.#fetchFrom));
    this.#lookahead = undefined;
    const last = runs[runs.length - 1]!;
    this.#fetchFrom = last.offset + last.length;
    if (this.#fetchFrom < this.#partEnd) {
      this.#lookahead = this.#query(this.#fetchFrom);
      // Failures surface when the lookahead is awaited, not as unhandled rejections.
      this.#lookahead.catch(() => {});
    }
    return runs;
  }

  /**
   * Block status from `from`, clipped to the image and normalized: zero
   * runs shrunk to whole aligned blocks (their edges become data), the
   * window cut at an aligned offset, neighbours of one kind merged.
   */
  async #query(from: number): Promise<CopyExtent[]> {
    const end = this.#partEnd;
    const align = this.#align;
    let raw: CopyExtent[];
    try {
      raw = await this.#source.extents(from, Math.min(end - from, EXTENT_WINDOW));
    } catch (error) {
      throw new CopyError("source", this.#source.name, "block status", from, error);
    }
    let covered = from;
    for (const extent of raw) {
      if (extent.length <= 0 || extent.offset !== covered) {
        throw new CopyError(
          "source",
          this.#source.name,
          "block status",
          from,
          new Error("the extents do not cover the range contiguously"),
        );
      }
      covered += extent.length;
    }
    covered = Math.min(covered, end);
    // Stop at an aligned offset so the next window starts on a block boundary.
    let windowEnd = covered === end ? end : roundDown(covered, align);
    if (windowEnd <= from) windowEnd = Math.min(from + align, end);
    const runs: CopyExtent[] = [];
    const push = (offset: number, length: number, zero: boolean) => {
      if (length <= 0) return;
      const previous = runs[runs.length - 1];
      if (previous && previous.zero === zero) previous.length += length;
      else runs.push({ offset, length, zero });
    };
    let position = from;
    for (const extent of raw) {
      const start = Math.max(extent.offset, position);
      const stop = Math.min(extent.offset + extent.length, windowEnd);
      if (stop <= start) continue;
      if (extent.zero) {
        const zeroStart = roundUp(start, align);
        const zeroStop = stop === end ? end : roundDown(stop, align);
        if (zeroStop > zeroStart) {
          push(start, zeroStart - start, false);
          push(zeroStart, zeroStop - zeroStart, true);
          push(zeroStop, stop - zeroStop, false);
        } else push(start, stop - start, false);
      } else push(start, stop - start, false);
      position = stop;
    }
    if (position < windowEnd) push(position, windowEnd - position, false);
    return runs;
  }
}

/** The sizes a copy between two endpoints will use. */
export function planSizes(
  source: Endpoint,
  destination: Endpoint,
  requestSize: number,
  sparseSize: number,
): { requestSize: number; align: number; sparseSize: number } {
  const align = Math.max(source.blockSize.minimum, destination.blockSize.minimum, 1);
  const maximum = Math.min(source.blockSize.maximum, destination.blockSize.maximum);
  const preferred = Math.max(source.blockSize.preferred, destination.blockSize.preferred);
  // Like nbdcopy: at least the larger preferred size, never above either maximum.
  let size = Math.min(Math.max(requestSize, preferred), maximum);
  size = Math.max(align, roundDown(size, align));
  let sparse = 0;
  if (sparseSize > 0) sparse = Math.min(size, roundUp(Math.max(sparseSize, align), align));
  return { requestSize: size, align, sparseSize: sparse };
}

/** How many requests of `requestSize` fit in `budget` bytes (at least one; no budget: no limit). */
function requestsWithin(budget: number | undefined, requestSize: number): number {
  return budget === undefined ? Infinity : Math.max(1, Math.floor(budget / requestSize));
}

/** Copies `source` to `destination`; rejects with `CopyError` or `CopyInterrupted`. */
export async function copyImage(
  source: Endpoint,
  destination: Endpoint,
  options: CopyOptions,
): Promise<CopyStats> {
  const plan = planSizes(source, destination, options.requestSize, options.sparseSize);
  const requestSize = plan.requestSize;
  const queue = new WorkQueue(
    source,
    requestSize,
    plan.align,
    options.extents && source.canExtents,
    options.claim,
  );
  const skipZeroes = !options.allocated &&
    (destination.isZero || options.destinationIsZero) && !destination.sequential;
  // Zero detection is pointless when every byte must be written out in order anyway,
  // or when the destination keeps nothing.
  const sparseSize = destination.sequential || destination.discards ? 0 : plan.sparseSize;
  const stats: CopyStats = {
    size: 0,
    read: 0,
    written: 0,
    zeroed: 0,
    skipped: 0,
    requestSize,
    // Between two endpoints that do their work before returning, one lane is as fast as
    // many, and its single buffer stays in the processor's cache: with a lane per request
    // the kernel copied into and out of 16 MiB of buffers in turn, and a 1 GiB file to
    // file copy took twice the system time.
    lanes: source.synchronous && destination.synchronous ? 1 : Math.max(
      1,
      Math.min(
        Math.floor(options.requests),
        source.maxReads ?? Infinity,
        requestsWithin(source.maxBytesInFlight, requestSize),
        requestsWithin(destination.maxBytesInFlight, requestSize),
      ),
    ),
  };
  let done = 0;
  let streamEnd: number | undefined;
  let failure: Error | undefined;
  const fail = (error: Error) => {
    if (failure) return;
    failure = error;
    source.abort(error);
    destination.abort(error);
  };
  const signal = options.signal;
  const onAbort = () =>
    fail(signal!.reason instanceof Error ? signal!.reason : new CopyInterrupted());
  if (signal?.aborted) onAbort();
  signal?.addEventListener("abort", onAbort);

  const progress = (n: number) => {
    done += n;
    options.onProgress?.(done);
  };

  const zeroRange = async (offset: number, length: number) => {
    if (skipZeroes) {
      stats.skipped += length;
      return;
    }
    try {
      await destination.zero(offset, length, options.allocated);
    } catch (error) {
      throw new CopyError("destination", destination.name, "zero", offset, error);
    }
    stats.zeroed += length;
  };

  const writeRange = async (buf: Uint8Array, offset: number, sent?: () => void) => {
    try {
      await destination.write(buf, offset, true, sent);
    } catch (error) {
      throw new CopyError("destination", destination.name, "write", offset, error);
    }
    stats.written += buf.length;
  };

  /**
   * Read buffers not in use, the most recently freed last. A lane takes one
   * per piece of data and gives it back as soon as the destination no
   * longer needs it — for an NBD destination, once the write has been handed
   * to the socket, before its reply — so that the next read goes into a
   * buffer still in the processor's cache.
   */
  const spare: { bytes: Uint8Array; words: Int32Array }[] = [];
  // Room in front of the data for the destination's request header; whole pages each.
  const slotBytes = roundUp(WRITE_HEADROOM + requestSize, 4096);
  // A source that waits for its data (not a file: one lane there) leaves time for a
  // destination's own thread to write the last buffers while the next ones arrive.
  const shared = source.synchronous
    ? undefined
    : destination.sharedBuffers?.(stats.lanes, slotBytes, source.size);
  let sharedTaken = 0;
  const newBuffer = () => {
    let buffer: ArrayBufferLike;
    let start = 0;
    if (shared && (sharedTaken + 1) * slotBytes <= shared.byteLength) {
      buffer = shared;
      start = sharedTaken++ * slotBytes;
    } else buffer = new ArrayBuffer(WRITE_HEADROOM + requestSize);
    return {
      bytes: new Uint8Array(buffer, start + WRITE_HEADROOM, requestSize),
      words: new Int32Array(buffer, start + WRITE_HEADROOM, requestSize >>> 2),
    };
  };
  // A destination that keeps nothing never looks at the data (nor does the zero scan,
  // off for it): every read can go into one buffer, which stays in the processor's cache.
  const discarded = destination.discards ? newBuffer() : undefined;
  const takeBuffer = () => discarded ?? spare.pop() ?? newBuffer();

  const lane = async () => {
    while (!failure) {
      let item: WorkItem | undefined;
      try {
        item = await queue.next();
      } catch (error) {
        fail(error as Error);
        return;
      }
      if (!item || failure) return;
      try {
        if (item.zero) {
          await zeroRange(item.offset, item.length);
          options.onDone?.(item.offset, item.length);
          progress(item.length);
          continue;
        }
        // After a failure a buffer is never given back: a write may still hold it.
        const buffer = takeBuffer();
        let given = false;
        const giveBack = () => {
          if (given || buffer === discarded) return;
          given = true;
          spare.push(buffer);
        };
        const { bytes, words } = buffer;
        const view = bytes.subarray(0, item.length);
        let n: number;
        try {
          n = await source.read(view, item.offset);
        } catch (error) {
          throw new CopyError("source", source.name, "read", item.offset, error);
        }
        stats.read += n;
        options.onRead?.(n);
        if (n < item.length) {
          streamEnd = Math.min(streamEnd ?? Infinity, item.offset + n);
          queue.endAt(item.offset + n);
        }
        if (n === 0) {
          giveBack();
          continue;
        }
        const room = destination.size;
        if (room !== undefined && item.offset + n > room) {
          // Only a stream source can get here: sized sources were checked before the copy.
          throw new CopyError(
            "destination",
            destination.name,
            "write",
            Math.max(item.offset, room),
            new Error(`the source is larger than the destination (${room} bytes)`),
          );
        }
        if (sparseSize === 0) {
          await writeRange(n === view.length ? view : view.subarray(0, n), item.offset, giveBack);
        } else {
          // Each write is awaited before the next, so only the last one's data may still be
          // in use when it is sent: that one gives the buffer back.
          const runs = zeroRuns(bytes, words, n, sparseSize);
          const lastData = runs.findLastIndex((run) => !run.zero);
          for (let i = 0; i < runs.length; i++) {
            const run = runs[i]!;
            if (run.zero) await zeroRange(item.offset + run.start, run.end - run.start);
            else {
              await writeRange(
                bytes.subarray(run.start, run.end),
                item.offset + run.start,
                i === lastData ? giveBack : undefined,
              );
            }
          }
        }
        giveBack();
        options.onDone?.(item.offset, n);
        progress(n);
      } catch (error) {
        fail(error as Error);
        return;
      }
    }
  };

  try {
    await Promise.all(Array.from({ length: stats.lanes }, lane));
  } finally {
    signal?.removeEventListener("abort", onAbort);
  }
  if (failure) throw failure;
  stats.size = source.size ?? streamEnd ?? done;
  if (source.size === undefined) {
    try {
      await destination.finish(stats.size);
    } catch (error) {
      throw new CopyError("destination", destination.name, "resize", stats.size, error);
    }
  }
  return stats;
}
