/**
 * A verified-I/O worker that survives faults, for the chaos and soak
 * harnesses. Like `VerifiedWorker` it owns a region of the export and keeps
 * many requests in flight, but an error does not stop it: an error reply is
 * counted by its errno, a lost connection is reopened, and every request is
 * bounded by a watchdog, so a hang is counted rather than waited for.
 *
 * Its model of each block knows more than the last acknowledged version:
 * every version ever sent there, which of them failed (their data may or may
 * not have landed: the protocol leaves a failed write's range unspecified),
 * and the newest version made durable by an answered FLUSH or FUA write. A
 * block read back is therefore classed exactly:
 *
 * - the acknowledged version: good;
 * - a failed version, or sectors of several candidate versions after a
 *   failed write (a torn write): allowed, counted;
 * - an older acknowledged version: an acknowledged write was lost
 *   (`lostFlushedBytes` when it had been flushed);
 * - anything else: data nobody wrote there (`foreign`).
 *
 * @module
 */

import { DriverError, NbdReplyError, type PipelinedClient } from "./pipelined_client.ts";
import { blockContents, checkBlock } from "./verified_io.ts";
import * as C from "../protocol/constants.ts";

const SECTOR = 512;

/** A failed request that took this long waited for a timeout rather than failing at once. */
export const SLOW_FAILURE_MS = 900;

/** What the chaos workers saw, merged over workers. */
export interface ChaosStats {
  /** Requests completed, successfully or not. */
  requests: number;
  /** Successful READs. */
  reads: number;
  /** Successful WRITEs. */
  writes: number;
  /** Successful FLUSHes. */
  flushes: number;
  /** Successful WRITE_ZEROES. */
  zeroes: number;
  /** Error replies, by errno name. */
  errnos: Record<string, number>;
  /** Requests failed because the connection was lost. */
  connectionLosses: number;
  /** Connections reopened after a loss. */
  reconnects: number;
  /** Requests (or reconnections) that did not end within the watchdog bound. */
  hangs: number;
  /** Failed requests that took at least SLOW_FAILURE_MS (they waited for a timeout). */
  slowFailures: number;
  /** Bytes read back and found to be what the model allows. */
  bytesVerified: number;
  /** Blocks read back as a version whose write had failed (allowed). */
  failedWriteBlocks: number;
  /** Blocks read back torn between candidate versions after a failed write (allowed). */
  tornBlocks: number;
  /** Blocks holding data nobody wrote there. */
  foreign: number;
  /** Bytes of acknowledged writes found replaced by older data. */
  lostAckedBytes: number;
  /** Of those, bytes whose write had been made durable by FLUSH or FUA. */
  lostFlushedBytes: number;
  /** The first problems, for the report. */
  problems: string[];
}

/** Empty chaos statistics. */
export function emptyChaosStats(): ChaosStats {
  return {
    requests: 0,
    reads: 0,
    writes: 0,
    flushes: 0,
    zeroes: 0,
    errnos: {},
    connectionLosses: 0,
    reconnects: 0,
    hangs: 0,
    slowFailures: 0,
    bytesVerified: 0,
    failedWriteBlocks: 0,
    tornBlocks: 0,
    foreign: 0,
    lostAckedBytes: 0,
    lostFlushedBytes: 0,
    problems: [],
  };
}

/** Adds `from` into `into`. */
export function mergeChaosStats(into: ChaosStats, from: ChaosStats): ChaosStats {
  for (
    const key of [
      "requests",
      "reads",
      "writes",
      "flushes",
      "zeroes",
      "connectionLosses",
      "reconnects",
      "hangs",
      "slowFailures",
      "bytesVerified",
      "failedWriteBlocks",
      "tornBlocks",
      "foreign",
      "lostAckedBytes",
      "lostFlushedBytes",
    ] as const
  ) {
    into[key] += from[key];
  }
  for (const [name, n] of Object.entries(from.errnos)) {
    into.errnos[name] = (into.errnos[name] ?? 0) + n;
  }
  for (const p of from.problems) if (into.problems.length < 12) into.problems.push(p);
  return into;
}

/** Total error replies. */
export function errorReplies(stats: ChaosStats): number {
  return Object.values(stats.errnos).reduce((a, b) => a + b, 0);
}

