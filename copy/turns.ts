/**
 * Turn-taking for sequential endpoints (pipes): requests may be issued
 * concurrently, but each one waits until everything before its offset has
 * been read or written.
 *
 * @module
 */

/** Hands out turns by offset: `wait(offset)` resolves once `position` reaches `offset`. */
export class Turns {
  #position = 0;
  #open = false;
  #failure: Error | undefined;
  readonly #waiting = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();

  /** Offset of the next byte to be read or written. */
  get position(): number {
    return this.#position;
  }

  /** Whether `open()` was called (the stream ended: every turn is granted at once). */
  get ended(): boolean {
    return this.#open;
  }

  /** Waits for the turn of the request at `offset`. */
  wait(offset: number): Promise<void> {
    if (this.#failure) return Promise.reject(this.#failure);
    if (this.#open || offset === this.#position) return Promise.resolve();
    if (offset < this.#position || this.#waiting.has(offset)) {
      return Promise.reject(new Error(`Cannot take a turn at offset ${offset}: already passed`));
    }
    return new Promise((resolve, reject) => this.#waiting.set(offset, { resolve, reject }));
  }

  /** The current request is done up to `position`: the request starting there may go. */
  advance(position: number): void {
    this.#position = position;
    const next = this.#waiting.get(position);
    if (next) {
      this.#waiting.delete(position);
      next.resolve();
    }
  }

  /** Grants every turn, now and later (after the end of a stream, reads return nothing). */
  open(): void {
    this.#open = true;
    for (const waiter of this.#waiting.values()) waiter.resolve();
    this.#waiting.clear();
  }

  /** Fails every waiting and later turn with `reason`. */
  abort(reason: Error): void {
    this.#failure ??= reason;
    for (const waiter of this.#waiting.values()) waiter.reject(reason);
    this.#waiting.clear();
  }
}
