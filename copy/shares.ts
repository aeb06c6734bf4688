/**
 * A copy shared between threads. One JavaScript thread does every socket
 * read, page-cache write and request of a copy, and at a few GB/s that
 * thread is the limit: the kernel work of each byte (receiving it, writing
 * it into a file) happens on the thread that asks for it. So a copy over
 * N connections runs N threads: this one and N-1 workers, each with its
 * own connection to each NBD endpoint (or its own file descriptor), each
 * claiming the next part of the image in turn from a shared counter, so
 * that none sits idle while another has work left.
 *
 * Only endpoints that can be reopened share a copy (`Endpoint.shareSpec`):
 * NBD exports whose server allows multi-conn, files, block devices and
 * `null:`. The main thread keeps what it opened: it alone creates, sizes,
 * flushes and renames the destination.
 *
 * @module
 */

import type { Endpoint, ShareSpec } from "./endpoint.ts";
import {
  CopyError,
  copyImage,
  CopyInterrupted,
  type CopyOptions,
  type CopyStats,
  describeCause,
  type ImagePart,
  planSizes,
} from "./scheduler.ts";

/** How much of the image a thread claims at a time (rounded to whole requests). */
const PART_SIZE = 32 << 20;
/** Parts are whole multiples of this, rounded up to whole requests. */
const UNIT_SIZE = 1 << 20;
/** Data this thread reads before it starts the workers. */
const SPAWN_AFTER = 16 << 20;

/** What a worker is asked to do. */
export interface ShareJob {
  /** How to open the source. */
  source: ShareSpec;
  /** How to open the destination. */
  destination: ShareSpec;
  /** The copy's options, with this thread's share of the requests. */
  options: Omit<CopyOptions, "signal" | "onProgress" | "onRead" | "claim">;
  /** Size of the image. */
  size: number;
  /** Largest part. */
  partSize: number;
  /** Parts are whole multiples of this (whole requests, at least 1 MiB). */
  unit: number;
  /** Threads sharing the copy. */
  threads: number;
  /** Int32 [next offset, in units]. */
  parts: SharedArrayBuffer;
  /** BigInt64 [bytes done by the workers]. */
  progress: SharedArrayBuffer;
}

/** A failure as a worker reports it. */
export type ShareFailure =
  | {
    kind: "copy";
    role: CopyError["role"];
    endpoint: string;
    operation: string;
    offset: number;
    cause: string;
  }
  | { kind: "interrupted" }
  | { kind: "other"; message: string };

/** Messages from a worker. */
export type ShareReport =
  | { type: "done"; stats: CopyStats }
  /** For the main thread's destination (`Endpoint.acceptShareMessage`). */
  | { type: "endpoint"; payload: unknown }
  | { type: "failed"; failure: ShareFailure };

/** Messages to a worker. */
export type ShareCommand = { type: "start"; job: ShareJob } | { type: "stop" };

/**
 * Hands out the parts of an image of `size` bytes from the shared counter
 * (the next offset, in `unit`s): at most `partSize` bytes, less towards
 * the end (an eighth of what is left per thread, down to 8 units), so
 * that the threads finish together instead of one copying the last large
 * part alone.
 */
export function partClaimer(
  parts: SharedArrayBuffer,
  size: number,
  partSize: number,
  unit: number,
  threads: number,
): () => ImagePart | undefined {
  const next = new Int32Array(parts);
  const units = Math.ceil(size / unit);
  const largest = Math.max(1, Math.floor(partSize / unit));
  const smallest = Math.min(largest, 8);
  return () => {
    while (true) {
      const first = Atomics.load(next, 0);
      if (first >= units) return undefined;
      const share = Math.ceil((units - first) / (8 * threads));
      const count = Math.min(units - first, Math.max(smallest, Math.min(largest, share)));
      if (Atomics.compareExchange(next, 0, first, first + count) !== first) continue;
      return { offset: first * unit, end: Math.min((first + count) * unit, size) };
    }
  };
}

/** An error as plain data, for postMessage. */
export function describeFailure(error: unknown): ShareFailure {
  if (error instanceof CopyError) {
    return {
      kind: "copy",
      role: error.role,
      endpoint: error.endpoint,
      operation: error.operation,
      offset: error.offset,
      cause: describeCause(error.cause),
    };
  }
  if (error instanceof CopyInterrupted) return { kind: "interrupted" };
  return { kind: "other", message: error instanceof Error ? error.message : String(error) };
}

function failureError(failure: ShareFailure): Error {
  switch (failure.kind) {
    case "copy":
      return new CopyError(
        failure.role,
        failure.endpoint,
        failure.operation,
        failure.offset,
        new Error(failure.cause),
      );
    case "interrupted":
      return new CopyInterrupted();
    case "other":
      return new Error(failure.message);
  }
}

/**
 * How many threads a copy between these endpoints can use, at most
 * `wanted`: 1 when either cannot be reopened or the image is too small to
 * be worth more.
 */