/** Options of a chaos worker. */
export interface ChaosWorkerOptions {
  /** Worker number (part of the data pattern). */
  id: number;
  /** Opens a fresh connection (to the export under test). */
  connect: () => Promise<PipelinedClient>;
  /** First byte of the worker's region (a multiple of blockSize). */
  regionStart: number;
  /** Blocks in the region. */
  regionBlocks: number;
  /** Block size in bytes (a multiple of 512). */
  blockSize: number;
  /** Largest request in blocks (default 8). */
  maxBlocks?: number;
  /** Requests in flight (default 16). */
  inFlight?: number;
  /** Percentage of writes sent with FUA (default 5). */
  fuaPercent?: number;
  /** Percentage of requests that are FLUSH (default 2). */
  flushPercent?: number;
  /**
   * Percentage of writes sent as WRITE_ZEROES (default 0). The model cannot
   * tell a failed zeroing from the older zeroes of a never-written block, so
   * this is for runs without faults (the soak).
   */
  zeroPercent?: number;
  /** Longest a request or a reconnection may take before it counts as a hang (default 20 s). */
  watchdogMs?: number;
}

/** Versions kept per block for classification; older ones are forgotten. */
const HISTORY = 48;

/** One client's fault-tolerant verified I/O over its own region. */
export class ChaosWorker {
  /** What this worker saw. */
  readonly stats: ChaosStats = emptyChaosStats();
  readonly #o: Required<ChaosWorkerOptions>;
  readonly #acked: Uint32Array;
  readonly #durable: Uint32Array;
  readonly #busy: Uint8Array;
  /** Every version sent to each block, oldest first. */
  readonly #history: number[][];
  /** Versions whose write failed. */
  readonly #failed = new Set<number>();
  #client: PipelinedClient | undefined;
  #connecting: Promise<PipelinedClient | undefined> | undefined;
  #nextVersion = 1;
  #rand: number;
  #stopping: () => boolean = () => false;

  /** Creates a worker; it connects on first use. */
  constructor(options: ChaosWorkerOptions) {
    this.#o = {
      maxBlocks: 8,
      inFlight: 16,
      fuaPercent: 5,
      flushPercent: 2,
      zeroPercent: 0,
      watchdogMs: 20_000,
      ...options,
    };
    if (this.#o.blockSize % SECTOR !== 0) throw new RangeError("block size: multiple of 512");
    const n = this.#o.regionBlocks;
    this.#acked = new Uint32Array(n);
    this.#durable = new Uint32Array(n);
    this.#busy = new Uint8Array(n);
    this.#history = Array.from({ length: n }, () => []);
    this.#rand = ((this.#o.id + 1) * 2654435761) >>> 0 || 1;
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
    if (this.stats.problems.length < 12) {
      this.stats.problems.push(`worker ${this.#o.id}: ${message}`);
    }
  }

  /** The current connection, reopening it (bounded by the watchdog) when it was lost. */
  #connection(): Promise<PipelinedClient | undefined> {
    if (this.#client) return Promise.resolve(this.#client);
    this.#connecting ??= (async () => {
      const deadline = Date.now() + this.#o.watchdogMs;
      let wait = 20;
      let last: unknown;
      while (Date.now() < deadline) {
        try {
          const client = await this.#bounded(this.#o.connect(), deadline - Date.now(), "connect");
          this.#client = client;
          return client;
        } catch (error) {
          last = error;
          if (this.#stopping()) return undefined;
          await new Promise((r) => setTimeout(r, wait));
          wait = Math.min(wait * 2, 500);
        }
      }
      this.stats.hangs++;
      this.#problem(`could not reconnect within ${this.#o.watchdogMs} ms: ${last}`);
      return undefined;
    })().finally(() => this.#connecting = undefined);
    return this.#connecting;
  }

