/**
 * blkhash with the blocks hashed on several workers: the per-block
 * SHA-256s are independent, so whole blocks go to workers in batches,
 * and their digests come back into the outer hash in order. Runs of
 * zeroes, reported or found in the data, never leave the main thread. The
 * result equals `BlkHasher`'s.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { BLKHASH_BLOCK_SIZE, type Hasher } from "./checksum.ts";
import { ZERO_BUFFER } from "../util/zero_buffer.ts";
import { rangeIsZero } from "./zero_scan.ts";

/** Blocks per message to a worker. */
const BATCH_BLOCKS = 16;
/** Batches in flight per worker before `ready()` makes the producer wait. */
const INFLIGHT_PER_WORKER = 4;

/** One piece of the outer hash's input, in order: digests to come, or zero blocks. */
interface Slot {
  digests?: Uint8Array;
  zeroBlocks?: number;
}

/** blkhash on `threads` workers; `settle()` before `digest()`. */
export class ParallelBlkHasher implements Hasher {
  readonly #blockSize: number;
  readonly #workers: Worker[] = [];
  readonly #outer = createHash("sha256");
  readonly #zeroDigests: Uint8Array;
  /** Buffers for batches, returned by the workers for reuse. */
  readonly #free: ArrayBuffer[] = [];
  #batch: Uint8Array;
  #batchBlocks = 0;
  readonly #slots = new Map<number, Slot>();
  #nextSeq = 0;
  /** The last slot made, while it is a run of zero blocks that may still grow. */
  #zeroSlot: Slot | undefined;
  #outSeq = 0;
  #inflight = 0;
  #turn = 0;
  #length = 0;
  readonly #pending: Uint8Array;
  #pendingLength = 0;
  #failure: Error | undefined;
  #wake: Array<() => void> = [];

  /** A hasher on `threads` workers with `blockSize`-byte blocks. */
  constructor(threads: number, blockSize = BLKHASH_BLOCK_SIZE) {
    if (blockSize < 4 || blockSize % 4 !== 0) {
      throw new Error("blkhash block size must be a multiple of 4");
    }
    this.#blockSize = blockSize;
    const zero = createHash("sha256");
    for (let left = blockSize; left > 0; left -= ZERO_BUFFER.length) {
      zero.update(ZERO_BUFFER.subarray(0, Math.min(left, ZERO_BUFFER.length)));
    }
    const one = zero.digest();
    this.#zeroDigests = new Uint8Array(32 * 1024);
    for (let i = 0; i < 1024; i++) this.#zeroDigests.set(one, i * 32);
    this.#pending = new Uint8Array(blockSize);
    this.#batch = this.#newBatch();
    for (let i = 0; i < threads; i++) {
      const worker = new Worker(new URL("./blkhash_worker.ts", import.meta.url).href, {
        type: "module",
      });
      worker.onmessage = (
        event: MessageEvent<{ seq: number; digests: ArrayBuffer; buf: ArrayBuffer }>,
      ) => {
        const { seq, digests, buf } = event.data;
        this.#free.push(buf);
        this.#slots.get(seq)!.digests = new Uint8Array(digests);
        this.#inflight--;
        this.#drain();
      };
      worker.onerror = (event) => {
        event.preventDefault();
        this.#fail(new Error(`blkhash worker: ${event.message}`));
      };
      this.#workers.push(worker);
    }
  }

  #newBatch(): Uint8Array {
    return new Uint8Array(this.#free.pop() ?? new ArrayBuffer(this.#blockSize * BATCH_BLOCKS));
  }

