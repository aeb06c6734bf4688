/**
 * blkhash computed by every thread of a shared copy (shares.ts): each
 * thread hashes the whole blocks of the parts it reads, where it reads
 * them, and hands only their 32-byte digests to the main thread, which
 * feeds them to the outer hash in block order. Reading and hashing then
 * both scale with the threads; the main thread's own share of the work is
 * 32 bytes of outer hashing per block.
 *
 * A block cut between two writes (an extent edge inside it, or parts that
 * do not end on a block boundary) travels as the pieces of it, which the
 * main thread puts together and hashes. The result equals `BlkHasher`'s.
 *
 * @module
 */

import { createHash } from "node:crypto";
import type { BlockSize } from "../protocol/handshake.ts";
import { BaseEndpoint, type ShareSpec } from "./endpoint.ts";
import { rangeIsZero } from "./zero_scan.ts";

/** What a thread hands to the main thread, in any order. */
export type BlockReport =
  /** The digests of whole blocks from `block` on, 32 bytes each. */
  | { kind: "digests"; block: number; digests: Uint8Array }
  /** `count` whole blocks of zeroes from `block` on. */
  | { kind: "zero"; block: number; count: number }
  /** Bytes of a block that this thread did not see whole. */
  | { kind: "piece"; offset: number; bytes: Uint8Array };

/** SHA-256 of `length` zero bytes. */
function zeroDigest(length: number): Uint8Array {
  return new Uint8Array(createHash("sha256").update(new Uint8Array(length)).digest());
}

/**
 * One thread's hashing: turns the writes and zero runs it is given into
 * block reports. Blocks are `blockSize` bytes, the last one shorter when
 * `size` is not a multiple.
 */
export class BlockDigester {
  readonly #blockSize: number;
  readonly #size: number;
  readonly #emit: (report: BlockReport) => void;
  readonly #wholeZero: Uint8Array;

  /** Reports to `emit`; a report's arrays belong to the receiver. */
  constructor(blockSize: number, size: number, emit: (report: BlockReport) => void) {
    if (blockSize < 4 || blockSize % 4 !== 0) {
      throw new Error("blkhash block size must be a multiple of 4");
    }
    this.#blockSize = blockSize;
    this.#size = size;
    this.#emit = emit;
    this.#wholeZero = zeroDigest(blockSize);
  }

  /** Where block `block` ends. */
  #blockEnd(block: number): number {
    return Math.min((block + 1) * this.#blockSize, this.#size);
  }

