/**
 * A disk image behind an HTTP(S) URL: size discovery, and ranged reads
 * with several in flight and retries with back-off. Used by the http
 * plugin and by the http source of `nbd copy`.
 *
 * Redirects are resolved once, when the image is opened: ranged reads then
 * go straight to the final URL, not through the redirect each time. When
 * the final URL starts refusing (401, 403, 404 or 410: a signed URL that
 * expired, say), the original URL is resolved again and the read retried.
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import { UsageError } from "../util/usage_error.ts";
import { sleep } from "../util/sleep.ts";
import { type Http1Answer, Http1Pool } from "./http1.ts";

/** Settings of one remote image. */
export interface HttpOptions {
  /** The image URL. */
  url: string;
  /** Headers sent with every request. */
  headers: Headers;
  /** Requests in flight at once. */
  connections: number;
  /** Per-request timeout in milliseconds. */
  timeout: number;
  /** Retries of a failed request. */
  retries: number;
  /** First back-off wait in milliseconds. */
  retryDelay: number;
  /** Follow redirects. */
  follow: boolean;
  /** Custom TLS client (cainfo=). */
  client?: Deno.HttpClient;
}

/**
 * The server answered a ranged request with the whole image, so it cannot
 * be read at random; `size` is its length when the server gave one.
 */
export class RangesIgnoredError extends UsageError {
  /** The image's length from HEAD or the answer, when known. */
  readonly size: number | undefined;

  /** Creates the error. */
  constructor(message: string, size: number | undefined) {
    super(message);
    this.name = "RangesIgnoredError";
    this.size = size;
  }
}

/** A response's Content-Length, when it has a valid one. */
export function contentLength(headers: Headers): number | undefined {
  const length = headers.get("Content-Length");
  return length !== null && /^\d+$/.test(length) ? Number(length) : undefined;
}

/** A request failure worth retrying (network trouble or a transient status). */
class TransientError extends Error {
  /** Seconds the server asked us to wait (Retry-After), if any. */
  retryAfter?: number;
}

const TRANSIENT_STATUS = new Set([408, 425, 429, 500, 502, 503, 504]);

/** Answers of a redirect's target that mean it is no longer valid (an expired signed URL). */
const STALE_TARGET_STATUS = new Set([401, 403, 404, 410]);

/** A proxy is set for http: URLs: fetch goes through it, so every request must. */
const PROXIED = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"].some((name) => {
  try {
    return !!Deno.env.get(name);
  } catch {
    return true; // not allowed to look: assume one, fetch will know
  }
});

/** Headers that are not sent to another origin than the one they were given for. */
const ORIGIN_BOUND_HEADERS = ["Authorization", "Cookie"];

/** Answers that send the request elsewhere (`Location`), and how many are followed (as fetch). */
const REDIRECT_STATUS = new Set([301, 302, 303, 307, 308]);
const MAX_REDIRECTS = 20;

/** A counting semaphore. */
class Slots {
  #count: number;
  #free: number;
  readonly #waiters: Array<() => void> = [];
  constructor(count: number) {
    this.#count = count;
    this.#free = count;
  }
  /** Changes the number of slots (used or not) to `count`. */
  resize(count: number): void {
    this.#free += count - this.#count;
    this.#count = count;
    while (this.#free > 0 && this.#waiters.length > 0) {
      this.#free--;
      this.#waiters.shift()!();
    }
  }
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#free > 0) this.#free--;
    else await new Promise<void>((resolve) => this.#waiters.push(resolve));
    try {
      return await fn();
    } finally {
      const next = this.#waiters.shift();
      if (next) next();
      else this.#free++;
    }
  }
}

/** A remote image: size discovery and ranged reads with retries. */
export class HttpImage {
  readonly options: HttpOptions;
  readonly #slots: Slots;
  /** Size in bytes, known after `open`. */
  size = 0;
  /** Where reads go: the URL redirects of `options.url` led to (the URL itself before `open`). */
  #target: string;
  /** The headers sent to `#target`. */
  #targetHeaders: Headers;
  /** A resolution of `options.url` under way, shared by the reads that found the target stale. */
  #resolving: Promise<void> | undefined;
  /** Times `options.url` was resolved again because its target went stale. */
  reresolutions = 0;
  /** Milliseconds the one-byte probe of `open` took: about one round trip to the target. */
  probeMs = 0;
  /** Keep-alive connections per origin of http: URLs. */
  readonly #pools = new Map<string, Http1Pool>();

  /** Prepares requests to `options.url`. */
  constructor(options: HttpOptions) {
    this.options = options;
    this.#slots = new Slots(options.connections);
    this.#target = options.url;
    this.#targetHeaders = options.headers;
  }

