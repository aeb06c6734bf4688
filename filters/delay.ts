/**
 * The `delay` filter: adds latency to requests, per kind of request, to
 * simulate a slow or remote disk. A bare number is seconds; `NNms` is
 * milliseconds (as nbdkit's delay filter reads them).
 *
 * ```
 * nbd serve --filter=delay memory 1G rdelay=100ms wdelay=100ms
 * nbd serve --filter=delay memory 1G delay-zero=1
 * ```
 *
 * Parameters: `rdelay`/`delay-read`, `delay-write`, `delay-zero`,
 * `delay-trim`, `delay-extents`, `delay-cache`, `delay-flush`, `wdelay`
 * (write, zero and trim), `delay-fast-zero=false` (fail fast zeroes at
 * once instead of delaying them), `delay-open`, `delay-close`.
 *
 * @module
 */

import { sleep } from "../util/sleep.ts";
import { NbdError } from "../protocol/errors.ts";
import {
  type Backend,
  type Capabilities,
  type Extent,
  type ExtentsFlags,
  type Filter,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";

/** Delays in milliseconds per kind of request. */
export interface Delays {
  read: number;
  write: number;
  zero: number;
  trim: number;
  extents: number;
  cache: number;
  flush: number;
  open: number;
  close: number;
  /** Whether fast zero requests are delayed (true) or fail at once (false). */
  fastZero: boolean;
}

class DelayBackend extends PassthroughBackend {
  readonly #d: Delays;
  constructor(next: Backend, delays: Delays) {
    super(next);
    this.#d = delays;
  }
  override capabilities(): Capabilities {
    const caps = this.next.capabilities();
    return this.#d.fastZero ? caps : { ...caps, fastZero: false };
  }
  override async pread(buf: Uint8Array, offset: number): Promise<void> {
    await sleep(this.#d.read);
    return await this.next.pread(buf, offset);
  }
  override async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    await sleep(this.#d.write);
    return await this.next.pwrite(buf, offset, flags);
  }
  override async flush(): Promise<void> {
    await sleep(this.#d.flush);
    return await this.next.flush();
  }
  override async trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    await sleep(this.#d.trim);
    return await this.next.trim(offset, length, flags);
  }
  override async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (flags.fast && !this.#d.fastZero) {
      throw new NbdError("ENOTSUP", "fast zero requests are refused by the delay filter");
    }
    await sleep(this.#d.zero);
    return await this.next.zero(offset, length, flags);
  }
  override async extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    await sleep(this.#d.extents);
    return await this.next.extents(offset, length, flags);
  }
  override async cache(offset: number, length: number): Promise<void> {
    await sleep(this.#d.cache);
    return await this.next.cache(offset, length);
  }
  override async close(): Promise<void> {
    await sleep(this.#d.close);
    return await this.next.close();
  }
}

/** The delay filter. */
export const delayFilter: Filter = {
  name: "delay",
  summary: "add latency to requests (seconds, or NNms)",
  description: "A bare number is seconds, NNms is milliseconds.\n\nExamples:\n" +
    "  nbd serve --filter=delay memory 1G rdelay=100ms wdelay=100ms\n" +
    "  nbd serve --filter=delay memory 1G delay-zero=1",
  params: [
    {
      name: "rdelay",
      value: "SECS|NNms",
      type: "duration",
      default: "0",
      description: "delay reads (same as delay-read)",
    },
    {
      name: "delay-read",
      value: "SECS|NNms",
      type: "duration",
      default: "0",
      description: "delay reads",
    },
    {
      name: "wdelay",
      value: "SECS|NNms",
      type: "duration",
      default: "0",
      description: "delay writes, zeroes and trims",
    },
    {
      name: "delay-write",
      value: "SECS|NNms",
      type: "duration",
      default: "wdelay",
      description: "delay writes",
    },
    {
      name: "delay-zero",
      value: "SECS|NNms",
      type: "duration",
      default: "wdelay",
      description: "delay zero requests",
    },
    {
      name: "delay-trim",
      value: "SECS|NNms",
      type: "duration",
      default: "wdelay",
      description: "delay trims",
    },
    {
      name: "delay-extents",
      value: "SECS|NNms",
      type: "duration",
      default: "0",
      description: "delay block status requests",
    },
    {
      name: "delay-cache",
      value: "SECS|NNms",
      type: "duration",
      default: "0",
      description: "delay cache (prefetch) requests",
    },
    {
      name: "delay-flush",
      value: "SECS|NNms",
      type: "duration",
      default: "0",
      description: "delay flushes",
    },
    {
      name: "delay-fast-zero",
      value: "BOOL",
      type: "boolean",
      default: "true",
      description: "delay fast zero requests; false fails them at once",
    },
    {
      name: "delay-open",
      value: "SECS|NNms",
      type: "duration",
      default: "0",
      description: "delay opening a connection",
    },
    {
      name: "delay-close",
      value: "SECS|NNms",
      type: "duration",
      default: "0",
      description: "delay closing a connection",
    },
  ],
  create(params) {
    const pick = (...keys: string[]) => {
      const given = keys.map((k) => [k, params.takeDuration(k)] as const).filter(([, v]) =>
        v !== undefined
      );
      if (given.length > 1) {
        throw new UsageError(`delay: ${given.map(([k]) => k).join(" and ")} both set a delay`);
      }
      return given[0]?.[1];
    };
    const read = pick("rdelay", "delay-read") ?? 0;
    const wdelay = params.takeDuration("wdelay");
    const delays: Delays = {
      read,
      write: pick("delay-write") ?? wdelay ?? 0,
      zero: pick("delay-zero") ?? wdelay ?? 0,
      trim: pick("delay-trim") ?? wdelay ?? 0,
      extents: pick("delay-extents") ?? 0,
      cache: pick("delay-cache") ?? 0,
      flush: pick("delay-flush") ?? 0,
      open: pick("delay-open") ?? 0,
      close: pick("delay-close") ?? 0,
      fastZero: params.takeBoolean("delay-fast-zero") ?? true,
    };
    return Promise.resolve({
      async wrap(next) {
        await sleep(delays.open);
        return new DelayBackend(next, delays);
      },
    });
  },
};
