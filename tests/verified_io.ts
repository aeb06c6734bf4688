/**
 * Verified I/O on one NBD connection: a worker owns a region of the export
 * (so concurrent workers never race on a block), keeps many requests in
 * flight, and checks every byte it reads against what it last wrote there.
 * Block contents are generated from (worker, block, version), so the model
 * costs four bytes per block and any stale, torn or misplaced block is
 * detected. Used by the load test, by the fuzzer's well-behaved client and
 * by the durability tests.
 *
 * @module
 */

import type { PipelinedClient } from "./pipelined_client.ts";

/** The calls a worker makes: a PipelinedClient, or an adapter over another client. */
export type VerifiedClient = Pick<PipelinedClient, "read" | "write" | "flush">;

/** Figures one worker (or several, merged) collected. */
export interface IoStats {
  /** Requests completed (successfully or not). */
  requests: number;
  /** Successful READs. */
  reads: number;
  /** Successful WRITEs. */
  writes: number;
  /** Successful FLUSHes. */
  flushes: number;
  /** Payload bytes moved by successful READs and WRITEs. */
  bytes: number;
  /** Requests that failed (error reply or lost connection). */
  errors: number;
  /** Blocks whose contents differed from the model. */
  mismatches: number;
  /** Latency of every completed request, in milliseconds. */
  latencies: number[];
  /** The first few problems, for the report. */
  problems: string[];
}

/** Empty statistics. */
export function emptyStats(): IoStats {
  return {
    requests: 0,
    reads: 0,
    writes: 0,
    flushes: 0,
    bytes: 0,
    errors: 0,
    mismatches: 0,
    latencies: [],
    problems: [],
  };
}

/** Adds `from` into `into`. */
export function mergeStats(into: IoStats, from: IoStats): IoStats {
  into.requests += from.requests;
  into.reads += from.reads;
  into.writes += from.writes;
  into.flushes += from.flushes;
  into.bytes += from.bytes;
  into.errors += from.errors;
  into.mismatches += from.mismatches;
  for (const l of from.latencies) into.latencies.push(l);
  for (const p of from.problems) if (into.problems.length < 10) into.problems.push(p);
  return into;
}

/** Fills `out` with the contents of `block` at `version` for worker `worker` (version 0 = zeroes). */
export function blockContents(
  out: Uint8Array,
  worker: number,
  block: number,
  version: number,
): void {
  if (version === 0) {
    out.fill(0);
    return;
  }
  const words = new Uint32Array(out.buffer, out.byteOffset, out.byteLength >>> 2);
  // xorshift32 seeded from the triple; never 0.
  let x = (Math.imul(worker + 1, 0x9e3779b1) ^ Math.imul(block + 1, 0x85ebca77) ^
    Math.imul(version, 0xc2b2ae3d)) | 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x;
  }
}

/** Whether `data` holds the contents of `block` at `version`. */
export function checkBlock(
  data: Uint8Array,
  worker: number,
  block: number,
  version: number,
): boolean {
  const words = new Uint32Array(data.buffer, data.byteOffset, data.byteLength >>> 2);
  if (version === 0) {
    for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
    return true;
  }
  let x = (Math.imul(worker + 1, 0x9e3779b1) ^ Math.imul(block + 1, 0x85ebca77) ^
    Math.imul(version, 0xc2b2ae3d)) | 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    if (words[i] !== (x >>> 0)) return false;
  }
  return true;
}

/** Options of a verified worker. */
export interface VerifiedWorkerOptions {
  /** Worker number (part of the data pattern, so regions cannot be confused). */
  id: number;
  /** First byte of the region this worker owns (a multiple of blockSize). */
  regionStart: number;
  /** Blocks in the region. */
  regionBlocks: number;
  /** Block size in bytes (a multiple of 4). */
  blockSize: number;
  /** Largest request, in blocks (default 8). */
  maxBlocks?: number;
  /** Requests kept in flight (default 32). */
  inFlight?: number;
  /** Percentage of writes sent with FUA (default 5). */
  fuaPercent?: number;
  /** Percentage of requests that are FLUSH (default 1). */
  flushPercent?: number;
  /** Random seed (default: the id). */
  seed?: number;
}

/** One connection's verified I/O over its own region. */
export class VerifiedWorker {
  /** What this worker has done so far. */
  readonly stats: IoStats = emptyStats();
  readonly #client: VerifiedClient;
  readonly #o: Required<VerifiedWorkerOptions>;
  /** Last acknowledged version of each block. */
  readonly #versions: Uint32Array;
  /** Blocks with a request in flight. */
  readonly #busy: Uint8Array;
  /** Blocks whose state is unknown after a failed write (not checked again). */
  readonly #unknown: Uint8Array;
  #nextVersion = 1;
  #rand: number;

  /** Creates a worker over a negotiated connection. */
  constructor(client: VerifiedClient, options: VerifiedWorkerOptions) {
    this.#client = client;
    this.#o = {
      maxBlocks: 8,
      inFlight: 32,
      fuaPercent: 5,
      flushPercent: 1,
      seed: options.id + 1,
      ...options,
    };
    if (this.#o.blockSize % 4 !== 0) throw new RangeError("block size must be a multiple of 4");
    this.#versions = new Uint32Array(this.#o.regionBlocks);
    this.#busy = new Uint8Array(this.#o.regionBlocks);
    this.#unknown = new Uint8Array(this.#o.regionBlocks);
    this.#rand = (this.#o.seed * 2654435761) >>> 0 || 1;
  }

  /** The version last acknowledged for a block of the region (0 = never written). */
  version(block: number): number {
    return this.#versions[block]!;
  }

