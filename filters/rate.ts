/**
 * The `rate` filter: limits bandwidth, in bits per second as nbdkit's rate
 * filter counts it (`rate=10M` is 10 × 2^20 bits/s, about 1.25 MiB/s of
 * data). Reads and writes have separate limits of that rate; zero, trim and
 * other requests carry no data and are not limited. A token bucket lets a
 * client burst for `burstiness` seconds after a pause.
 *
 * ```
 * nbd serve --filter=rate memory 64M rate=1M
 * nbd serve --filter=rate memory 64M connection-rate=50K rate=1M
 * nbd serve --filter=rate memory 64M rate=1M rate-file=/tmp/rate
 * ```
 *
 * Parameters:
 * - `rate=BITSPERSEC`: limit for the whole server.
 * - `connection-rate=BITSPERSEC`: limit for each connection.
 * - `rate-file=PATH`, `connection-rate-file=PATH`: read the limit from a
 *   file while running (checked at most once a second).
 * - `burstiness=SECS`: bucket size in seconds of the rate (default 2).
 *
 * @module
 */

import { type Backend, type Filter, PassthroughBackend, type WriteFlags } from "../core/backend.ts";
import { parseSize } from "../util/parse.ts";
import { UsageError } from "../util/usage_error.ts";
import { sleep } from "../util/sleep.ts";

/** A token bucket measured in bits; requests may overdraw it and then wait. */
export class TokenBucket {
  /** Bits per second; 0 = unlimited. */
  rate: number;
  readonly #burst: number;
  #tokens: number;
  #last = performance.now();

  /** Creates a full bucket. */
  constructor(rate: number, burstSeconds: number) {
    this.rate = rate;
    this.#burst = burstSeconds;
    this.#tokens = rate * burstSeconds;
  }

  /**
   * Takes `bits` from the bucket and returns how many milliseconds the
   * caller must wait before its data may flow.
   */
  take(bits: number): number {
    if (this.rate <= 0) return 0;
    const t = performance.now();
    const capacity = this.rate * this.#burst;
    this.#tokens = Math.min(capacity, this.#tokens + ((t - this.#last) / 1000) * this.rate);
    this.#last = t;
    this.#tokens -= bits;
    return this.#tokens >= 0 ? 0 : (-this.#tokens / this.rate) * 1000;
  }
}

/** A rate read from a file, rechecked at most once a second. */
class RateSource {
  readonly #path: string | undefined;
  #checked = 0;
  readonly #buckets: TokenBucket[];

  constructor(path: string | undefined, buckets: TokenBucket[]) {
    this.#path = path;
    this.#buckets = buckets;
  }

  refresh(): void {
    if (!this.#path) return;
    const t = performance.now();
    if (t - this.#checked < 1000) return;
    this.#checked = t;
    try {
      const text = Deno.readTextFileSync(this.#path).trim();
      const rate = parseSize(text, "rate file");
      for (const bucket of this.#buckets) bucket.rate = rate;
    } catch {
      // A missing or half-written file keeps the last rate (nbdkit does the same).
    }
  }
}

interface Limits {
  read: TokenBucket;
  write: TokenBucket;
  source: RateSource;
}

function limits(rate: number, burst: number, file: string | undefined): Limits {
  const read = new TokenBucket(rate, burst);
  const write = new TokenBucket(rate, burst);
  return { read, write, source: new RateSource(file, [read, write]) };
}

class RateBackend extends PassthroughBackend {
  readonly #limits: Limits[];
  constructor(next: Backend, limits: Limits[]) {
    super(next);
    this.#limits = limits;
  }
  async #wait(kind: "read" | "write", bytes: number): Promise<void> {
    let wait = 0;
    for (const l of this.#limits) {
      l.source.refresh();
      wait = Math.max(wait, l[kind].take(bytes * 8));
    }
    await sleep(wait);
  }
  override async pread(buf: Uint8Array, offset: number): Promise<void> {
    await this.#wait("read", buf.length);
    return await this.next.pread(buf, offset);
  }
  override async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    await this.#wait("write", buf.length);
    return await this.next.pwrite(buf, offset, flags);
  }
}

/** The rate filter. */
export const rateFilter: Filter = {
  name: "rate",
  summary: "limit bandwidth (bits per second), for the server and per connection",
  description: "Rates are bits per second with binary suffixes (1M = 1048576 bits/s).\n\n" +
    "Examples:\n" +
    "  nbd serve --filter=rate memory 64M rate=1M\n" +
    "  nbd serve --filter=rate memory 64M connection-rate=50K rate=1M",
  params: [
    {
      name: "rate",
      value: "BITSPERSEC",
      type: "size",
      default: "0, no limit",
      description: "limit for the whole server",
    },
    {
      name: "connection-rate",
      value: "BITSPERSEC",
      type: "size",
      default: "0, no limit",
      description: "limit for each connection",
    },
    {
      name: "rate-file",
      value: "PATH",
      type: "path",
      description: "read the server limit from PATH",
    },
    {
      name: "connection-rate-file",
      value: "PATH",
      type: "path",
      description: "read the per-connection limit from PATH",
    },
    {
      name: "burstiness",
      value: "SECS",
      type: "string",
      default: "2",
      description: "bucket size in seconds (a positive number)",
    },
  ],
  create(params) {
    const rate = params.takeSize("rate") ?? 0;
    const connectionRate = params.takeSize("connection-rate") ?? 0;
    const rateFile = params.take("rate-file");
    const connectionRateFile = params.take("connection-rate-file");
    const burstText = params.take("burstiness");
    const burst = burstText === undefined ? 2 : Number(burstText);
    if (!(burst > 0 && Number.isFinite(burst))) {
      throw new UsageError(`burstiness: expected a positive number of seconds, got "${burstText}"`);
    }
    const server = limits(rate, burst, rateFile);
    return Promise.resolve({
      wrap(next) {
        const own = [server];
        if (connectionRate > 0 || connectionRateFile) {
          own.push(limits(connectionRate, burst, connectionRateFile));
        }
        return Promise.resolve(new RateBackend(next, own));
      },
    });
  },
};
