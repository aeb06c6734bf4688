/**
 * IO counters of a mounted export, in the spirit of a disk driver's
 * statistics: requests received, in flight, completed and failed, bytes
 * moved, and how long ago the last request came in and the last reply
 * went out. Plain data, so it can be sent as JSON to `nbd attached`.
 *
 * @module
 */

/** State of one NBD connection. */
export interface ConnectionStatus {
  /** Requests sent on this connection and not yet answered. */
  inFlight: number;
  /** "connected", or why the connection was given up (stale, lost). */
  state: string;
  /** Milliseconds since this connection last answered a request (null if never). */
  msSinceReply: number | null;
}

/** A snapshot of the counters. */
export interface IoStats {
  /** File requests received from the kernel (reads, writes, fsync, fallocate, seek). */
  received: number;
  /** Received and not finished. */
  inFlight: number;
  /** Finished successfully. */
  completed: number;
  /** Finished with an error. */
  failed: number;
  /** Read requests. */
  reads: number;
  /** Write requests. */
  writes: number;
  /** fsync requests (NBD FLUSH). */
  flushes: number;
  /** Hole punches and zero-range requests. */
  zeroes: number;
  /** Bytes read from the export. */
  bytesRead: number;
  /** Bytes written to the export. */
  bytesWritten: number;
  /** Milliseconds since the last request came in (null if none yet). */
  msSinceRequest: number | null;
  /** Milliseconds since the last request finished (null if none yet). */
  msSinceReply: number | null;
  /** One entry per NBD connection. */
  connections: ConnectionStatus[];
}

/** The kinds of request counted separately. */
export type RequestKind = "read" | "write" | "flush" | "zero" | "other";

/** Live counters; `snapshot()` gives the JSON-friendly form. */
export class IoCounters {
  #received = 0;
  #inFlight = 0;
  #completed = 0;
  #failed = 0;
  #reads = 0;
  #writes = 0;
  #flushes = 0;
  #zeroes = 0;
  #bytesRead = 0;
  #bytesWritten = 0;
  #lastRequest = 0;
  #lastReply = 0;

  /** Counts a request coming in. */
  start(kind: RequestKind): void {
    this.#received++;
    this.#inFlight++;
    this.#lastRequest = Date.now();
    if (kind === "read") this.#reads++;
    else if (kind === "write") this.#writes++;
    else if (kind === "flush") this.#flushes++;
    else if (kind === "zero") this.#zeroes++;
  }

  /** Counts a request finishing; `bytes` moved, in the direction of `kind`. */
  finish(kind: RequestKind, ok: boolean, bytes = 0): void {
    this.#inFlight--;
    this.#lastReply = Date.now();
    if (!ok) {
      this.#failed++;
      return;
    }
    this.#completed++;
    if (kind === "read") this.#bytesRead += bytes;
    else if (kind === "write") this.#bytesWritten += bytes;
  }

  /** Runs `work` as one counted request. */
  async count<T>(kind: RequestKind, bytes: number, work: () => Promise<T>): Promise<T> {
    this.start(kind);
    try {
      const result = await work();
      this.finish(kind, true, bytes);
      return result;
    } catch (error) {
      this.finish(kind, false);
      throw error;
    }
  }

  /** The counters now, with the given connection states. */
  snapshot(connections: ConnectionStatus[] = []): IoStats {
    const now = Date.now();
    return {
      received: this.#received,
      inFlight: this.#inFlight,
      completed: this.#completed,
      failed: this.#failed,
      reads: this.#reads,
      writes: this.#writes,
      flushes: this.#flushes,
      zeroes: this.#zeroes,
      bytesRead: this.#bytesRead,
      bytesWritten: this.#bytesWritten,
      msSinceRequest: this.#lastRequest ? now - this.#lastRequest : null,
      msSinceReply: this.#lastReply ? now - this.#lastReply : null,
      connections,
    };
  }
}
