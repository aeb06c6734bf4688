/**
 * Checksums of what the copy engine reads: plain SHA-256 of the whole
 * content, and blkhash (Nir Soffer's block-based construction, the one
 * nbdcopy's `--blkhash` computes). Both are fed in offset order, holes
 * included: zero runs the source reports are hashed from memory without
 * being read.
 *
 * Two ways in: `HashSink` is a destination that hashes what it is given
 * (`nbd checksum`, `nbd copy --checksum SRC null:`), and `HashingSource`
 * wraps a source so that a copy hashes what it reads on the way.
 *
 * @module
 */

import { createHash } from "node:crypto";
import type { BlockSize } from "../protocol/handshake.ts";
import type { ChecksumAlgorithm } from "./checksum_names.ts";
import { ZERO_BUFFER } from "../util/zero_buffer.ts";
import type { CopyExtent, Endpoint, ShareSpec } from "./endpoint.ts";
import { BaseEndpoint } from "./endpoint.ts";
import { rangeIsZero } from "./zero_scan.ts";

export { CHECKSUM_ALGORITHMS, type ChecksumAlgorithm, parseAlgorithm } from "./checksum_names.ts";

/** blkhash's default block size, which the published test vectors use. */
export const BLKHASH_BLOCK_SIZE = 64 * 1024;

/** An incremental hash over a byte stream, with a fast path for runs of zeroes. */
export interface Hasher {
  /** Adds `data`, which may be reused as soon as the call returns. */
  update(data: Uint8Array): void;
  /** Adds `length` zero bytes. */
  zero(length: number): void;
  /** The digest as lower-case hex (after `settle`); the hasher cannot be used afterwards. */
  digest(): string;
  /**
   * A hasher that works in the background: a promise while it wants the
   * producer to wait before giving more, undefined when it may go on.
   */
  ready?(): Promise<void> | undefined;
  /** A hasher that works in the background: resolves once everything given is hashed. */
  settle?(): Promise<void>;
}

/** Creates the hasher for `algorithm`. */
export function createHasher(algorithm: ChecksumAlgorithm): Hasher {
  return algorithm === "sha256" ? new Sha256Hasher() : new BlkHasher();
}

/** SHA-256 of the raw bytes, equal to `sha256sum`'s. */
export class Sha256Hasher implements Hasher {
  readonly #hash = createHash("sha256");

  /** Adds `data`. */
  update(data: Uint8Array): void {
    this.#hash.update(data);
  }

  /** Zeroes still go through the compression function, but need no memory of their own. */
  zero(length: number): void {
    while (length > 0) {
      const n = Math.min(length, ZERO_BUFFER.length);
      this.#hash.update(ZERO_BUFFER.subarray(0, n));
      length -= n;
    }
  }

  /** The hex digest. */
  digest(): string {
    return this.#hash.digest("hex");
  }
}

/**
 * blkhash: the content is cut into blocks of `blockSize` bytes (the last
 * may be short); the digest is SHA-256 over the SHA-256 of each block, in
 * order, followed by the content length as a 64-bit little-endian number.
 * A whole zero block's digest is computed once, so holes and zero blocks
 * cost 32 bytes of outer hashing each; a short last block is hashed as
 * the data it is, zero or not.
 */
export class BlkHasher implements Hasher {
  readonly #blockSize: number;
  readonly #outer = createHash("sha256");
  /** The digest of one whole zero block, repeated, to add runs of zero blocks in one call. */
  readonly #zeroDigests: Uint8Array;
  readonly #pending: Uint8Array;
  readonly #pendingWords: Int32Array;
  #pendingLength = 0;
  #length = 0;

  /** A hasher with `blockSize`-byte blocks (even, as blkhash requires). */
  constructor(blockSize = BLKHASH_BLOCK_SIZE) {
    if (blockSize < 2 || blockSize % 2 !== 0) throw new Error("blkhash block size must be even");
    this.#blockSize = blockSize;
    const zero = createHash("sha256");
    for (let left = blockSize; left > 0; left -= ZERO_BUFFER.length) {
      zero.update(ZERO_BUFFER.subarray(0, Math.min(left, ZERO_BUFFER.length)));
    }
    const one = zero.digest();
    this.#zeroDigests = new Uint8Array(one.length * 1024);
    for (let i = 0; i < 1024; i++) this.#zeroDigests.set(one, i * one.length);
    this.#pending = new Uint8Array(blockSize);
    this.#pendingWords = new Int32Array(this.#pending.buffer);
  }

