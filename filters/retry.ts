/**
 * The `retry` filter: when a request fails, closes and reopens the layers
 * below it and tries the request again, waiting between tries. Makes long
 * copies from flaky sources (network plugins) survive short outages.
 *
 * ```
 * nbd serve --filter=retry http url=https://example.com/disk.img retries=10
 * ```
 *
 * Parameters:
 * - `retries=N`: tries after the first failure (default 5).
 * - `retry-delay=SECS|NNms`: wait before the first retry (default 2).
 * - `retry-exponential=BOOL`: double the wait after each retry (default yes).
 * - `retry-readonly=BOOL`: after a failure, reopen read-only and fail writes
 *   for the rest of the connection (default no).
 *
 * A failure with ENOTSUP (e.g. a refused fast zero) is an answer, not an
 * outage, and is never retried.
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import type {
  Backend,
  Capabilities,
  Extent,
  ExtentsFlags,
  Filter,
  OpenContext,
  Reopen,
  WriteFlags,
  ZeroFlags,
} from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";
import { sleep } from "../util/sleep.ts";

/** Retry settings. */
export interface RetrySettings {
  /** Tries after the first failure. */
  retries: number;
  /** First wait in milliseconds. */
  delay: number;
  /** Double the wait each time. */
  exponential: boolean;
  /** Reopen read-only after a failure. */
  readonly: boolean;
}

class RetryBackend implements Backend {
  #next: Backend;
  #generation = 0;
  #reopening: Promise<void> | undefined;
  #readonlyNow = false;
  readonly #size: number;
  readonly #caps: Capabilities;
  readonly #settings: RetrySettings;
  readonly #context: OpenContext;
  readonly #reopen: Reopen;

  constructor(next: Backend, settings: RetrySettings, context: OpenContext, reopen: Reopen) {
    this.#next = next;
    this.#size = next.size();
    this.#caps = next.capabilities();
    this.#settings = settings;
    this.#context = context;
    this.#reopen = reopen;
  }

  size(): number {
    return this.#size;
  }
  capabilities(): Capabilities {
    return this.#caps;
  }

  /** Runs `op` on the current backend below, reopening and retrying on failure. */
  async #retry<T>(write: boolean, op: (below: Backend) => Promise<T>): Promise<T> {
    let delay = this.#settings.delay;
    for (let attempt = 0;; attempt++) {
      if (write && this.#readonlyNow) {
        throw new NbdError("EPERM", "the export became read-only after a failure (retry-readonly)");
      }
      const generation = this.#generation;
      try {
        return await op(this.#next);
      } catch (error) {
        if (error instanceof NbdError && error.errno === "ENOTSUP") throw error;
        if (attempt >= this.#settings.retries) throw error;
        await sleep(delay);
        if (this.#settings.exponential) delay *= 2;
        await this.#reopenBelow(generation).catch(() => {
          // The reopen failed too: the next try fails and we come back here.
        });
      }
    }
  }

  /** Reopens the layers below once, however many requests failed on the same backend. */
  #reopenBelow(generation: number): Promise<void> {
    if (generation !== this.#generation) return Promise.resolve();
    this.#reopening ??= (async () => {
      try {
        const old = this.#next;
        await old.close().catch(() => {});
        const context = this.#settings.readonly
          ? { ...this.#context, readonly: true }
          : this.#context;
        const fresh = await this.#reopen(context);
        if (fresh.size() !== this.#size) {
          await fresh.close().catch(() => {});
          throw new NbdError("EIO", "the disk changed size when it was reopened");
        }
        this.#next = fresh;
        this.#generation++;
        if (this.#settings.readonly) this.#readonlyNow = true;
      } finally {
        this.#reopening = undefined;
      }
    })();
    return this.#reopening;
  }

  pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.#retry(false, (b) => b.pread(buf, offset));
  }
  pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.#retry(true, (b) => b.pwrite(buf, offset, flags));
  }
  flush(): Promise<void> {
    return this.#retry(false, (b) => b.flush());
  }
  trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.#retry(true, (b) => b.trim(offset, length, flags));
  }
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.#retry(true, (b) => b.zero(offset, length, flags));
  }
  extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    return this.#retry(false, (b) => b.extents(offset, length, flags));
  }
  cache(offset: number, length: number): Promise<void> {
    return this.#retry(false, (b) => b.cache(offset, length));
  }
  close(): Promise<void> {
    return this.#next.close();
  }
}

/** The retry filter. */
export const retryFilter: Filter = {
  name: "retry",
  summary: "reopen the layers below and retry failed requests",
  description:
    "Example:\n  nbd serve --filter=retry http url=https://example.com/disk.img retries=10",
  params: [
    {
      name: "retries",
      value: "N",
      type: "integer",
      default: "5",
      description: "tries after the first failure (0 to 1000)",
    },
    {
      name: "retry-delay",
      value: "SECS|NNms",
      type: "duration",
      default: "2",
      description: "wait before the first retry",
    },
    {
      name: "retry-exponential",
      value: "BOOL",
      type: "boolean",
      default: "true",
      description: "double the wait after each retry",
    },
    {
      name: "retry-readonly",
      value: "BOOL",
      type: "boolean",
      default: "false",
      description: "after a failure reopen read-only and refuse writes",
    },
  ],
  create(params) {
    const settings: RetrySettings = {
      retries: params.takeInteger("retries", 0, 1000) ?? 5,
      delay: params.takeDuration("retry-delay") ?? 2000,
      exponential: params.takeBoolean("retry-exponential") ?? true,
      readonly: params.takeBoolean("retry-readonly") ?? false,
    };
    if (settings.delay < 0) throw new UsageError("retry-delay must not be negative");
    return Promise.resolve({
      wrap: (next, context, reopen) =>
        Promise.resolve(new RetryBackend(next, settings, context, reopen)),
    });
  },
};