export function shareableThreads(source: Endpoint, destination: Endpoint, wanted: number): number {
  if (wanted <= 1 || source.size === undefined) return 1;
  // Beyond what the shared counter can count (2 PiB): one thread.
  if (source.size / UNIT_SIZE >= 2 ** 31 - 1) return 1;
  if (!source.shareSpec() || !destination.shareSpec()) return 1;
  return Math.max(1, Math.min(wanted, Math.floor(source.size / PART_SIZE)));
}

/**
 * Copies `source` to `destination` on `threads` threads (this one
 * included); rejects like `copyImage`. Every thread has an equal share of
 * `options.requests`.
 */
export async function copyShared(
  source: Endpoint,
  destination: Endpoint,
  options: CopyOptions,
  threads: number,
): Promise<CopyStats> {
  const size = source.size!;
  const sourceSpec = source.shareSpec()!;
  const destinationSpec = destination.shareSpec(threads)!;
  const { requestSize } = planSizes(source, destination, options.requestSize, options.sparseSize);
  const partSize = Math.max(1, Math.floor(PART_SIZE / requestSize)) * requestSize;
  // Whole requests of at least 1 MiB, so that the counter's 2^31 units cover any image.
  const unit = Math.ceil(UNIT_SIZE / requestSize) * requestSize;
  const parts = new SharedArrayBuffer(4);
  const progressBuffer = new SharedArrayBuffer(8);
  const workerDone = new BigInt64Array(progressBuffer);
  const requests = Math.max(1, Math.floor(options.requests / threads));
  const { signal, onProgress, onRead: _onRead, claim: _claim, ...plain } = options;
  const job: ShareJob = {
    source: sourceSpec,
    destination: destinationSpec,
    options: { ...plain, requests },
    size,
    partSize,
    unit,
    threads,
    parts,
    progress: progressBuffer,
  };

  // The first failure stops every thread; it is the one reported.
  let failure: Error | undefined;
  const local = new AbortController();
  const workers: Worker[] = [];
  const stopAll = (error: Error) => {
    failure ??= error;
    if (!local.signal.aborted) local.abort(error);
    for (const worker of workers) worker.postMessage({ type: "stop" } satisfies ShareCommand);
  };
  const onAbort = () =>
    stopAll(signal!.reason instanceof Error ? signal!.reason : new CopyInterrupted());
  signal?.addEventListener("abort", onAbort);

  let mainDone = 0;
  const report = () => onProgress?.(mainDone + Number(Atomics.load(workerDone, 0)));
  const ticker = onProgress ? setInterval(report, 100) : undefined;

  // Workers start only once this thread has read some data with parts still
  // unclaimed: a worker costs more processor time to start than an image of
  // holes takes to copy.
  const next = new Int32Array(parts);
  const workerResults: Promise<CopyStats | undefined>[] = [];
  let spawned = false;
  let readHere = 0;
  const spawnWorkers = () => {
    spawned = true;
    for (let i = 1; i < threads && !failure; i++) {
      const worker = new Worker(new URL("./share_worker.ts", import.meta.url).href, {
        type: "module",
      });
      workers.push(worker);
      workerResults.push(
        new Promise<CopyStats | undefined>((resolve) => {
          worker.onmessage = (event: MessageEvent<ShareReport>) => {
            const message = event.data;
            if (message.type === "endpoint") destination.acceptShareMessage?.(message.payload);
            else if (message.type === "done") resolve(message.stats);
            else {
              stopAll(failureError(message.failure));
              resolve(undefined);
            }
          };
          worker.onerror = (event: ErrorEvent) => {
            event.preventDefault();
            stopAll(new Error(`a copy thread failed: ${event.message}`));
            resolve(undefined);
          };
        }),
      );
      worker.postMessage({ type: "start", job } satisfies ShareCommand);
    }
  };
  try {
    if (signal?.aborted) onAbort();
    const here = await copyImage(source, destination, {
      ...options,
      requests,
      signal: local.signal,
      claim: partClaimer(parts, size, partSize, unit, threads),
      onProgress: onProgress
        ? (done) => {
          mainDone = done;
          report();
        }
        : undefined,
      onRead: (bytes) => {
        readHere += bytes;
        if (!spawned && readHere >= SPAWN_AFTER && Atomics.load(next, 0) * unit < size) {
          spawnWorkers();
        }
      },
    }).catch((error) => {
      stopAll(error as Error);
      return undefined;
    });
    const all = [here, ...await Promise.all(workerResults)];
    if (failure) throw failure;
    const stats: CopyStats = {
      size,
      read: 0,
      written: 0,
      zeroed: 0,
      skipped: 0,
      requestSize,
      lanes: requests * (1 + workers.length),
    };
    for (const part of all) {
      stats.read += part!.read;
      stats.written += part!.written;
      stats.zeroed += part!.zeroed;
      stats.skipped += part!.skipped;
    }
    return stats;
  } finally {
    signal?.removeEventListener("abort", onAbort);
    if (ticker !== undefined) clearInterval(ticker);
    for (const worker of workers) worker.terminate();
  }
}
