/**
 * Thread models, nbdkit's names for how much concurrency a plugin or
 * filter can take. Requests run as interleaved async calls (one JavaScript
 * thread), so "concurrent" means one call starting while another has not
 * yet resolved. The server enforces the strictest model of an export's
 * layers once, at the top of the stack (server/exports.ts), so no plugin
 * needs locks of its own for it.
 *
 * @module
 */

import { Mutex } from "../util/locks.ts";
import type {
  Backend,
  Capabilities,
  Extent,
  ExtentsFlags,
  ThreadModel,
  WriteFlags,
  ZeroFlags,
} from "./backend.ts";

export type { ThreadModel };

/** The thread models, strictest first. */
export const THREAD_MODELS: readonly ThreadModel[] = [
  "serialize_connections",
  "serialize_all_requests",
  "serialize_requests",
  "parallel",
];

/** Whether `value` is a thread model name. */
export function isThreadModel(value: unknown): value is ThreadModel {
  return THREAD_MODELS.includes(value as ThreadModel);
}

/** The strictest of some layers' models (undefined counts as parallel). */
export function strictestModel(models: Iterable<ThreadModel | undefined>): ThreadModel {
  let index = THREAD_MODELS.length - 1;
  for (const model of models) {
    if (model !== undefined) index = Math.min(index, THREAD_MODELS.indexOf(model));
  }
  return THREAD_MODELS[index]!;
}

/** A lock held across calls: `acquire` resolves to the function that releases it. */
export class HeldLock {
  readonly #mutex = new Mutex();

  /** Waits for the lock; resolves to its release. */
  acquire(): Promise<() => void> {
    return new Promise((granted) => {
      this.#mutex.run(() => new Promise<void>((release) => granted(() => release())));
    });
  }
}

/**
 * Runs every call of a backend under a mutex, so no two overlap. The
 * zero-copy read is dropped: it is synchronous and could not wait for the
 * lock. `onClose` runs once the backend is closed (releases a connection
 * lock).
 */
export class SerializedBackend implements Backend {
  readonly #next: Backend;
  readonly #lock: Mutex;
  readonly #onClose?: () => void;
  /** Whether `next` fills every read buffer. */
  readonly preadFills: boolean;

  /** Serializes the calls into `next` with `lock`. */
  constructor(next: Backend, lock: Mutex, onClose?: () => void) {
    this.#next = next;
    this.preadFills = next.preadFills === true;
    this.#lock = lock;
    this.#onClose = onClose;
    if (next.extraContexts && next.contextExtents) {
      this.extraContexts = () => next.extraContexts!();
      this.contextExtents = (name, offset, length, flags) =>
        lock.run(() => next.contextExtents!(name, offset, length, flags));
    }
  }
  /** Other metadata contexts of the export. */
  extraContexts?: () => string[];
  /** Block status in another metadata context, holding the lock. */
  contextExtents?: (
    name: string,
    offset: number,
    length: number,
    flags: ExtentsFlags,
  ) => Promise<Extent[]>;
  /** Size of the export. */
  size(): number {
    return this.#next.size();
  }
  /** Capabilities of the export. */
  capabilities(): Capabilities {
    return this.#next.capabilities();
  }
  /** Reads, holding the lock. */
  pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.#lock.run(() => this.#next.pread(buf, offset));
  }
  /** Writes, holding the lock. */
  pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.#lock.run(() => this.#next.pwrite(buf, offset, flags));
  }
  /** Flushes, holding the lock. */
  flush(): Promise<void> {
    return this.#lock.run(() => this.#next.flush());
  }
  /** Trims, holding the lock. */
  trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.#lock.run(() => this.#next.trim(offset, length, flags));
  }
  /** Zeroes, holding the lock. */
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.#lock.run(() => this.#next.zero(offset, length, flags));
  }
  /** Block status, holding the lock. */
  extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    return this.#lock.run(() => this.#next.extents(offset, length, flags));
  }
  /** Prefetch, holding the lock. */
  cache(offset: number, length: number): Promise<void> {
    return this.#lock.run(() => this.#next.cache(offset, length));
  }
  /** Closes once every earlier call has finished, then releases the connection lock. */
  async close(): Promise<void> {
    try {
      await this.#lock.run(() => this.#next.close());
    } finally {
      this.#onClose?.();
    }
  }
}
