/**
 * A corked writer: chunks queue while a write is in flight and go out
 * together, small ones concatenated into one write. Callers never wait for
 * the socket unless the queue passes its byte limit (backpressure).
 *
 * @module
 */

import { type ByteStream, writeAll } from "./byte_stream.ts";
import { pread } from "./libc.ts";

// By default chunks below this are copied into one staging buffer: fewer,
// larger writes cost both sides fewer syscalls and wake-ups than a write per
// page view.
const SMALL_CHUNK = 512 * 1024;
const STAGING_SIZE = 1024 * 1024;
/**
 * While corked, writing starts anyway once this much is queued: large
 * replies should not wait for the rest of a batch.
 */
const CORK_LIMIT = 256 * 1024;
/**
 * When the socket has no room for a file range, this much of it is read
 * and written the ordinary way, which waits for room; then sendfile again.
 */
const FILE_PIECE = 16 * 1024;

/** A header followed by a range of an open file, queued by `writeFile`. */
interface FileChunk {
  header: Uint8Array;
  fd: number;
  offset: number;
  length: number;
}

/** Serialising, batching writer over a `ByteStream`. */
export class CorkedWriter {
  #sink: Pick<ByteStream, "write" | "tryWrite" | "tryWriteMore" | "trySendFile">;
  #queue: Array<Uint8Array | FileChunk> = [];
  #queuedBytes = 0;
  #running = false;
  /** Between `cork` and `uncork`: chunks queue, no write starts. */
  #corked = false;
  #error: unknown = undefined;
  #highWater: number;
  #smallChunk: number;
  #staging = new Uint8Array(STAGING_SIZE);
  /** The piece of a file range sent the ordinary way (`#sendFile`). */
  #piece = new Uint8Array(FILE_PIECE);
  #drainWaiters: Array<() => void> = [];
  #idleWaiters: Array<() => void> = [];
  /** What to call once a chunk queued by `writeReleasing` is no longer needed here. */
  readonly #releases = new Map<Uint8Array, () => void>();
  /** Queued chunks to write as they are, whatever their size (`writeReleasing`'s `whole`). */
  readonly #whole = new Set<Uint8Array>();

  /**
   * Creates a writer; `write` callers are told to wait past `highWater`
   * queued bytes. Chunks below `smallChunk` bytes are concatenated, larger
   * ones written as they are.
   */
  constructor(
    sink: Pick<ByteStream, "write" | "tryWrite" | "tryWriteMore" | "trySendFile">,
    highWater = 8 * 1024 * 1024,
    smallChunk = SMALL_CHUNK,
  ) {
    this.#sink = sink;
    this.#highWater = highWater;
    this.#smallChunk = Math.min(smallChunk, STAGING_SIZE);
  }

  /** Whether `writeFile` may be used: the stream sends from files. */
  get sendsFiles(): boolean {
    return this.#sink.trySendFile !== undefined && this.#sink.tryWriteMore !== undefined;
  }

