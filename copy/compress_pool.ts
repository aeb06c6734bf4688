/**
 * Compressing qcow2 clusters on several threads: a copy that writes a
 * compressed image hands each request's clusters to the least busy of a
 * few workers and stores the results as they come back, so compression
 * runs beside the reading and writing instead of between them.
 *
 * @module
 */

import type { CompressionType } from "../formats/qcow2/header.ts";
import { compressCluster, loadCompression } from "../formats/qcow2/compress.ts";

/** A job posted to a worker. */
export interface CompressJob {
  /** Matches the reply. */
  id: number;
  /** zlib or zstd. */
  type: CompressionType;
  /** Cluster size. */
  clusterSize: number;
  /** Whole clusters (the last may be short), transferred. */
  data: ArrayBuffer;
}

/** A worker's reply. */
export interface CompressResult {
  /** The job's id. */
  id: number;
  /** Per cluster: the compressed bytes, or null when compression saves nothing. */
  results: (ArrayBuffer | null)[];
  /** The job's data, given back. */
  data: ArrayBuffer;
  /** Why the job failed. */
  error?: string;
}

interface Slot {
  worker: Worker;
  busy: number;
}

/** Compresses clusters on `threads` workers (in this thread when none can start). */
export class CompressPool {
  readonly #type: CompressionType;
  readonly #clusterSize: number;
  readonly #slots: Slot[] = [];
  readonly #pending = new Map<
    number,
    { resolve: (r: (Uint8Array | undefined)[]) => void; reject: (e: Error) => void; slot: Slot }
  >();
  #nextId = 0;
  #failure: Error | undefined;

  constructor(type: CompressionType, clusterSize: number, threads: number) {
    this.#type = type;
    this.#clusterSize = clusterSize;
    for (let i = 0; i < threads; i++) {
      let worker: Worker;
      try {
        worker = new Worker(new URL("./compress_worker.ts", import.meta.url).href, {
          type: "module",
        });
      } catch {
        break;
      }
      const slot: Slot = { worker, busy: 0 };
      worker.onmessage = (event: MessageEvent<CompressResult>) => this.#settle(event.data);
      worker.onerror = (event) => {
        event.preventDefault();
        this.#failAll(new Error(`a compression thread failed: ${event.message}`));
      };
      this.#slots.push(slot);
    }
  }

  #settle(reply: CompressResult): void {
    const waiting = this.#pending.get(reply.id);
    if (!waiting) return;
    this.#pending.delete(reply.id);
    waiting.slot.busy--;
    if (reply.error !== undefined) waiting.reject(new Error(reply.error));
    else {
      waiting.resolve(reply.results.map((r) => r === null ? undefined : new Uint8Array(r)));
    }
  }

  #failAll(error: Error): void {
    this.#failure ??= error;
    for (const [id, waiting] of this.#pending) {
      this.#pending.delete(id);
      waiting.reject(error);
    }
  }

  /**
   * The clusters of `data` compressed (undefined where that saves nothing).
   * `data` is copied, so it may be reused once this resolves or rejects.
   */
  compress(data: Uint8Array): Promise<(Uint8Array | undefined)[]> {
    if (this.#failure) return Promise.reject(this.#failure);
    if (this.#slots.length === 0) return this.#compressHere(data);
    let slot = this.#slots[0]!;
    for (const s of this.#slots) if (s.busy < slot.busy) slot = s;
    slot.busy++;
    const id = this.#nextId++;
    const copy = data.slice().buffer;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, slot });
      const job: CompressJob = { id, type: this.#type, clusterSize: this.#clusterSize, data: copy };
      slot.worker.postMessage(job, [copy]);
    });
  }

  /** Without workers: compresses in this thread. */
  async #compressHere(data: Uint8Array): Promise<(Uint8Array | undefined)[]> {
    await loadCompression();
    const out: (Uint8Array | undefined)[] = [];
    for (let at = 0; at < data.length; at += this.#clusterSize) {
      out.push(compressCluster(this.#type, data.subarray(at, at + this.#clusterSize)));
    }
    return out;
  }

  /** Stops the workers. */
  close(): void {
    this.#failAll(new Error("the compression pool is closed"));
    for (const slot of this.#slots) slot.worker.terminate();
    this.#slots.length = 0;
  }
}
