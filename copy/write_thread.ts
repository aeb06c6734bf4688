/**
 * A thread that writes a file destination's data (write_worker.ts), so
 * that the event loop's thread goes on receiving the next replies while
 * the kernel copies the last ones into the page cache. The data is never
 * copied between the threads: the copy's read buffers are slots of one
 * shared arena, and a write posts only where its data lies and where it
 * goes, through a ring in shared memory. The thread also makes the
 * write-behind calls (writeback.ts) itself, in line with its writes, as
 * nbdcopy's threads do: started from another thread, the writeback made
 * the writes slower (docs/performance.md).
 *
 * @module
 */

import { fileIo } from "../io/file_io.ts";
import { SystemError } from "../io/libc.ts";
import { WRITE_BEHIND_STEP, type WriteBehind } from "./writeback.ts";

/** Bytes of a stream written before its destination's write thread starts. */
const WRITE_THREAD_AFTER = 32 << 20;

/** Copies of this size or more start their destination's write thread with the copy. */
const WRITE_THREAD_SIZE = 64 << 20;

/** Largest arena of read buffers a destination offers (beyond it, ordinary buffers). */
const MAX_ARENA = 256 << 20;

/** Requests the ring holds at once; posting waits for room beyond that. */
export const RING_SLOTS = 1024;

/** Indexes into the control array. */
export const Control = {
  /** Requests posted (written by the event loop's thread). */
  HEAD: 0,
  /** Requests done (written by the write thread). */
  DONE: 1,
  /** 1 once the write thread may stop, when every request is done. */
  STOP: 2,
  /** 1 once the write thread has loaded and waits for requests. */
  READY: 3,
  /** Changed with every post and stop: what the write thread sleeps on. */
  SIGNAL: 4,
  /** Number of entries. */
  LENGTH: 5,
} as const;

/** Int32 entries per request: where its data lies in the arena, its length, its errno (0: done). */
export const REQUEST_FIELDS = 3;

/** What the write thread is given to start. */
export interface WriteThreadSetup {
  fd: number;
  /**
   * The file's path, which the thread opens itself on the portable paths:
   * node:fs descriptors belong to the thread that opened them.
   */
  path?: string;
  arena: SharedArrayBuffer;
  control: SharedArrayBuffer;
  /** RING_SLOTS × REQUEST_FIELDS Int32 entries. */
  requests: SharedArrayBuffer;
  /** RING_SLOTS Float64 entries: where each request's data goes in the file. */
  positions: SharedArrayBuffer;
  /** Write-behind window and budget in bytes (writeback.ts). */
  step: number;
  budget: number;
}

/** What the write thread reports back: only that it has stopped. */
export type WriteThreadMessage = { type: "stopped" };

/**
 * Writes from a shared arena on a thread of its own. `start` returns
 * before the thread has loaded; until `ready`, the owner writes itself.
 */
export class WriteThread {
  readonly #worker: Worker;
  readonly #control: Int32Array;
  readonly #requests: Int32Array;
  readonly #positions: Float64Array;
  /** Requests posted, and resolved here, in order. */
  #posted = 0;
  #resolved = 0;
  readonly #waiting: { resolve: () => void; reject: (error: Error) => void }[] = [];
  /** Posts waiting for room in the ring. */
  readonly #roomWaiters: (() => void)[] = [];
  #watching = false;
  #failure: Error | undefined;
  readonly #stopped: Promise<void>;