  /** The URL ranged reads go to (after redirects). */
  get target(): string {
    return this.#target;
  }

  /** Requests in flight at once. */
  get connections(): number {
    return this.options.connections;
  }

  /** Changes the number of requests in flight at once. */
  set connections(count: number) {
    this.#slots.resize(count);
    this.options.connections = count;
  }

  /** The headers for `url`: the given ones, less those bound to the original origin. */
  #headersFor(url: string): Headers {
    const headers = new Headers(this.options.headers);
    if (new URL(url).origin !== new URL(this.options.url).origin) {
      for (const name of ORIGIN_BOUND_HEADERS) headers.delete(name);
    }
    return headers;
  }

  /** Sends reads to `url`, where the original URL redirected. */
  #setTarget(url: string): void {
    if (!this.options.follow || url === "" || url === this.#target) return;
    this.#target = url;
    // Credentials given for the original server stay with it (as on a redirect followed by
    // fetch): a signed URL elsewhere is refused when it also carries an Authorization header.
    this.#targetHeaders = this.#headersFor(url);
  }

  async #fetch(
    method: string,
    range?: [number, number],
    signal: AbortSignal = AbortSignal.timeout(this.options.timeout),
    url: string = this.#target,
  ): Promise<Response> {
    const headers = new Headers(
      url === this.options.url ? this.options.headers : this.#targetHeaders,
    );
    if (range) headers.set("Range", `bytes=${range[0]}-${range[1]}`);
    const init: RequestInit & { client?: Deno.HttpClient } = {
      method,
      headers,
      redirect: this.options.follow ? "follow" : "error",
      signal,
    };
    if (this.options.client) init.client = this.options.client;
    let response: Response;
    try {
      response = await fetch(url, init);
    } catch (error) {
      // The useful part ("invalid peer certificate", "connection refused") is in the cause.
      const cause = (error as Error).cause;
      const detail = cause instanceof Error ? cause.message : (error as Error).message;
      const message = `${method} ${url}: ${detail}`;
      // A certificate problem will not go away by waiting: fail at once.
      if (/certificate|handshake|tls|ssl/i.test(message)) throw new NbdError("EIO", message);
      throw new TransientError(message);
    }
    if (TRANSIENT_STATUS.has(response.status)) {
      await response.body?.cancel();
      const failure = new TransientError(
        `${method} ${url}: ${response.status} ${response.statusText}`,
      );
      const after = Number(response.headers.get("Retry-After"));
      if (after > 0) failure.retryAfter = after;
      throw failure;
    }
    return response;
  }

  /** Runs `attempt`, retrying transient failures with exponential back-off. */
  async #withRetries<T>(attempt: () => Promise<T>): Promise<T> {
    let delay = this.options.retryDelay;
    for (let tries = 0;; tries++) {
      try {
        return await attempt();
      } catch (error) {
        if (!(error instanceof TransientError) || tries >= this.options.retries) {
          if (error instanceof TransientError) throw new NbdError("EIO", error.message);
          throw error;
        }
        const wait = error.retryAfter !== undefined
          ? Math.min(error.retryAfter * 1000, 60000)
          : delay;
        await sleep(wait);
        delay *= 2;
      }
    }
  }

  /** `TransientError` for an answer with a status worth retrying. */
  #transient(method: string, url: string, answer: Http1Answer): TransientError | undefined {
    if (!TRANSIENT_STATUS.has(answer.status)) return undefined;
    const failure = new TransientError(`${method} ${url}: ${answer.status} ${answer.statusText}`);
    const after = Number(answer.headers.get("Retry-After"));
    if (after > 0) failure.retryAfter = after;
    return failure;
  }

  /**
   * HEADs `options.url` over the kept-alive connections the reads will use,
   * following redirects: the URL they led to and its answer. Undefined when
   * fetch is to do it (not plain http, a broken connection, a redirect not
   * to be followed); a transient status throws `TransientError`.
   */
  async #headPooled(): Promise<{ url: string; answer: Http1Answer } | undefined> {
    let url = this.options.url;
    for (let hops = 0; hops <= MAX_REDIRECTS; hops++) {
      const pool = this.#poolFor(url);
      if (!pool) return undefined;
      const parsed = new URL(url);
      let answer;
      try {
        answer = await pool.head(parsed.pathname + parsed.search, this.#headersFor(url));
      } catch {
        return undefined;
      }
      const failure = this.#transient("HEAD", url, answer);
      if (failure) throw failure;
      const location = answer.headers.get("Location");
      if (!REDIRECT_STATUS.has(answer.status)) return { url, answer };
      if (location === null || !this.options.follow) return undefined;
      url = new URL(location, url).href;
    }
    return undefined;
  }

  /**
   * The one-byte probe over the kept-alive connections: the image's size
   * from its `Content-Range` (NaN when not given) when the byte came as
   * asked; undefined when fetch is to do it (anything else but a transient
   * status, which throws `TransientError`).
   */
  async #probePooled(): Promise<number | undefined> {
    const pool = this.#poolFor(this.#target);
    if (!pool) return undefined;
    const target = new URL(this.#target);
    let probe;
    try {
      probe = await pool.getRange(
        target.pathname + target.search,
        this.#targetHeaders,
        0,
        new Uint8Array(1),
      );
    } catch {
      return undefined;
    }
    const failure = this.#transient("GET", this.#target, probe);
    if (failure) throw failure;
    if (!probe.filled) return undefined;
    return Number(/\/(\d+)\s*$/.exec(probe.headers.get("Content-Range") ?? "")?.[1]);
  }

  /**
   * Finds the size and checks that the server honours Range requests. Over
   * plain http the HEAD, its redirects and the probe go over the connections
   * the reads will use (fetch would open new ones); fetch takes over at the
   * first answer out of the ordinary.
   */
  async open(): Promise<void> {
    let size: number | undefined;
    await this.#withRetries(async () => {
      const pooled = await this.#headPooled();
      if (pooled) {
        if (pooled.answer.status >= 200 && pooled.answer.status < 300) {
          size = contentLength(pooled.answer.headers);
          this.#setTarget(pooled.url);
        }
        return;
      }
      const head = await this.#fetch("HEAD", undefined, undefined, this.options.url);
      await head.body?.cancel();
      if (head.ok) {
        size = contentLength(head.headers);
        this.#setTarget(head.url);
      }
    });
    const start = performance.now();
    const pooledTotal = await this.#withRetries(() => this.#probePooled());
    if (pooledTotal !== undefined) {
      this.probeMs = performance.now() - start;
      size ??= Number.isNaN(pooledTotal) ? undefined : pooledTotal;
      if (size === undefined) {
        throw new UsageError(`http: cannot find the size of ${this.options.url}`);
      }
      this.size = size;
      return;
    }
    // One-byte probe: proves Range works and gives the size when HEAD did not.
    const probe = await this.#withRetries(() => this.#fetch("GET", [0, 0]));
    this.probeMs = performance.now() - start;
    if (probe.ok) this.#setTarget(probe.url);
    if (probe.status === 200) {
      // The whole image is on its way: stop it rather than read it.
      await probe.body?.cancel();
      size ??= contentLength(probe.headers);
      throw new RangesIgnoredError(
        `http: the server ignores Range requests (it sent the whole ${this.options.url}), ` +
          "so the image cannot be read at random",
        size,
      );
    }
    const body = new Uint8Array(await probe.arrayBuffer());
    if (probe.status === 416 && size === 0) {
      this.size = 0;
      return;
    }
    if (probe.status !== 206) {
      throw new UsageError(`http: ${this.options.url}: ${probe.status} ${probe.statusText}`);
    }
    const total = /\/(\d+)\s*$/.exec(probe.headers.get("Content-Range") ?? "")?.[1];
    size ??= total === undefined ? undefined : Number(total);
    if (size === undefined) {
      throw new UsageError(`http: cannot find the size of ${this.options.url}`);
    }
    if (body.length !== 1 && size > 0) {
      throw new UsageError(`http: the server answered a 1-byte range with ${body.length} bytes`);
    }
    this.size = size;
  }

  /**
   * A plain GET of the whole image, to be read in order (for a server that
   * ignores Range requests), retried like the others until its headers
   * arrive; `signal` stops it, body included.
   */
  async fetchWhole(signal: AbortSignal): Promise<Response> {
    const response = await this.#withRetries(async () => {
      // The timeout covers the wait for the headers only: the body may take as long as it
      // needs (the caller watches for a stall).
      const controller = new AbortController();
      const stop = () => controller.abort(signal.reason);
      if (signal.aborted) stop();
      signal.addEventListener("abort", stop, { once: true });
      const timer = setTimeout(
        () => controller.abort(new DOMException("timed out", "TimeoutError")),
        this.options.timeout,
      );
      try {
        return await this.#fetch("GET", undefined, controller.signal);
      } catch (error) {
        signal.removeEventListener("abort", stop);
        throw error;
      } finally {
        clearTimeout(timer);
      }
    });
    if (response.status !== 200) {
      await response.body?.cancel();
      throw new NbdError("EIO", `GET ${this.options.url}: ${response.status}`);
    }
    return response;
  }

  /**
   * Resolves `options.url` again after its target `stale` refused a read;
   * concurrent callers share one resolution, and a caller whose target was
   * already replaced returns at once.
   */
  #resolveAgain(stale: string): Promise<void> {
    if (this.#target !== stale) return Promise.resolve();
    this.#resolving ??= (async () => {
      try {
        this.reresolutions++;
        const head = await this.#fetch("HEAD", undefined, undefined, this.options.url);
        await head.body?.cancel();
        if (head.ok) return this.#setTarget(head.url);
        const probe = await this.#fetch("GET", [0, 0], undefined, this.options.url);
        await probe.body?.cancel();
        if (probe.status !== 206) {
          throw new NbdError("EIO", `GET ${this.options.url}: ${probe.status}`);
        }
        this.#setTarget(probe.url);
      } finally {
        this.#resolving = undefined;
      }
    })();
    return this.#resolving;
  }

  /** Reads `buf.length` bytes at `offset` with a Range GET. */
  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.#slots.run(() =>
      this.#withRetries(async () => {
        const target = this.#target;
        let status = await this.#getRange(buf, offset, target);
        if (STALE_TARGET_STATUS.has(status) && target !== this.options.url) {
          await this.#resolveAgain(target);
          status = await this.#getRange(buf, offset, this.#target);
        }
        if (status === 200) throw new NbdError("EIO", "the server ignored the Range header");
        if (status !== 206) throw new NbdError("EIO", `GET ${this.#target}: ${status}`);
      })
    );
  }

  /** The plain-TCP client for `url`, when it is an http: URL it can take (no proxy in the way). */
  #poolFor(url: string): Http1Pool | undefined {
    const parsed = new URL(url);
    if (parsed.protocol !== "http:" || PROXIED) return undefined;
    let pool = this.#pools.get(parsed.origin);
    if (!pool) {
      pool = new Http1Pool(parsed, this.options.timeout);
      this.#pools.set(parsed.origin, pool);
    }
    return pool;
  }

  /**
   * One Range GET of `url` into `buf`: 206 when `buf` holds the bytes, else
   * the status of the answer (its body dropped). Transient failures throw
   * `TransientError`.
   */
  async #getRange(buf: Uint8Array, offset: number, url: string): Promise<number> {
    const pool = this.#poolFor(url);
    if (pool) {
      const headers = url === this.options.url ? this.options.headers : this.#targetHeaders;
      let answer;
      try {
        answer = await pool.getRange(
          new URL(url).pathname + new URL(url).search,
          headers,
          offset,
          buf,
        );
      } catch (error) {
        throw new TransientError(`GET ${url}: ${(error as Error).message}`);
      }
      if (answer.filled) return 206;
      if (TRANSIENT_STATUS.has(answer.status)) {
        const failure = new TransientError(`GET ${url}: ${answer.status} ${answer.statusText}`);
        const after = Number(answer.headers.get("Retry-After"));
        if (after > 0) failure.retryAfter = after;
        throw failure;
      }
      // A redirect, a chunked or compressed body, a range not as asked: fetch sorts them out.
      if (!STALE_TARGET_STATUS.has(answer.status)) return await this.#fetchRange(buf, offset, url);
      return answer.status;
    }
    return await this.#fetchRange(buf, offset, url);
  }

  /** `#getRange` through fetch. */
  async #fetchRange(buf: Uint8Array, offset: number, url: string): Promise<number> {
    const response = await this.#fetch("GET", [offset, offset + buf.length - 1], undefined, url);
    if (response.status !== 206) {
      await response.body?.cancel();
      return response.status;
    }
    const start = /bytes\s+(\d+)-/.exec(response.headers.get("Content-Range") ?? "")?.[1];
    if (start !== undefined && Number(start) !== offset) {
      await response.body?.cancel();
      throw new NbdError("EIO", `the server sent bytes from ${start}, not ${offset}`);
    }
    let done = 0;
    try {
      for await (const chunk of response.body!) {
        const n = Math.min(chunk.length, buf.length - done);
        buf.set(chunk.subarray(0, n), done);
        done += n;
        if (done >= buf.length) break;
      }
    } catch (error) {
      throw new TransientError(`reading ${url}: ${(error as Error).message}`);
    }
    if (done < buf.length) {
      throw new TransientError(`short read from ${url}: ${done} of ${buf.length}`);
    }
    return 206;
  }

  /** Closes the connections kept open for reads. */
  close(): void {
    for (const pool of this.#pools.values()) pool.close();
    this.#pools.clear();
    this.options.client?.close();
  }
}
