/**
 * Writing command output to stdout: whole strings or bytes, looping over
 * partial writes, with a buffered writer for long streams such as hexdumps.
 *
 * @module
 */

import { writeAll } from "../io/byte_stream.ts";

const encoder = new TextEncoder();

/** Writes all of `text` to stdout. */
export async function writeStdout(text: string | Uint8Array): Promise<void> {
  await writeAll(Deno.stdout, typeof text === "string" ? encoder.encode(text) : text);
}

/** Collects text and writes it to a sink in large pieces. */
export class BufferedTextWriter {
  #parts: string[] = [];
  #length = 0;
  readonly #sink: (text: string) => Promise<void>;
  readonly #limit: number;

  /** Creates a writer sending to `sink` (default stdout) once `limit` characters are queued. */
  constructor(sink: (text: string) => Promise<void> = writeStdout, limit = 256 * 1024) {
    this.#sink = sink;
    this.#limit = limit;
  }

  /** Queues text; resolves once it is written if the queue was full. */
  async write(text: string): Promise<void> {
    this.#parts.push(text);
    this.#length += text.length;
    if (this.#length >= this.#limit) await this.flush();
  }

  /** Writes everything queued. */
  async flush(): Promise<void> {
    if (this.#parts.length === 0) return;
    const text = this.#parts.join("");
    this.#parts = [];
    this.#length = 0;
    await this.#sink(text);
  }
}