  /** Races `promise` against the watchdog; a timeout rejects with a "hang" error. */
  async #bounded<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new HangError(`${what}: no answer within ${ms} ms`)), ms);
    });
    try {
      return await Promise.race([promise, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Forgets a connection that failed (the next request reopens one). */
  #drop(client: PipelinedClient): void {
    if (this.#client !== client) return;
    this.#client = undefined;
    this.stats.reconnects++;
    client.close();
  }

  /** Counts a failed request; drops the connection unless the server answered with an error. */
  #failure(client: PipelinedClient, error: unknown, what: string, started: number): void {
    if (performance.now() - started >= SLOW_FAILURE_MS) this.stats.slowFailures++;
    if (error instanceof NbdReplyError) {
      const name = C.errnoName(error.errno);
      this.stats.errnos[name] = (this.stats.errnos[name] ?? 0) + 1;
      return;
    }
    if (error instanceof HangError) {
      this.stats.hangs++;
      this.#problem(`${what}: ${error.message}`);
    } else if (error instanceof DriverError) {
      this.stats.connectionLosses++;
    } else {
      this.stats.connectionLosses++;
      this.#problem(`${what}: ${(error as Error).message}`);
    }
    this.#drop(client);
  }

  /** Keeps `inFlight` requests going until `stop()` is true. */
  async run(stop: () => boolean): Promise<void> {
    this.#stopping = stop;
    const slot = async () => {
      while (!stop()) {
        const client = await this.#connection();
        if (!client) {
          if (stop()) break;
          continue;
        }
        await this.#one(client);
      }
    };
    await Promise.all(Array.from({ length: this.#o.inFlight }, slot));
    this.#stopping = () => false;
  }

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

  async #one(client: PipelinedClient): Promise<void> {
    const { blockSize, regionStart, id, watchdogMs } = this.#o;
    const roll = this.#random(100);
    if (roll < this.#o.flushPercent) {
      await this.#flush(client);
      return;
    }
    const picked = this.#pick();
    if (!picked) {
      await new Promise((r) => setTimeout(r, 0));
      return;
    }
    const [start, count] = picked;
    for (let i = 0; i < count; i++) this.#busy[start + i] = 1;
    const offset = regionStart + start * blockSize;
    const length = count * blockSize;
    const writing = roll < 55;
    const started = performance.now();
    try {
      if (writing && this.#random(100) < this.#o.zeroPercent) {
        // Zeroes are version 0, which every block's candidates include.
        const mayTrim = this.#random(2) === 0;
        await this.#bounded(client.zero(offset, length, mayTrim), watchdogMs, `ZERO ${offset}`);
        for (let i = 0; i < count; i++) {
          this.#acked[start + i] = 0;
          const history = this.#history[start + i]!;
          history.push(0);
          if (history.length > HISTORY) history.shift();
        }
        this.stats.zeroes++;
      } else if (writing) {
        const versions: number[] = [];
        const data = new Uint8Array(length);
        for (let i = 0; i < count; i++) {
          const v = this.#nextVersion++;
          versions.push(v);
          blockContents(data.subarray(i * blockSize, (i + 1) * blockSize), id, start + i, v);
          const history = this.#history[start + i]!;
          history.push(v);
          if (history.length > HISTORY) history.shift();
        }
        const fua = this.#random(100) < this.#o.fuaPercent;
        try {
          await this.#bounded(client.write(data, offset, fua), watchdogMs, `WRITE ${offset}`);
        } catch (error) {
          for (const v of versions) this.#failed.add(v);
          throw error;
        }
        for (let i = 0; i < count; i++) {
          this.#acked[start + i] = versions[i]!;
          if (fua) this.#durable[start + i] = versions[i]!;
        }
        this.stats.writes++;
      } else {
        const data = await this.#bounded(client.read(offset, length), watchdogMs, `READ ${offset}`);
        this.stats.reads++;
        for (let i = 0; i < count; i++) {
          this.#classify(start + i, data.subarray(i * blockSize, (i + 1) * blockSize), "read");
        }
      }
    } catch (error) {
      this.#failure(client, error, `${writing ? "WRITE" : "READ"} ${offset}+${length}`, started);
      // An export that fails everything at once must not turn the clients into a busy loop.
      await new Promise((r) => setTimeout(r, 20));
    } finally {
      this.stats.requests++;
      for (let i = 0; i < count; i++) this.#busy[start + i] = 0;
    }
  }

  /** One FLUSH: on success every write acknowledged before it was sent is durable. */
  async #flush(client: PipelinedClient): Promise<boolean> {
    const snapshot = this.#acked.slice();
    const started = performance.now();
    try {
      await this.#bounded(client.flush(), this.#o.watchdogMs, "FLUSH");
      this.stats.flushes++;
      for (let b = 0; b < snapshot.length; b++) {
        if (snapshot[b]! > this.#durable[b]!) this.#durable[b] = snapshot[b]!;
      }
      return true;
    } catch (error) {
      this.#failure(client, error, "FLUSH", started);
      return false;
    } finally {
      this.stats.requests++;
    }
  }

  /**
   * After the faults stopped: reconnects if needed and flushes until a FLUSH
   * is answered (within the watchdog), so everything acknowledged is durable.
   */
  async settle(): Promise<boolean> {
    const deadline = Date.now() + this.#o.watchdogMs;
    while (Date.now() < deadline) {
      const client = await this.#connection();
      if (client && await this.#flush(client)) return true;
      await new Promise((r) => setTimeout(r, 50));
    }
    this.stats.hangs++;
    this.#problem("no FLUSH succeeded after the faults stopped");
    return false;
  }

  /** Reads the whole region back and classifies every block. */
  async sweep(chunkBlocks = 64): Promise<void> {
    const { blockSize, regionStart, regionBlocks } = this.#o;
    for (let b = 0; b < regionBlocks;) {
      const client = await this.#connection();
      if (!client) return;
      const n = Math.min(chunkBlocks, regionBlocks - b);
      try {
        const data = await this.#bounded(
          client.read(regionStart + b * blockSize, n * blockSize),
          this.#o.watchdogMs,
          "sweep READ",
        );
        for (let i = 0; i < n; i++) {
          this.#classify(b + i, data.subarray(i * blockSize, (i + 1) * blockSize), "sweep");
        }
        b += n;
      } catch (error) {
        this.#failure(client, error, "sweep READ", performance.now());
        if (error instanceof HangError) return;
      }
    }
  }

  /** Classifies every block of the region in a local copy of the export (e.g. the image file). */
  checkImage(image: Uint8Array, where = "image"): void {
    const { blockSize, regionStart, regionBlocks } = this.#o;
    for (let b = 0; b < regionBlocks; b++) {
      const at = regionStart + b * blockSize;
      this.#classify(b, image.subarray(at, at + blockSize), where);
    }
  }

  /** Closes the connection (NBD_CMD_DISC when it is healthy). */
  async close(): Promise<void> {
    const client = this.#client;
    this.#client = undefined;
    if (!client) return;
    await this.#bounded(client.disconnect(), 5000, "disconnect").catch(() => client.close());
  }

  /** Checks one block against the model; see the module comment for the classes. */
  #classify(block: number, data: Uint8Array, where: string): void {
    const { id, blockSize } = this.#o;
    const acked = this.#acked[block]!;
    const stats = this.stats;
    if (checkBlock(data, id, block, acked)) {
      stats.bytesVerified += blockSize;
      return;
    }
    const history = this.#history[block]!;
    const candidates = [0, ...history];
    const found = candidates.findLast((v) => v !== acked && checkBlock(data, id, block, v));
    const describe = () =>
      `${where}: block ${block} (offset ${this.#o.regionStart + block * blockSize})`;
    if (found !== undefined) {
      if (this.#failed.has(found)) {
        stats.failedWriteBlocks++;
        stats.bytesVerified += blockSize;
        return;
      }
      stats.lostAckedBytes += blockSize;
      if (found < this.#durable[block]!) stats.lostFlushedBytes += blockSize;
      this.#problem(
        `${describe()} holds version ${found}, not the acknowledged ${acked} ` +
          `(durable ${this.#durable[block]})`,
      );
      return;
    }
    if (history.some((v) => this.#failed.has(v)) && this.#torn(block, data, candidates)) {
      stats.tornBlocks++;
      stats.bytesVerified += blockSize;
      return;
    }
    stats.foreign++;
    this.#problem(`${describe()} holds data nobody wrote there (acknowledged version ${acked})`);
  }

  /** Whether every sector of `data` is the same sector of some candidate version. */
  #torn(block: number, data: Uint8Array, candidates: number[]): boolean {
    const { id, blockSize } = this.#o;
    const contents = candidates.map((v) => {
      const out = new Uint8Array(blockSize);
      blockContents(out, id, block, v);
      return out;
    });
    for (let s = 0; s < blockSize; s += SECTOR) {
      const sector = data.subarray(s, s + SECTOR);
      const match = contents.some((c) => {
        for (let i = 0; i < SECTOR; i++) if (c[s + i] !== sector[i]) return false;
        return true;
      });
      if (!match) return false;
    }
    return true;
  }
}

/** A request or reconnection outlived the watchdog. */
export class HangError extends Error {
  /** Creates the error. */
  constructor(message: string) {
    super(message);
    this.name = "HangError";
  }
}