  /** Hashes the whole blocks of `data` (at `offset`); the edges go as pieces. */
  write(data: Uint8Array, offset: number): void {
    const end = offset + data.length;
    let block = Math.ceil(offset / this.#blockSize);
    let at = Math.min(block * this.#blockSize, end);
    if (at > offset) this.#piece(offset, data.subarray(0, at - offset));
    const first = block;
    const whole: number[] = [];
    while (block * this.#blockSize < end && this.#blockEnd(block) <= end) {
      whole.push(block++);
    }
    if (whole.length > 0) {
      const digests = new Uint8Array(whole.length * 32);
      for (let i = 0; i < whole.length; i++) {
        const start = whole[i]! * this.#blockSize - offset;
        const length = this.#blockEnd(whole[i]!) - whole[i]! * this.#blockSize;
        const bytes = data.subarray(start, start + length);
        const aligned = bytes.byteOffset % 4 === 0 && length === this.#blockSize;
        if (
          aligned &&
          rangeIsZero(
            bytes,
            new Int32Array(bytes.buffer, bytes.byteOffset, length >>> 2),
            0,
            length,
          )
        ) {
          digests.set(this.#wholeZero, i * 32);
        } else {
          digests.set(createHash("sha256").update(bytes).digest(), i * 32);
        }
      }
      this.#emit({ kind: "digests", block: first, digests });
      at = block * this.#blockSize;
    }
    if (at < end) this.#piece(at, data.subarray(at - offset));
  }

  /** Counts the whole zero blocks of `[offset, offset + length)`; the edges go as pieces. */
  zero(offset: number, length: number): void {
    const end = offset + length;
    let block = Math.ceil(offset / this.#blockSize);
    let at = Math.min(block * this.#blockSize, end);
    if (at > offset) this.#piece(offset, new Uint8Array(at - offset));
    const first = block;
    while ((block + 1) * this.#blockSize <= end) block++;
    if (block > first) {
      this.#emit({ kind: "zero", block: first, count: block - first });
      at = block * this.#blockSize;
    }
    // A short last block is hashed as the zeroes it holds.
    if (at < end && at === block * this.#blockSize && this.#blockEnd(block) === end) {
      this.#emit({ kind: "digests", block, digests: zeroDigest(end - at) });
      at = end;
    }
    if (at < end) this.#piece(at, new Uint8Array(end - at));
  }

  #piece(offset: number, bytes: Uint8Array): void {
    this.#emit({ kind: "piece", offset, bytes: bytes.slice() });
  }
}

/** A block being put together from pieces. */
interface Partial {
  bytes: Uint8Array;
  /** One flag per byte: seen. */
  seen: Uint8Array;
  left: number;
}

/**
 * The main thread's side: takes block reports in any order and feeds the
 * outer hash in block order; the digest once every block is in.
 */
export class BlkhashCollector {
  readonly #blockSize: number;
  readonly #size: number;
  readonly #blocks: number;
  readonly #outer = createHash("sha256");
  readonly #wholeZero: Uint8Array;
  /** Reports waiting for their turn, by first block. */
  readonly #waiting = new Map<number, Uint8Array | number>();
  readonly #partials = new Map<number, Partial>();
  #next = 0;

  /** A collector for an image of `size` bytes in `blockSize`-byte blocks. */
  constructor(blockSize: number, size: number) {
    this.#blockSize = blockSize;
    this.#size = size;
    this.#blocks = Math.ceil(size / blockSize);
    this.#wholeZero = zeroDigest(blockSize);
  }

  /** Takes one report. */
  add(report: BlockReport): void {
    switch (report.kind) {
      case "digests":
        this.#waiting.set(report.block, report.digests);
        break;
      case "zero":
        this.#waiting.set(report.block, report.count);
        break;
      case "piece":
        this.#piece(report.offset, report.bytes);
        break;
    }
    this.#drain();
  }

  #piece(offset: number, bytes: Uint8Array): void {
    let at = 0;
    while (at < bytes.length) {
      const position = offset + at;
      const block = Math.floor(position / this.#blockSize);
      const start = block * this.#blockSize;
      const length = Math.min(this.#blockSize, this.#size - start);
      let partial = this.#partials.get(block);
      if (!partial) {
        partial = { bytes: new Uint8Array(length), seen: new Uint8Array(length), left: length };
        this.#partials.set(block, partial);
      }
      const n = Math.min(bytes.length - at, start + length - position);
      const from = position - start;
      partial.bytes.set(bytes.subarray(at, at + n), from);
      for (let i = from; i < from + n; i++) {
        if (partial.seen[i] === 0) {
          partial.seen[i] = 1;
          partial.left--;
        }
      }
      if (partial.left === 0) {
        this.#partials.delete(block);
        this.#waiting.set(
          block,
          new Uint8Array(createHash("sha256").update(partial.bytes).digest()),
        );
      }
      at += n;
    }
  }

  #drain(): void {
    for (;;) {
      const entry = this.#waiting.get(this.#next);
      if (entry === undefined) return;
      this.#waiting.delete(this.#next);
      if (typeof entry === "number") {
        for (let i = 0; i < entry; i++) this.#outer.update(this.#wholeZero);
        this.#next += entry;
      } else {
        this.#outer.update(entry);
        this.#next += entry.length / 32;
      }
    }
  }

  /** The hex digest; throws unless every block was reported. */
  digest(): string {
    if (this.#next !== this.#blocks) {
      throw new Error(`blkhash: ${this.#next} of ${this.#blocks} blocks were hashed`);
    }
    const length = new Uint8Array(8);
    new DataView(length.buffer).setBigUint64(0, BigInt(this.#size), true);
    this.#outer.update(length);
    return this.#outer.digest("hex");
  }
}

/**
 * A destination that computes blkhash on every thread of a shared copy.
 * On the main thread it owns the collector; in a worker it sends its
 * reports to the main thread through `post`.
 */
export class BlkhashSink extends BaseEndpoint {
  readonly name = "checksum";
  readonly kind = "checksum";
  readonly size: number | undefined = undefined;
  readonly blockSize: BlockSize = { minimum: 1, preferred: 4096, maximum: 64 << 20 };
  override readonly synchronous = true;
  /** The collector, on the main thread. */
  readonly collector: BlkhashCollector | undefined;
  readonly #digester: BlockDigester;
  readonly #hashBlockSize: number;
  readonly #imageSize: number;

  /**
   * A sink for an image of `imageSize` bytes; with `post` (in a worker) the
   * reports go there, otherwise into this sink's own collector.
   */
  constructor(
    hashBlockSize: number,
    imageSize: number,
    post?: (report: BlockReport) => void,
  ) {
    super();
    this.#hashBlockSize = hashBlockSize;
    this.#imageSize = imageSize;
    if (post) this.collector = undefined;
    else this.collector = new BlkhashCollector(hashBlockSize, imageSize);
    const collector = this.collector;
    this.#digester = new BlockDigester(
      hashBlockSize,
      imageSize,
      post ?? ((report) => collector!.add(report)),
    );
  }

  /** Hashes the whole blocks of `buf` now; the buffer is free when this returns. */
  override write(buf: Uint8Array, offset: number): Promise<void> {
    this.#digester.write(buf, offset);
    return Promise.resolve();
  }

  /** Counts zero blocks. */
  override zero(offset: number, length: number): Promise<void> {
    this.#digester.zero(offset, length);
    return Promise.resolve();
  }

  /** Takes a worker's report (shares.ts). */
  override acceptShareMessage(payload: unknown): void {
    this.collector?.add(payload as BlockReport);
  }

  /** Every thread hashes its own parts. */
  override shareSpec(_threads?: number): ShareSpec {
    return { kind: "blkhash", blockSize: this.#hashBlockSize, size: this.#imageSize };
  }

  /** Nothing is written anywhere. */
  override incompleteNote(): string {
    return "no checksum was computed";
  }
}