  /**
   * Queues `header` followed by `length` bytes of the open file `fd` from
   * `offset`, in order with everything else, sent without copying through
   * this process (only where `sendsFiles`). `fd` must stay open until the
   * writer is idle (`flush`) or has failed. Where the file ends early the
   * rest is sent as zeroes; a failed read of the file fails the writer.
   */
  writeFile(header: Uint8Array, fd: number, offset: number, length: number): void {
    if (this.#error !== undefined) return;
    this.#queue.push({ header, fd, offset, length });
    this.#queuedBytes += header.length + length;
    if (!this.#corked || this.#queuedBytes >= CORK_LIMIT) this.#start();
  }

  /** Bytes queued and not yet handed to the socket. */
  get queuedBytes(): number {
    return this.#queuedBytes;
  }

  /** The write error that stopped this writer, if any. */
  get error(): unknown {
    return this.#error;
  }

  /** Whether the caller should `await drain()` before queueing more. */
  get full(): boolean {
    return this.#queuedBytes > this.#highWater;
  }

  /** Queues chunks to be written in order. Ignored once the writer has failed. */
  write(...chunks: Uint8Array[]): void {
    if (this.#error !== undefined) return;
    for (const chunk of chunks) {
      if (chunk.length === 0) continue;
      this.#queue.push(chunk);
      this.#queuedBytes += chunk.length;
    }
    if (!this.#corked || this.#queuedBytes >= CORK_LIMIT) this.#start();
  }

  /**
   * Holds back writes until `uncork` (or until a large amount is queued):
   * what is queued meanwhile goes out together. For a caller that produces
   * many small chunks between two waits (replies to a batch of requests
   * already received).
   */
  cork(): void {
    this.#corked = true;
  }

  /** Ends `cork`: starts writing what was queued. */
  uncork(): void {
    if (!this.#corked) return;
    this.#corked = false;
    this.#start();
  }

  #start(): void {
    if (!this.#running && this.#queue.length > 0) {
      this.#running = true;
      // Start on a microtask so replies produced in the same turn share one write.
      queueMicrotask(() => this.#run());
    }
  }

  /**
   * Queues `chunk` like `write`, and calls `release` once the writer no
   * longer needs it: when it has been handed to the stream, or copied to
   * go out with others. Never called after a failure (nothing is assumed).
   * With `whole`, the chunk is written as it is, never copied to go out
   * with others.
   */
  writeReleasing(chunk: Uint8Array, release: () => void, options: { whole?: boolean } = {}): void {
    if (this.#error !== undefined || chunk.length === 0) return;
    this.#releases.set(chunk, release);
    if (options.whole) this.#whole.add(chunk);
    this.write(chunk);
  }

  /** Resolves once the queue is below the high-water mark (or the writer failed). */
  drain(): Promise<void> {
    // Waiting for the queue to go out needs it to go out.
    this.uncork();
    if (!this.full || this.#error !== undefined) return Promise.resolve();
    return new Promise((resolve) => this.#drainWaiters.push(resolve));
  }

  /** Resolves once everything queued so far has been written; rejects if writing failed. */
  flush(): Promise<void> {
    this.uncork();
    if (this.#error !== undefined) return Promise.reject(this.#error);
    if (!this.#running && this.#queue.length === 0) return Promise.resolve();
    return new Promise((resolve, reject) =>
      this.#idleWaiters.push(() => this.#error !== undefined ? reject(this.#error) : resolve())
    );
  }

  async #run(): Promise<void> {
    try {
      while (this.#queue.length > 0) {
        const batch = this.#queue;
        this.#queue = [];
        let i = 0;
        while (i < batch.length) {
          const chunk = batch[i]!;
          if (!(chunk instanceof Uint8Array)) {
            await this.#sendFile(chunk);
            this.#release(chunk.header.length + chunk.length);
            i++;
            continue;
          }
          if (this.#writesAsIs(chunk) || i + 1 === batch.length) {
            this.#whole.delete(chunk);
            await writeAll(this.#sink, chunk);
            this.#released(chunk);
            this.#release(chunk.length);
            i++;
            continue;
          }
          // Concatenate a run of small chunks into the staging buffer.
          let used = 0;
          while (i < batch.length) {
            const next = batch[i]!;
            if (
              !(next instanceof Uint8Array) || this.#writesAsIs(next) ||
              used + next.length > STAGING_SIZE
            ) {
              break;
            }
            this.#staging.set(next, used);
            used += next.length;
            this.#released(next);
            i++;
          }
          await writeAll(this.#sink, this.#staging.subarray(0, used));
          this.#release(used);
        }
      }
    } catch (error) {
      this.#error = error;
      this.#queue = [];
      this.#queuedBytes = 0;
      this.#releases.clear();
      this.#whole.clear();
    }
    this.#running = false;
    this.#wakeDrain();
    const idle = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const wake of idle) wake();
  }

  /** Sends a `writeFile` chunk: the header, then the range with sendfile. */
  async #sendFile(chunk: FileChunk): Promise<void> {
    const sink = this.#sink;
    const { header, fd, offset, length } = chunk;
    const sent = sink.tryWriteMore!(header);
    if (sent < header.length) await writeAll(sink, header.subarray(sent));
    let done = 0;
    while (done < length) {
      const n = sink.trySendFile!(fd, offset + done, length - done);
      if (n > 0) {
        done += n;
        continue;
      }
      // No room (or a failure): a piece goes the ordinary way, whose write
      // waits for room without holding up the event loop (or reports the error).
      const piece = this.#piece.subarray(0, Math.min(FILE_PIECE, length - done));
      const read = n === 0 ? 0 : pread(fd, piece, offset + done) ?? -1;
      if (read < 0) throw new Error("reading the file for a reply failed");
      // The file ended early (it shrank): the rest reads as zeroes, as with pread.
      if (read === 0) piece.fill(0);
      await writeAll(sink, read === 0 ? piece : piece.subarray(0, read));
      done += read === 0 ? piece.length : read;
    }
  }

  /** Whether `chunk` goes out in a write of its own rather than copied into the staging buffer. */
  #writesAsIs(chunk: Uint8Array): boolean {
    return chunk.length >= this.#smallChunk || this.#whole.has(chunk);
  }

  /** Calls the release of `chunk`, if it has one. */
  #released(chunk: Uint8Array): void {
    if (this.#releases.size === 0) return;
    const release = this.#releases.get(chunk);
    if (!release) return;
    this.#releases.delete(chunk);
    release();
  }

  #release(n: number): void {
    this.#queuedBytes -= n;
    if (!this.full) this.#wakeDrain();
  }

  #wakeDrain(): void {
    if (this.#drainWaiters.length === 0) return;
    const waiters = this.#drainWaiters;
    this.#drainWaiters = [];
    for (const wake of waiters) wake();
  }
}
