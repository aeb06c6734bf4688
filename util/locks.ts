/**
 * Async locks for filters that read, modify and write back blocks shared
 * by concurrent requests (blocksize, cow, cache).
 *
 * @module
 */

/** A FIFO async mutex. */
export class Mutex {
  #tail: Promise<void> = Promise.resolve();

  /** Runs `fn` once every earlier holder has finished. */
  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.#tail.then(fn);
    this.#tail = result.then(() => {}, () => {});
    return result;
  }
}

/** One async lock per key (e.g. block number), created on demand and dropped when idle. */
export class KeyedLocks {
  readonly #tails = new Map<number, Promise<void>>();

  /** Runs `fn` holding the lock of `key`. */
  async run<T>(key: number, fn: () => Promise<T>): Promise<T> {
    const previous = this.#tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((resolve) => release = resolve);
    const tail = previous.then(() => mine);
    this.#tails.set(key, tail);
    await previous;
    try {
      return await fn();
    } finally {
      release();
      // Nobody queued behind us: forget the key so the map stays small.
      if (this.#tails.get(key) === tail) this.#tails.delete(key);
    }
  }

  /** Runs `fn` holding the locks of every key in [first, last], taken in order. */
  runRange<T>(first: number, last: number, fn: () => Promise<T>): Promise<T> {
    if (first > last) return fn();
    return this.run(first, () => this.runRange(first + 1, last, fn));
  }
}

/**
 * A readers-writer lock: any number of shared holders, or one exclusive
 * holder. Waiters are served in arrival order.
 */
export class RwLock {
  #readers = 0;
  #writer = false;
  readonly #queue: Array<{ exclusive: boolean; grant: () => void }> = [];

  /** Runs `fn` with shared access. */
  async shared<T>(fn: () => Promise<T>): Promise<T> {
    await this.#acquire(false);
    try {
      return await fn();
    } finally {
      this.#readers--;
      this.#wake();
    }
  }

  /** Runs `fn` with exclusive access. */
  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    await this.#acquire(true);
    try {
      return await fn();
    } finally {
      this.#writer = false;
      this.#wake();
    }
  }

  #acquire(exclusive: boolean): Promise<void> {
    if (this.#queue.length === 0 && this.#free(exclusive)) {
      this.#take(exclusive);
      return Promise.resolve();
    }
    return new Promise((resolve) =>
      this.#queue.push({
        exclusive,
        grant: () => {
          this.#take(exclusive);
          resolve();
        },
      })
    );
  }

  #free(exclusive: boolean): boolean {
    return exclusive ? !this.#writer && this.#readers === 0 : !this.#writer;
  }

  #take(exclusive: boolean): void {
    if (exclusive) this.#writer = true;
    else this.#readers++;
  }

  #wake(): void {
    while (this.#queue.length > 0 && this.#free(this.#queue[0]!.exclusive)) {
      this.#queue.shift()!.grant();
    }
  }
}
