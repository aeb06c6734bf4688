/**
 * In-memory endpoints for the copy engine's unit tests: a source with
 * chosen contents and extents, and a destination that records every
 * request. Both can answer after random delays (so requests complete out
 * of order) and fail at a chosen offset.
 *
 * @module
 */

import type { BlockSize } from "../protocol/handshake.ts";
import { BaseEndpoint, type CopyExtent } from "./endpoint.ts";
import { DEFAULT_BLOCK_SIZE } from "../core/backend.ts";

/** Options shared by the test endpoints. */
export interface MemoryOptions {
  /** Block sizes to advertise. */
  blockSize?: BlockSize;
  /** Delay every request by up to this many milliseconds (random). */
  jitterMs?: number;
  /** Fail the request that covers this offset. */
  failAt?: number;
  /** Error thrown by a failing request. */
  error?: Error;
}

function delay(jitterMs: number | undefined): Promise<void> {
  if (!jitterMs) return Promise.resolve();
  return new Promise((resolve) => setTimeout(resolve, Math.random() * jitterMs));
}

/** A source over a byte array, with optional extents (runs not listed are data). */
export class MemorySource extends BaseEndpoint {
  readonly name = "memory-source";
  readonly kind = "memory";
  readonly size: number;
  readonly blockSize: BlockSize;
  override readonly canExtents: boolean;
  /** Every read, in the order issued. */
  readonly reads: Array<{ offset: number; length: number }> = [];
  /** Every extents query. */
  readonly queries: Array<{ offset: number; length: number }> = [];
  /** Largest number of reads in flight at once. */
  maxInFlight = 0;
  #inFlight = 0;
  readonly #data: Uint8Array;
  readonly #zeroRuns: CopyExtent[] | undefined;
  readonly #options: MemoryOptions;

  /** `zeroRuns` are the runs that block status reports as zero (undefined: no extents). */
  constructor(data: Uint8Array, zeroRuns?: CopyExtent[], options: MemoryOptions = {}) {
    super();
    this.#data = data;
    this.size = data.length;
    this.#zeroRuns = zeroRuns;
    this.canExtents = zeroRuns !== undefined;
    this.blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
    this.#options = options;
  }

  override async read(buf: Uint8Array, offset: number): Promise<number> {
    this.reads.push({ offset, length: buf.length });
    this.#inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.#inFlight);
    try {
      await delay(this.#options.jitterMs);
      const failAt = this.#options.failAt;
      if (failAt !== undefined && offset <= failAt && failAt < offset + buf.length) {
        throw this.#options.error ?? new Error("injected read error");
      }
      buf.set(this.#data.subarray(offset, offset + buf.length));
      return buf.length;
    } finally {
      this.#inFlight--;
    }
  }

  override async extents(offset: number, length: number): Promise<CopyExtent[]> {
    this.queries.push({ offset, length });
    await delay(this.#options.jitterMs);
    // Report in pieces of at most 1 MiB, as servers often do, so windows are exercised.
    const end = Math.min(offset + length, offset + (1 << 20), this.size);
    const out: CopyExtent[] = [];
    let position = offset;
    for (const run of this.#zeroRuns ?? []) {
      const runEnd = run.offset + run.length;
      if (runEnd <= position || run.offset >= end) continue;
      if (run.offset > position) {
        out.push({ offset: position, length: run.offset - position, zero: false });
        position = run.offset;
      }
      const stop = Math.min(runEnd, end);
      out.push({ offset: position, length: stop - position, zero: true });
      position = stop;
    }
    if (position < end) out.push({ offset: position, length: end - position, zero: false });
    return out;
  }
}

/** A destination over a byte array that records what was asked of it. */
export class MemoryDestination extends BaseEndpoint {
  readonly name = "memory-destination";
  readonly kind = "memory";
  readonly size: number | undefined;
  readonly blockSize: BlockSize;
  override readonly isZero: boolean;
  override readonly sequential: boolean;
  /** The contents. */
  data: Uint8Array;
  /** Every write, in completion order. */
  readonly writes: Array<{ offset: number; length: number }> = [];
  /** Every zero request, in completion order. */
  readonly zeroes: Array<{ offset: number; length: number; allocate: boolean }> = [];
  /** Final size given to `finish`. */
  finished: number | undefined;
  /** Whether abort() was called. */
  aborted = false;
  readonly #options: MemoryOptions;

  /** A destination of `size` bytes (undefined: grows as written), initially filled with `fill`. */
  constructor(
    size: number | undefined,
    options: MemoryOptions & { isZero?: boolean; fill?: number; sequential?: boolean } = {},
  ) {
    super();
    this.size = size;
    this.data = new Uint8Array(size ?? 0).fill(options.fill ?? 0);
    this.isZero = options.isZero ?? false;
    this.sequential = options.sequential ?? false;
    this.blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
    this.#options = options;
  }

  #check(offset: number, length: number): void {
    const failAt = this.#options.failAt;
    if (failAt !== undefined && offset <= failAt && failAt < offset + length) {
      throw this.#options.error ?? new Error("injected write error");
    }
    if (offset + length > this.data.length) {
      // A destination without a size grows.
      const grown = new Uint8Array(offset + length);
      grown.set(this.data);
      this.data = grown;
    }
  }

  override async write(buf: Uint8Array, offset: number): Promise<void> {
    await delay(this.#options.jitterMs);
    this.#check(offset, buf.length);
    this.data.set(buf, offset);
    this.writes.push({ offset, length: buf.length });
  }

  override async zero(offset: number, length: number, allocate: boolean): Promise<void> {
    await delay(this.#options.jitterMs);
    this.#check(offset, length);
    this.data.fill(0, offset, offset + length);
    this.zeroes.push({ offset, length, allocate });
  }

  override finish(size: number): Promise<void> {
    this.finished = size;
    return Promise.resolve();
  }

  override abort(): void {
    this.aborted = true;
  }
}

/** Reproducible bytes with zero runs at the given places (the rest is never zero). */
export function patterned(size: number, zeroRuns: CopyExtent[] = []): Uint8Array {
  const data = new Uint8Array(size);
  for (let i = 0; i < size; i++) data[i] = ((i * 7 + (i >> 12)) % 255) + 1;
  for (const run of zeroRuns) data.fill(0, run.offset, run.offset + run.length);
  return data;
}

/** A stream reader over `data`, in pieces of up to 64 KiB (for a `StreamSource`). */
export function streamOf(data: Uint8Array): { read(buf: Uint8Array): Promise<number | null> } {
  let position = 0;
  return {
    read(buf: Uint8Array): Promise<number | null> {
      if (position >= data.length) return Promise.resolve(null);
      const n = Math.min(buf.length, 64 * 1024, data.length - position);
      buf.set(data.subarray(position, position + n));
      position += n;
      return Promise.resolve(n);
    },
  };
}

/** A 4 MiB sparse file at `path` with data at 1 MiB and in the last 4 KiB; returns its bytes. */
export async function sparseFile(path: string): Promise<Uint8Array> {
  const MiB = 1 << 20;
  const expected = new Uint8Array(4 * MiB);
  const a = patterned(64 * 1024);
  const b = patterned(4096).reverse();
  expected.set(a, MiB);
  expected.set(b, 4 * MiB - 4096);
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  await file.truncate(4 * MiB);
  await file.seek(MiB, Deno.SeekMode.Start);
  await file.write(a);
  await file.seek(4 * MiB - 4096, Deno.SeekMode.Start);
  await file.write(b);
  file.close();
  return expected;
}
