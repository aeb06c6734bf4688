/**
 * Stream endpoints: stdin (`-` as the source), stdout (`-` as the
 * destination), and FIFOs or character devices named by path. Streams
 * are sequential: requests may be issued together, but each waits for its
 * turn (everything before its offset), so the bytes go through in order.
 * A stream source has no size until it ends.
 *
 * @module
 */

import { enlargePipe } from "../io/pipes.ts";
import { writeAll } from "../io/byte_stream.ts";
import type { BlockSize } from "../protocol/handshake.ts";
import { ZERO_BUFFER } from "../util/zero_buffer.ts";
import { BaseEndpoint } from "./endpoint.ts";
import { Turns } from "./turns.ts";

/** Block sizes of a stream: any length, in pieces of a pipe-friendly size. */
const STREAM_BLOCK_SIZE: BlockSize = { minimum: 1, preferred: 64 * 1024, maximum: 64 << 20 };

/** Something bytes can be read from in order. */
export interface StreamReader {
  /** Reads into `buf`; resolves to the count, or null at the end. */
  read(buf: Uint8Array): Promise<number | null>;
  /** Closes the stream (absent for stdin, which is not ours to close). */
  close?(): void;
}

/** Something bytes can be written to in order. */
export interface StreamWriter {
  /** Writes some of `buf`; resolves to the count written. */
  write(buf: Uint8Array): Promise<number>;
  /** Closes the stream (absent for stdout). */
  close?(): void;
}

/**
 * A source read in order. Its size is known once it ends, or from the
 * start when the stream announces it (an http response's length): then
 * a stream that ends early is an error, not a shorter image.
 */
export class StreamSource extends BaseEndpoint {
  readonly name: string;
  readonly kind: string;
  readonly size: number | undefined;
  override readonly sequential = true;
  readonly blockSize: BlockSize = STREAM_BLOCK_SIZE;
  readonly #reader: StreamReader;
  readonly #turns = new Turns();

  /** Reads from `reader`; `name` is used in messages, `size` is the announced length. */
  constructor(name: string, reader: StreamReader, options: { size?: number; kind?: string } = {}) {
    super();
    this.name = name;
    this.#reader = reader;
    this.size = options.size;
    this.kind = options.kind ?? "pipe";
  }

  /** Fills `buf` with the bytes at `offset` once all earlier bytes were read; short at the end. */
  override async read(buf: Uint8Array, offset: number): Promise<number> {
    await this.#turns.wait(offset);
    if (this.#turns.ended) return 0;
    let done = 0;
    while (done < buf.length) {
      const n = await this.#reader.read(buf.subarray(done));
      if (n === null) break;
      done += n;
    }
    if (done < buf.length && this.size !== undefined && offset + done < this.size) {
      const error = new Error(
        `the stream ended after ${offset + done} of the ${this.size} bytes announced`,
      );
      this.#turns.abort(error);
      throw error;
    }
    this.#turns.advance(offset + done);
    if (done < buf.length) this.#turns.open();
    return done;
  }

  /** Wakes requests waiting for their turn. */
  override abort(reason: Error): void {
    this.#turns.abort(reason);
  }

  /** Closes the stream if it was opened for this copy. */
  override close(): Promise<void> {
    try {
      this.#reader.close?.();
    } catch { /* already closed */ }
    return Promise.resolve();
  }
}

/** A destination written in order. */
export class StreamDestination extends BaseEndpoint {
  readonly name: string;
  readonly kind = "pipe";
  readonly size: number | undefined = undefined;
  override readonly sequential = true;
  readonly blockSize: BlockSize = STREAM_BLOCK_SIZE;
  readonly #writer: StreamWriter;
  readonly #turns = new Turns();

  /** Writes to `writer`; `name` is used in messages. */
  constructor(name: string, writer: StreamWriter) {
    super();
    this.name = name;
    this.#writer = writer;
  }

  /** Writes `buf` once everything before `offset` was written. */
  override async write(buf: Uint8Array, offset: number): Promise<void> {
    await this.#turns.wait(offset);
    await writeAll(this.#writer, buf);
    this.#turns.advance(offset + buf.length);
  }

  /** A stream has no holes: zeroes are written out. */
  override async zero(offset: number, length: number): Promise<void> {
    await this.#turns.wait(offset);
    for (let done = 0; done < length;) {
      const n = Math.min(ZERO_BUFFER.length, length - done);
      await writeAll(this.#writer, ZERO_BUFFER.subarray(0, n));
      done += n;
    }
    this.#turns.advance(offset + length);
  }

  /** Wakes requests waiting for their turn. */
  override abort(reason: Error): void {
    this.#turns.abort(reason);
  }

  /** Closes the stream if it was opened for this copy. */
  override close(): Promise<void> {
    try {
      this.#writer.close?.();
    } catch { /* already closed */ }
    return Promise.resolve();
  }

  /** What a failed copy leaves: a truncated stream. */
  override incompleteNote(): string {
    return `the output to ${this.name} is incomplete`;
  }
}

const STDIN = 0;
const STDOUT = 1;

/** stdin as a source. */
export function stdinSource(): StreamSource {
  // When stdin is a pipe, its writer may then run ahead of the copy by a MiB.
  enlargePipe(STDIN);
  return new StreamSource("stdin", { read: (buf) => Deno.stdin.read(buf) });
}

/** stdout as a destination; refuses a terminal. */
export function stdoutDestination(): StreamDestination {
  if (Deno.stdout.isTerminal()) {
    throw new Error("refusing to write a disk image to a terminal (redirect stdout)");
  }
  enlargePipe(STDOUT);
  return new StreamDestination("stdout", { write: (buf) => Deno.stdout.write(buf) });
}