  private constructor(worker: Worker, setup: WriteThreadSetup) {
    this.#worker = worker;
    this.#control = new Int32Array(setup.control);
    this.#requests = new Int32Array(setup.requests);
    this.#positions = new Float64Array(setup.positions);
    this.#stopped = new Promise((resolve) => {
      worker.onmessage = (event: MessageEvent<WriteThreadMessage>) => {
        if (event.data.type === "stopped") resolve();
      };
      worker.onerror = (event) => {
        event.preventDefault();
        this.#fail(new Error(`the write thread failed: ${event.message}`));
        resolve();
      };
    });
  }

  /**
   * Starts a thread writing `fd` (the file at `path`) from `arena`, with
   * write-behind in windows of `step` bytes, `budget` bytes behind;
   * undefined when no thread can be started here (on the portable paths,
   * without a path to open).
   */
  static start(
    fd: number,
    arena: SharedArrayBuffer,
    step: number,
    budget: number,
    path?: string,
  ): WriteThread | undefined {
    if (fileIo.path === "portable" && path === undefined) return undefined;
    const setup: WriteThreadSetup = {
      fd,
      path,
      arena,
      control: new SharedArrayBuffer(Control.LENGTH * 4),
      requests: new SharedArrayBuffer(RING_SLOTS * REQUEST_FIELDS * 4),
      positions: new SharedArrayBuffer(RING_SLOTS * 8),
      step,
      budget,
    };
    let worker: Worker;
    try {
      worker = new Worker(new URL("./write_worker.ts", import.meta.url).href, { type: "module" });
    } catch {
      return undefined;
    }
    worker.postMessage(setup);
    return new WriteThread(worker, setup);
  }

  /** Whether the thread has loaded and takes writes (and has not failed). */
  get ready(): boolean {
    return !this.#failure && Atomics.load(this.#control, Control.READY) === 1;
  }

  /** Writes all of `buf` (in the arena) at `position`; rejects with the system's error. */
  async write(buf: Uint8Array, position: number): Promise<void> {
    while (this.#posted - this.#resolved >= RING_SLOTS) {
      await new Promise<void>((resolve) => this.#roomWaiters.push(resolve));
    }
    if (this.#failure) throw this.#failure;
    const slot = this.#posted % RING_SLOTS;
    const base = slot * REQUEST_FIELDS;
    this.#requests[base] = buf.byteOffset;
    this.#requests[base + 1] = buf.length;
    this.#requests[base + 2] = 0;
    this.#positions[slot] = position;
    this.#posted++;
    const done = new Promise<void>((resolve, reject) => this.#waiting.push({ resolve, reject }));
    Atomics.store(this.#control, Control.HEAD, this.#posted);
    this.#wake();
    if (!this.#watching) void this.#watch();
    return await done;
  }

  /**
   * Resolves the writes the thread has done, in order, as it reports them.
   * The wake-up of an asynchronous wait comes through the event loop; the
   * worker keeps the loop alive meanwhile.
   */
  async #watch(): Promise<void> {
    this.#watching = true;
    try {
      while (this.#resolved < this.#posted && !this.#failure) {
        const done = Atomics.load(this.#control, Control.DONE);
        if (done === this.#resolved) {
          const wait = Atomics.waitAsync(this.#control, Control.DONE, done);
          if (wait.async) await wait.value;
          continue;
        }
        while (this.#resolved < done) {
          const slot = this.#resolved % RING_SLOTS;
          const errno = this.#requests[slot * REQUEST_FIELDS + 2]!;
          const waiter = this.#waiting.shift()!;
          this.#resolved++;
          if (errno === 0) waiter.resolve();
          else waiter.reject(new SystemError(errno));
        }
        for (const wake of this.#roomWaiters.splice(0)) wake();
      }
    } finally {
      this.#watching = false;
    }
  }

  #wake(): void {
    Atomics.add(this.#control, Control.SIGNAL, 1);
    Atomics.notify(this.#control, Control.SIGNAL);
  }

  #fail(error: Error): void {
    this.#failure ??= error;
    for (const waiter of this.#waiting.splice(0)) waiter.reject(this.#failure);
    this.#resolved = this.#posted;
    for (const wake of this.#roomWaiters.splice(0)) wake();
  }

  /**
   * Lets the thread finish the writes posted and stop; resolves once it
   * has, so that the descriptor can be closed.
   */
  async stop(): Promise<void> {
    Atomics.store(this.#control, Control.STOP, 1);
    this.#wake();
    await this.#stopped;
    this.#worker.terminate();
  }
}

/**
 * The hand-off of a file destination's writes to a write thread: owns the
 * arena that the copy's read buffers are slots of, starts the thread when
 * the copy pays for it, and takes the writes from the arena once the
 * thread has loaded. Until then, and for writes from elsewhere, the owner
 * writes itself.
 */
export class WriteHandoff {
  /** The copy's read buffers' memory. */
  readonly arena: SharedArrayBuffer;
  readonly #fd: number;
  readonly #path: string | undefined;
  /** The owner's write-behind: its budget is the thread's, and it is drained at the hand-over. */
  readonly #behind: WriteBehind;
  #thread: WriteThread | undefined;
  /** A thread was started (or failed to start), or the hand-off stopped: no other starts. */
  #tried = false;
  /** The write thread has taken over (the owner's write-behind drained). */
  #handedOver = false;
  /** Bytes written from the arena by the owner before a write thread started. */
  #writtenHere = 0;

  private constructor(
    fd: number,
    behind: WriteBehind,
    arena: SharedArrayBuffer,
    path: string | undefined,
  ) {
    this.#fd = fd;
    this.#path = path;
    this.#behind = behind;
    this.arena = arena;
  }

  /**
   * An arena of `count` buffers of `bytes` for a copy of `total` bytes
   * (undefined for a stream) into `fd`, the file at `path`; undefined when
   * the copy would not pay for a write thread.
   */
  static offer(
    fd: number,
    behind: WriteBehind,
    count: number,
    bytes: number,
    total: number | undefined,
    path?: string,
  ): WriteHandoff | undefined {
    if (count * bytes > MAX_ARENA) return undefined;
    // A copy this small would not pay for the thread's start, which holds the event
    // loop's thread up; a large one pays whenever it comes, and is no slower starting
    // it now than after the first requests. A stream's is started once it has
    // shown its size (`write`).
    if (total !== undefined && total < WRITE_THREAD_SIZE) return undefined;
    const handoff = new WriteHandoff(fd, behind, new SharedArrayBuffer(count * bytes), path);
    if (total !== undefined) handoff.#start();
    return handoff;
  }

  /**
   * The write thread's write of `buf` at `offset`; undefined when the
   * owner must write it itself (not in the arena, or no thread ready).
   */
  write(buf: Uint8Array, offset: number): Promise<void> | undefined {
    if (buf.buffer !== this.arena) return undefined;
    const thread = this.#tried ? this.#thread : this.#afterWriting(buf.length);
    if (!thread?.ready) return undefined;
    if (!this.#handedOver) {
      // What the owner wrote is written back and dropped as the thread's would be.
      this.#handedOver = true;
      this.#behind.drain();
    }
    return thread.write(buf, offset);
  }

  /** The thread of a stream's copy, started once enough was written by the owner. */
  #afterWriting(length: number): WriteThread | undefined {
    this.#writtenHere += length;
    return this.#writtenHere < WRITE_THREAD_AFTER ? undefined : this.#start();
  }

  #start(): WriteThread | undefined {
    if (this.#tried) return this.#thread;
    this.#tried = true;
    this.#thread = WriteThread.start(
      this.#fd,
      this.arena,
      WRITE_BEHIND_STEP,
      this.#behind.budget,
      this.#path,
    );
    return this.#thread;
  }

  /**
   * Lets the thread finish the writes posted and stop, so that the
   * descriptor can be closed; no thread starts afterwards.
   */
  async stop(): Promise<void> {
    this.#tried = true;
    await this.#thread?.stop();
  }
}
