/**
 * A buffered reader over a `ByteStream`: it pulls large chunks, lets the
 * caller parse every complete message already buffered, and reads large
 * payloads straight into caller-provided buffers.
 *
 * @module
 */

import type { ByteStream } from "./byte_stream.ts";

/** A payload at least this large is read straight into the caller's buffer. */
const LARGE_PAYLOAD = 64 * 1024;
/**
 * Refill size while large payloads are flowing: enough for the next header
 * and a little more. A full-capacity refill would pull most of the next
 * payload into the internal buffer, only to copy it out again.
 */
const SMALL_REFILL = 4096;
/**
 * Reads served by the source's synchronous path in a row before one goes
 * through the event loop: a stream that always has data would otherwise
 * run on microtasks alone and starve timers, signals and other I/O.
 */
const SYNC_READS_PER_TURN = 32;

/** The stream ended in the middle of a message. */
export class UnexpectedEofError extends Error {
  /** Creates the error; `what` names what was being read. */
  constructor(what = "data") {
    super(`Connection closed while reading ${what}`);
    this.name = "UnexpectedEofError";
  }
}

/** Buffered reader with exact-length reads. */
export class BufferedReader {
  #source: Pick<ByteStream, "read" | "tryRead" | "trySpliceToFile" | "takeStranded">;
  #syncReads = 0;
  #buf: Uint8Array;
  #start = 0;
  #end = 0;
  #eof = false;
  /** The last payload was large: keep refills small (see SMALL_REFILL). */
  #smallRefill = false;
  /**
   * The last payload went into a file with splice: refills stop at what was
   * asked for, so that the next payload is still on the socket for splice.
   */
  #exactRefill = false;
  /** A DataView over the whole internal buffer, for parsing headers in place. */
  readonly view: DataView;