  #zeroBlocks(count: number): void {
    const per = this.#zeroDigests.length / 32;
    while (count > 0) {
      const n = Math.min(count, per);
      this.#outer.update(this.#zeroDigests.subarray(0, n * 32));
      count -= n;
    }
  }

  #block(bytes: Uint8Array, words: Int32Array | undefined): void {
    if (
      bytes.length === this.#blockSize && words !== undefined &&
      rangeIsZero(bytes, words, 0, bytes.length)
    ) {
      this.#zeroBlocks(1);
    } else {
      this.#outer.update(createHash("sha256").update(bytes).digest());
    }
  }

  /** Adds `data`: whole blocks are hashed now, the rest waits for more. */
  update(data: Uint8Array): void {
    this.#length += data.length;
    let at = 0;
    if (this.#pendingLength > 0) {
      const n = Math.min(data.length, this.#blockSize - this.#pendingLength);
      this.#pending.set(data.subarray(0, n), this.#pendingLength);
      this.#pendingLength += n;
      at = n;
      if (this.#pendingLength === this.#blockSize) {
        this.#block(this.#pending, this.#pendingWords);
        this.#pendingLength = 0;
      }
    }
    // Whole blocks are checked for zeroes in place when the data is 4-byte aligned.
    const aligned = (data.byteOffset + at) % 4 === 0;
    while (data.length - at >= this.#blockSize) {
      const block = data.subarray(at, at + this.#blockSize);
      const words = aligned
        ? new Int32Array(block.buffer, block.byteOffset, this.#blockSize >>> 2)
        : undefined;
      this.#block(block, words);
      at += this.#blockSize;
    }
    if (at < data.length) {
      this.#pending.set(data.subarray(at), 0);
      this.#pendingLength = data.length - at;
    }
  }

  /** Adds `length` zeroes: whole zero blocks are never materialised. */
  zero(length: number): void {
    this.#length += length;
    if (this.#pendingLength > 0) {
      const n = Math.min(length, this.#blockSize - this.#pendingLength);
      this.#pending.fill(0, this.#pendingLength, this.#pendingLength + n);
      this.#pendingLength += n;
      length -= n;
      if (this.#pendingLength === this.#blockSize) {
        this.#block(this.#pending, this.#pendingWords);
        this.#pendingLength = 0;
      }
    }
    const blocks = Math.floor(length / this.#blockSize);
    this.#zeroBlocks(blocks);
    const rest = length - blocks * this.#blockSize;
    if (rest > 0) {
      this.#pending.fill(0, 0, rest);
      this.#pendingLength = rest;
    }
  }

  /** The hex digest: a short last block, then the length. */
  digest(): string {
    if (this.#pendingLength > 0) {
      this.#block(this.#pending.subarray(0, this.#pendingLength), undefined);
      this.#pendingLength = 0;
    }
    const length = new Uint8Array(8);
    new DataView(length.buffer).setBigUint64(0, BigInt(this.#length), true);
    this.#outer.update(length);
    return this.#outer.digest("hex");
  }
}

/** A piece waiting for its turn in `OrderedFeed`. */
interface Piece {
  offset: number;
  /** The data; undefined for zeroes. */
  data: Uint8Array | undefined;
  length: number;
  done: () => void;
}

/**
 * Feeds a hasher in offset order from pieces that arrive in any order:
 * each piece is held (its promise unresolved, so its buffer stays
 * untouched) until everything before it has been hashed. Pieces may
 * overlap what was already hashed (a read of the data edge of a zero run);
 * only what is new is hashed. Ranges known to be zero fill the gaps they
 * cover without waiting for a piece.
 */
export class OrderedFeed {
  readonly #hasher: Hasher;
  #next = 0;
  #waiting: Piece[] = [];
  /** Known zero ranges not yet passed, in offset order: [offset, end]. */
  #zeroes: [number, number][] = [];
  #failed: Error | undefined;
  #rejects = new Set<(error: Error) => void>();

  /** Feeds `hasher`. */
  constructor(hasher: Hasher) {
    this.#hasher = hasher;
  }

  /** Bytes hashed so far (everything before this offset). */
  get hashed(): number {
    return this.#next;
  }

  /** Data at `offset`; resolves once hashed (the buffer is then free). */
  data(offset: number, data: Uint8Array): Promise<void> {
    return this.#add(offset, data, data.length);
  }

  /** Zeroes at `offset`; resolves once hashed. */
  zeroes(offset: number, length: number): Promise<void> {
    return this.#add(offset, undefined, length);
  }

  /** Declares that `[offset, offset + length)` reads as zero, whether or not a piece covers it. */
  knownZero(offset: number, length: number): void {
    if (length <= 0) return;
    const last = this.#zeroes[this.#zeroes.length - 1];
    if (last && last[1] === offset) last[1] += length;
    else this.#zeroes.push([offset, offset + length]);
    this.#drain();
  }

  /** Fails every piece still waiting, and any that come later. */
  abort(reason: Error): void {
    this.#failed ??= reason;
    for (const reject of this.#rejects) reject(reason);
    this.#rejects.clear();
    this.#waiting = [];
  }

  #add(offset: number, data: Uint8Array | undefined, length: number): Promise<void> {
    if (this.#failed) return Promise.reject(this.#failed);
    return new Promise((resolve, reject) => {
      const piece: Piece = {
        offset,
        data,
        length,
        done: () => {
          this.#rejects.delete(reject);
          resolve();
        },
      };
      this.#rejects.add(reject);
      this.#waiting.push(piece);
      this.#drain();
    });
  }

  #drain(): void {
    for (;;) {
      const next = this.#next;
      const index = this.#waiting.findIndex((p) => p.offset <= next);
      if (index >= 0) {
        const piece = this.#waiting[index]!;
        this.#waiting.splice(index, 1);
        const skip = next - piece.offset;
        if (skip < piece.length) {
          if (piece.data) this.#hasher.update(piece.data.subarray(skip));
          else this.#hasher.zero(piece.length - skip);
          this.#next = piece.offset + piece.length;
        }
        // The data was taken (copied or hashed); a hasher working in the
        // background may still ask the producer to wait.
        const wait = this.#hasher.ready?.();
        if (wait) wait.then(piece.done, (error: Error) => this.abort(error));
        else piece.done();
        continue;
      }
      while (this.#zeroes.length > 0 && this.#zeroes[0]![1] <= next) this.#zeroes.shift();
      const zero = this.#zeroes[0];
      if (zero && zero[0] <= next) {
        this.#hasher.zero(zero[1] - next);
        this.#next = zero[1];
        this.#zeroes.shift();
        continue;
      }
      return;
    }
  }
}

/**
 * A destination that hashes what it is given, in offset order, and keeps
 * nothing. Zero runs come as zero requests (it does not claim to read as
 * zero), so every byte of the image reaches it.
 */
export class HashSink extends BaseEndpoint {
  readonly name = "checksum";
  readonly kind = "checksum";
  readonly size: number | undefined = undefined;
  readonly blockSize: BlockSize = { minimum: 1, preferred: 4096, maximum: 64 << 20 };
  override readonly synchronous = true;
  /** The feed; its `hashed` is the length of the content once the copy ended. */
  readonly feed: OrderedFeed;

  /** Hashes into `hasher`. */
  constructor(hasher: Hasher) {
    super();
    this.feed = new OrderedFeed(hasher);
  }

  /** Hashes `buf` once its turn comes. */
  override write(buf: Uint8Array, offset: number): Promise<void> {
    return this.feed.data(offset, buf);
  }

  /** Hashes zeroes once their turn comes. */
  override zero(offset: number, length: number): Promise<void> {
    return this.feed.zeroes(offset, length);
  }

  /** Nothing to make durable. */
  override flush(): Promise<void> {
    return Promise.resolve();
  }

  /** The length of a stream is what was hashed. */
  override finish(): Promise<void> {
    return Promise.resolve();
  }

  /** Releases the pieces still waiting. */
  override abort(reason: Error): void {
    this.feed.abort(reason);
  }

  /** Nothing is written anywhere. */
  override incompleteNote(): string {
    return "no checksum was computed";
  }
}

/**
 * A source that hashes what a copy reads from it, in offset order: reads
 * are held until everything before them was hashed, and the zero runs its
 * extents report are hashed without being read. One thread only (it
 * offers no share spec).
 */
export class HashingSource implements Endpoint {
  readonly #inner: Endpoint;
  /** The feed; its `hashed` is the length of the content once the copy ended. */
  readonly feed: OrderedFeed;

  /** Wraps `inner`, hashing into `hasher`. */
  constructor(inner: Endpoint, hasher: Hasher) {
    this.#inner = inner;
    this.feed = new OrderedFeed(hasher);
  }

  /** The wrapped source. */
  get inner(): Endpoint {
    return this.#inner;
  }
  /** The source's name. */
  get name(): string {
    return this.#inner.name;
  }
  /** The source's kind. */
  get kind(): string {
    return this.#inner.kind;
  }
  /** The source's size. */
  get size(): number | undefined {
    return this.#inner.size;
  }
  /** As the source. */
  get sequential(): boolean {
    return this.#inner.sequential;
  }
  /** As the source. */
  get blockSize(): BlockSize {
    return this.#inner.blockSize;
  }
  /** As the source. */
  get canExtents(): boolean {
    return this.#inner.canExtents;
  }
  /** As the source. */
  get isZero(): boolean {
    return this.#inner.isZero;
  }
  /** As the source. */
  get discards(): boolean {
    return this.#inner.discards;
  }
  /** As the source. */
  get synchronous(): boolean {
    return this.#inner.synchronous;
  }
  /** As the source. */
  get maxReads(): number | undefined {
    return this.#inner.maxReads;
  }
  /** As the source. */
  get maxBytesInFlight(): number | undefined {
    return this.#inner.maxBytesInFlight;
  }

  /** Reads, then waits for the data's turn to be hashed. */
  async read(buf: Uint8Array, offset: number): Promise<number> {
    const n = await this.#inner.read(buf, offset);
    if (n > 0) await this.feed.data(offset, buf.subarray(0, n));
    return n;
  }

  /** The source's extents; the zero runs among them are hashed without reads. */
  async extents(offset: number, length: number): Promise<CopyExtent[]> {
    const extents = await this.#inner.extents(offset, length);
    for (const extent of extents) {
      if (extent.zero) this.feed.knownZero(extent.offset, extent.length);
    }
    return extents;
  }

  /** A source is not written. */
  write(buf: Uint8Array, offset: number, headroom?: boolean, sent?: () => void): Promise<void> {
    return this.#inner.write(buf, offset, headroom, sent);
  }
  /** A source is not written. */
  zero(offset: number, length: number, allocate: boolean): Promise<void> {
    return this.#inner.zero(offset, length, allocate);
  }
  /** As the source. */
  flush(): Promise<void> {
    return this.#inner.flush();
  }
  /** As the source. */
  finish(size: number): Promise<void> {
    return this.#inner.finish(size);
  }
  /** Releases the held reads too. */
  abort(reason: Error): void {
    this.feed.abort(reason);
    this.#inner.abort(reason);
  }
  /** Closes the source. */
  close(complete: boolean): Promise<void> {
    return this.#inner.close(complete);
  }
  /** As the source. */
  incompleteNote(): string {
    return this.#inner.incompleteNote();
  }
  /** Not shared between threads: the hash needs every byte in one place. */
  shareSpec(): ShareSpec | undefined {
    return undefined;
  }
  /** As the source. */
  useConnections(connections?: number): Promise<void> {
    return this.#inner.useConnections(connections);
  }
}