  #fail(error: Error): void {
    this.#failure ??= error;
    this.#notify();
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = [];
    for (const w of wake) w();
  }

  /** Sends the blocks gathered so far to the next worker. */
  #send(): void {
    if (this.#batchBlocks === 0) return;
    const seq = this.#nextSeq++;
    this.#slots.set(seq, {});
    this.#zeroSlot = undefined;
    const buf = this.#batch.buffer as ArrayBuffer;
    this.#workers[this.#turn++ % this.#workers.length]!.postMessage(
      { seq, buf, blocks: this.#batchBlocks, blockSize: this.#blockSize },
      [buf],
    );
    this.#inflight++;
    this.#batch = this.#newBatch();
    this.#batchBlocks = 0;
  }

  /** Feeds the outer hash with every slot whose turn has come. */
  #drain(): void {
    for (;;) {
      const slot = this.#slots.get(this.#outSeq);
      if (!slot) break;
      if (slot.zeroBlocks !== undefined) this.#zeroBlocks(slot.zeroBlocks);
      else if (slot.digests) this.#outer.update(slot.digests);
      else break;
      this.#slots.delete(this.#outSeq++);
    }
    this.#notify();
  }

  #zeroBlocks(count: number): void {
    const per = this.#zeroDigests.length / 32;
    while (count > 0) {
      const n = Math.min(count, per);
      this.#outer.update(this.#zeroDigests.subarray(0, n * 32));
      count -= n;
    }
  }

  /** Adds `count` whole zero blocks: counted in order, never copied or hashed. */
  #addZeroBlocks(count: number): void {
    this.#send();
    if (this.#zeroSlot && this.#slots.has(this.#nextSeq - 1)) {
      this.#zeroSlot.zeroBlocks! += count;
      return;
    }
    this.#zeroSlot = { zeroBlocks: count };
    this.#slots.set(this.#nextSeq++, this.#zeroSlot);
    this.#drain();
  }

  /**
   * Adds one whole block: a zero block is counted (checked here, since the
   * check is cheaper than the copy to a worker), others copied into the batch.
   */
  #block(bytes: Uint8Array): void {
    const words = bytes.byteOffset % 4 === 0
      ? new Int32Array(bytes.buffer, bytes.byteOffset, this.#blockSize >>> 2)
      : undefined;
    if (words && rangeIsZero(bytes, words, 0, bytes.length)) {
      this.#addZeroBlocks(1);
      return;
    }
    this.#batch.set(bytes, this.#batchBlocks * this.#blockSize);
    if (++this.#batchBlocks === BATCH_BLOCKS) this.#send();
  }

  /** Adds `data`: whole blocks go to the workers, the rest waits for more. */
  update(data: Uint8Array): void {
    this.#length += data.length;
    let at = 0;
    if (this.#pendingLength > 0) {
      const n = Math.min(data.length, this.#blockSize - this.#pendingLength);
      this.#pending.set(data.subarray(0, n), this.#pendingLength);
      this.#pendingLength += n;
      at = n;
      if (this.#pendingLength === this.#blockSize) {
        this.#block(this.#pending);
        this.#pendingLength = 0;
      }
    }
    while (data.length - at >= this.#blockSize) {
      this.#block(data.subarray(at, at + this.#blockSize));
      at += this.#blockSize;
    }
    if (at < data.length) {
      this.#pending.set(data.subarray(at), 0);
      this.#pendingLength = data.length - at;
    }
  }

  /** Adds `length` zeroes: whole zero blocks are counted, never hashed. */
  zero(length: number): void {
    this.#length += length;
    if (this.#pendingLength > 0) {
      const n = Math.min(length, this.#blockSize - this.#pendingLength);
      this.#pending.fill(0, this.#pendingLength, this.#pendingLength + n);
      this.#pendingLength += n;
      length -= n;
      if (this.#pendingLength === this.#blockSize) {
        this.#block(this.#pending);
        this.#pendingLength = 0;
      }
    }
    const blocks = Math.floor(length / this.#blockSize);
    if (blocks > 0) this.#addZeroBlocks(blocks);
    const rest = length - blocks * this.#blockSize;
    if (rest > 0) {
      this.#pending.fill(0, 0, rest);
      this.#pendingLength = rest;
    }
  }

  /** Resolves when the workers have room for more (the producer's backpressure). */
  ready(): Promise<void> | undefined {
    if (this.#failure) return Promise.reject(this.#failure);
    if (this.#inflight < this.#workers.length * INFLIGHT_PER_WORKER) return undefined;
    return new Promise<void>((resolve) => this.#wake.push(resolve)).then(() => this.ready());
  }

  /** Waits until every block given so far is in the outer hash. */
  async settle(): Promise<void> {
    this.#send();
    this.#drain();
    while (this.#slots.size > 0) {
      if (this.#failure) throw this.#failure;
      await new Promise<void>((resolve) => this.#wake.push(resolve));
    }
    if (this.#failure) throw this.#failure;
  }

  /** The hex digest (after `settle()`): a short last block, then the length; stops the workers. */
  digest(): string {
    if (this.#slots.size > 0 || this.#batchBlocks > 0) throw new Error("blkhash: settle() first");
    if (this.#pendingLength > 0) {
      this.#outer.update(
        createHash("sha256").update(this.#pending.subarray(0, this.#pendingLength)).digest(),
      );
      this.#pendingLength = 0;
    }
    const length = new Uint8Array(8);
    new DataView(length.buffer).setBigUint64(0, BigInt(this.#length), true);
    this.#outer.update(length);
    this.close();
    return this.#outer.digest("hex");
  }

  /** Stops the workers. */
  close(): void {
    for (const worker of this.#workers) worker.terminate();
    this.#workers.length = 0;
  }
}