  /** Creates a reader with an internal buffer of `capacity` bytes. */
  constructor(
    source: Pick<ByteStream, "read" | "tryRead" | "trySpliceToFile" | "takeStranded">,
    capacity = 256 * 1024,
  ) {
    this.#source = source;
    this.#buf = new Uint8Array(capacity);
    this.view = new DataView(this.#buf.buffer);
  }

  /** Bytes buffered and not yet consumed. */
  get buffered(): number {
    return this.#end - this.#start;
  }

  /** Position of the first unconsumed byte in `view`. */
  get position(): number {
    return this.#start;
  }

  /** Whether the source reported end of stream. */
  get eof(): boolean {
    return this.#eof;
  }

  /**
   * Makes sure `n` bytes (≤ capacity) are buffered. Resolves to false if the
   * stream ended with nothing buffered; throws `UnexpectedEofError` if it
   * ended part-way through.
   */
  async ensure(n: number, what?: string): Promise<boolean> {
    if (this.#end - this.#start >= n) return true;
    if (n > this.#buf.length) {
      throw new RangeError(`Cannot buffer ${n} bytes: capacity is ${this.#buf.length}`);
    }
    if (this.#start + n > this.#buf.length) {
      this.#buf.copyWithin(0, this.#start, this.#end);
      this.#end -= this.#start;
      this.#start = 0;
    }
    while (this.#end - this.#start < n) {
      if (this.#eof) {
        if (this.#end === this.#start) return false;
        throw new UnexpectedEofError(what);
      }
      const limit = this.#exactRefill
        ? this.#start + n
        : this.#smallRefill
        ? Math.min(this.#buf.length, Math.max(this.#end + SMALL_REFILL, this.#start + n))
        : this.#buf.length;
      const read = this.#read(this.#buf.subarray(this.#end, limit));
      // A synchronous result needs no trip through the microtask queue.
      const count = typeof read === "object" && read !== null ? await read : read;
      if (count === null || count === 0) {
        if (count === null) this.#eof = true;
        continue;
      }
      this.#end += count;
    }
    return true;
  }

  /** One read from the source: synchronous when it can, but not forever in a row. */
  #read(buf: Uint8Array): Promise<number | null> | number | null {
    if (this.#source.tryRead && this.#syncReads < SYNC_READS_PER_TURN) {
      const count = this.#source.tryRead(buf);
      if (count !== undefined) {
        this.#syncReads++;
        return count;
      }
    }
    this.#syncReads = 0;
    return this.#source.read(buf);
  }

  /** A view of the next `n` buffered bytes (call `ensure` first); valid until the next read. */
  peek(n: number): Uint8Array {
    return this.#buf.subarray(this.#start, this.#start + n);
  }

  /** Marks `n` buffered bytes as consumed. */
  consume(n: number): void {
    this.#start += n;
    if (this.#start === this.#end) this.#start = this.#end = 0;
  }

  /** Fills `dst` completely: buffered bytes first, the rest read directly into it. */
  async readInto(dst: Uint8Array, what?: string): Promise<void> {
    this.#smallRefill = dst.length >= LARGE_PAYLOAD;
    this.#exactRefill = false;
    const fromBuffer = Math.min(dst.length, this.#end - this.#start);
    if (fromBuffer > 0) {
      dst.set(this.#buf.subarray(this.#start, this.#start + fromBuffer));
      this.consume(fromBuffer);
    }
    let filled = fromBuffer;
    while (filled < dst.length) {
      if (this.#eof) throw new UnexpectedEofError(what);
      const read = this.#read(dst.subarray(filled));
      const count = typeof read === "object" && read !== null ? await read : read;
      if (count === null) {
        this.#eof = true;
        throw new UnexpectedEofError(what);
      }
      filled += count;
    }
  }

  /** Whether the source can move payloads into files itself (`receiveToFile`). */
  get splices(): boolean {
    return this.#source.trySpliceToFile !== undefined;
  }

  /**
   * Receives `length` bytes into the open file `file` at `offset`: what has
   * arrived goes straight from the socket into the file (splice), the rest
   * is read into `scratch` and written with `write` (which buffered bytes
   * take too). Every byte is consumed even when writing fails; resolves to
   * the first failure of `write`, or undefined. Needs `splices`.
   */
  async receiveToFile(
    file: number,
    offset: number,
    length: number,
    write: (buf: Uint8Array, offset: number) => Promise<void>,
    scratch: Uint8Array,
    what?: string,
  ): Promise<unknown> {
    this.#smallRefill = true;
    this.#exactRefill = true;
    let failure: unknown;
    const put = async (buf: Uint8Array, at: number) => {
      if (failure !== undefined) return;
      try {
        await write(buf, offset + at);
      } catch (error) {
        failure = error ?? new Error("write failed");
      }
    };
    let done = Math.min(length, this.#end - this.#start);
    if (done > 0) {
      await put(this.#buf.subarray(this.#start, this.#start + done), 0);
      this.consume(done);
    }
    const source = this.#source;
    while (done < length) {
      if (failure !== undefined) {
        this.#exactRefill = false;
        await this.skip(length - done, what);
        break;
      }
      const n = source.trySpliceToFile!(file, offset + done, length - done);
      const stranded = source.takeStranded?.();
      if (n > 0) done += n;
      if (stranded) {
        await put(stranded, done);
        done += stranded.length;
        continue;
      }
      if (n > 0) continue;
      if (n === 0 || this.#eof) {
        this.#eof = true;
        throw new UnexpectedEofError(what);
      }
      // Nothing there now: wait through an ordinary read, and splice again after it.
      const count = await source.read(scratch.subarray(0, Math.min(scratch.length, length - done)));
      if (count === null) {
        this.#eof = true;
        throw new UnexpectedEofError(what);
      }
      await put(scratch.subarray(0, count), done);
      done += count;
    }
    return failure;
  }

  /** Reads exactly `n` bytes into a new buffer. */
  async readExact(n: number, what?: string): Promise<Uint8Array> {
    const out = new Uint8Array(n);
    await this.readInto(out, what);
    return out;
  }

  /** Reads and discards `n` bytes without allocating more than the buffer. */
  async skip(n: number, what?: string): Promise<void> {
    let left = n;
    while (left > 0) {
      if (this.#end === this.#start && !(await this.ensure(1, what))) {
        throw new UnexpectedEofError(what);
      }
      const take = Math.min(left, this.#end - this.#start);
      this.consume(take);
      left -= take;
    }
  }
}
