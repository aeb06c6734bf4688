/**
 * Reuse of request buffers: WRITE payloads and READ replies. A fresh buffer
 * for each request costs the runtime zeroing it and the kernel faulting its
 * pages in (a large buffer is fresh memory from the system every time), a
 * large share of the server's time (docs/performance.md). Clients send runs of equal-sized requests,
 * so a pool keeps the buffers of the last size it saw, up to a byte budget.
 *
 * A buffer is given back only once nothing uses it: a WRITE payload after
 * the backend's pwrite succeeded (the Backend contract: a write's buffer is
 * the caller's again once its promise has resolved; after a failure nothing
 * is assumed), a READ reply once written to the socket.
 *
 * @module
 */

/**
 * Bytes of idle buffers one pool keeps at most: every request nbdcopy keeps
 * in flight on one connection (64 of 256 KiB). With room for only 16, each
 * burst allocated the rest afresh, and zeroing and faulting them in took a
 * tenth of the server's time on reads (docs/performance.md).
 */
const POOL_BUDGET = 16 << 20;

/** Idle payload buffers of one size. */
export class PayloadPool {
  readonly #budget: number;
  #size = 0;
  #free: Uint8Array[] = [];

  /** A pool keeping at most `budget` bytes of idle buffers. */
  constructor(budget = POOL_BUDGET) {
    this.#budget = budget;
  }

  /** Idle buffers held now. */
  get idle(): number {
    return this.#free.length;
  }

  /**
   * A buffer of exactly `length` bytes: all zero with `zeroed` (a reused
   * one is cleared, a new one already is), otherwise with unspecified
   * contents.
   */
  take(length: number, zeroed = false): Uint8Array {
    if (length === this.#size) {
      const buffer = this.#free.pop();
      if (buffer) return zeroed ? buffer.fill(0) : buffer;
    }
    return new Uint8Array(length);
  }

  /** Gives back a buffer from `take` that nothing refers to any more. */
  give(buffer: Uint8Array): void {
    const length = buffer.length;
    if (length === 0 || length > this.#budget) return;
    if (length !== this.#size) {
      // The client moved to another size: the old buffers go to the garbage collector.
      this.#size = length;
      this.#free = [];
    }
    if ((this.#free.length + 1) * length <= this.#budget) this.#free.push(buffer);
  }
}