  /** Whether a block's contents are known (no write to it has failed). */
  known(block: number): boolean {
    return this.#unknown[block] === 0;
  }

  #random(n: number): number {
    let x = this.#rand;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.#rand = x >>> 0;
    return this.#rand % n;
  }

  #problem(message: string): void {
    if (this.stats.problems.length < 10) {
      this.stats.problems.push(`worker ${this.#o.id}: ${message}`);
    }
  }

  /** Picks a free run of blocks; undefined when none was found quickly. */
  #pick(): [number, number] | undefined {
    const { regionBlocks, maxBlocks } = this.#o;
    for (let attempt = 0; attempt < 8; attempt++) {
      const want = 1 + this.#random(maxBlocks);
      const start = this.#random(regionBlocks);
      let n = 0;
      while (n < want && start + n < regionBlocks && !this.#busy[start + n]) n++;
      if (n > 0) return [start, n];
    }
    return undefined;
  }

  /**
   * Keeps `inFlight` requests going until `stop()` returns true; then waits
   * for the outstanding ones. Errors and mismatches are counted, not thrown.
   */
  async run(stop: () => boolean): Promise<void> {
    const slot = async () => {
      while (!stop()) {
        if (!(await this.#one())) break;
      }
    };
    await Promise.all(Array.from({ length: this.#o.inFlight }, slot));
  }

  /** One request; resolves false if the connection is unusable. */
  async #one(): Promise<boolean> {
    const { blockSize, regionStart, id } = this.#o;
    const stats = this.stats;
    const roll = this.#random(100);
    const started = performance.now();
    if (roll < this.#o.flushPercent) {
      try {
        await this.#client.flush();
        stats.flushes++;
      } catch (error) {
        stats.errors++;
        this.#problem(`FLUSH: ${(error as Error).message}`);
        return false;
      } finally {
        stats.requests++;
        stats.latencies.push(performance.now() - started);
      }
      return true;
    }
    const picked = this.#pick();
    if (!picked) {
      // Everything nearby is busy: let other requests complete.
      await new Promise((r) => setTimeout(r, 0));
      return true;
    }
    const [start, count] = picked;
    for (let i = 0; i < count; i++) this.#busy[start + i] = 1;
    const offset = regionStart + start * blockSize;
    const length = count * blockSize;
    try {
      if (roll < 50) {
        const versions: number[] = [];
        const data = new Uint8Array(length);
        for (let i = 0; i < count; i++) {
          const v = this.#nextVersion++;
          versions.push(v);
          blockContents(data.subarray(i * blockSize, (i + 1) * blockSize), id, start + i, v);
        }
        const fua = this.#random(100) < this.#o.fuaPercent;
        try {
          await this.#client.write(data, offset, fua);
        } catch (error) {
          for (let i = 0; i < count; i++) this.#unknown[start + i] = 1;
          throw error;
        }
        for (let i = 0; i < count; i++) this.#versions[start + i] = versions[i]!;
        stats.writes++;
      } else {
        const data = await this.#client.read(offset, length);
        stats.reads++;
        for (let i = 0; i < count; i++) {
          const b = start + i;
          if (this.#unknown[b]) continue;
          const block = data.subarray(i * blockSize, (i + 1) * blockSize);
          if (!checkBlock(block, id, b, this.#versions[b]!)) {
            stats.mismatches++;
            this.#problem(
              `block ${b} (offset ${regionStart + b * blockSize}) is not version ${
                this.#versions[b]
              }`,
            );
          }
        }
      }
      stats.bytes += length;
      return true;
    } catch (error) {
      stats.errors++;
      this.#problem(
        `${roll < 50 ? "WRITE" : "READ"} ${offset}+${length}: ${(error as Error).message}`,
      );
      return false;
    } finally {
      stats.requests++;
      stats.latencies.push(performance.now() - started);
      for (let i = 0; i < count; i++) this.#busy[start + i] = 0;
    }
  }

  /** Reads the whole region back and checks every block; returns the mismatches found. */
  async sweep(chunkBlocks = 64): Promise<number> {
    const { blockSize, regionStart, regionBlocks, id } = this.#o;
    let bad = 0;
    for (let b = 0; b < regionBlocks; b += chunkBlocks) {
      const n = Math.min(chunkBlocks, regionBlocks - b);
      let data: Uint8Array;
      try {
        data = await this.#client.read(regionStart + b * blockSize, n * blockSize);
      } catch (error) {
        this.stats.errors++;
        this.#problem(`sweep READ: ${(error as Error).message}`);
        return bad;
      }
      for (let i = 0; i < n; i++) {
        if (this.#unknown[b + i]) continue;
        if (
          !checkBlock(
            data.subarray(i * blockSize, (i + 1) * blockSize),
            id,
            b + i,
            this.#versions[b + i]!,
          )
        ) {
          bad++;
          this.#problem(`sweep: block ${b + i} is not version ${this.#versions[b + i]}`);
        }
      }
    }
    this.stats.mismatches += bad;
    return bad;
  }

  /** Checks the region in a local copy of the export (e.g. the file after the server stopped). */
  checkImage(image: Uint8Array): number {
    const { blockSize, regionStart, regionBlocks, id } = this.#o;
    let bad = 0;
    for (let b = 0; b < regionBlocks; b++) {
      if (this.#unknown[b]) continue;
      const at = regionStart + b * blockSize;
      if (!checkBlock(image.subarray(at, at + blockSize), id, b, this.#versions[b]!)) {
        bad++;
        this.#problem(`image: block ${b} is not version ${this.#versions[b]}`);
      }
    }
    this.stats.mismatches += bad;
    return bad;
  }
}
