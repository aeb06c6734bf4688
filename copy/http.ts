/**
 * An http(s) URL as a copy source: the size from HEAD (or the first ranged
 * GET), then Range requests with several in flight, retried on transient
 * failures. This reuses the http plugin's `HttpImage`, so both behave alike.
 * A server that ignores Range requests (many simple static file servers) is
 * read in order instead, through one plain GET, like a pipe of known size.
 *
 * @module
 */

import { contentLength, HttpImage, RangesIgnoredError } from "../io/http_image.ts";
import type { BlockSize } from "../protocol/handshake.ts";
import { BaseEndpoint, COPY_BLOCK_SIZE, type Endpoint } from "./endpoint.ts";
import { type StreamReader, StreamSource } from "./pipe.ts";

/** The plugin's messages start with "http: " or an errno name; here the URL says enough. */
function plainError(error: unknown): Error {
  const message = (error as Error).message.replace(/^http: /, "").replace(/^E[A-Z]+: /, "");
  return new Error(message, { cause: error });
}

/**
 * Each request costs a round trip before its first byte: large ones keep
 * a slow link busy with a few requests in flight.
 */
const HTTP_BLOCK_SIZE: BlockSize = Object.freeze({
  ...COPY_BLOCK_SIZE,
  preferred: 4 << 20,
});

/**
 * Requests in flight by default: on a link where each request waits a round
 * trip (the probe took `LATENT_PROBE_MS` or more) more of them keep it
 * busy; near the server, fewer leave the processor to moving bytes.
 */
export const HTTP_CONNECTIONS_NEAR = 4;
/** Requests in flight by default when the probe took `LATENT_PROBE_MS` or more. */
export const HTTP_CONNECTIONS_FAR = 8;
const LATENT_PROBE_MS = 5;

/** Options of `HttpSource.open`. */
export interface HttpSourceOptions {
  /**
   * Requests in flight at once (default: `HTTP_CONNECTIONS_FAR` when the
   * server is a round trip of 5 ms or more away, else `HTTP_CONNECTIONS_NEAR`).
   */
  connections?: number;
}

/** A remote image read with Range requests. */
export class HttpSource extends BaseEndpoint {
  readonly name: string;
  readonly kind = "http";
  readonly size: number;
  readonly blockSize: BlockSize = HTTP_BLOCK_SIZE;
  readonly maxReads: number;
  readonly #image: HttpImage;

  private constructor(name: string, image: HttpImage) {
    super();
    this.name = name;
    this.#image = image;
    this.size = image.size;
    // One more read per request slot, so the next one is ready to go when a slot frees.
    this.maxReads = 2 * image.options.connections;
  }

  /**
   * Finds the size of `url` and whether the server honours Range requests:
   * an `HttpSource` when it does, else a source reading one plain GET in order.
   */
  static async open(url: string, options: HttpSourceOptions): Promise<Endpoint> {
    const image = new HttpImage({
      url,
      headers: new Headers({ "User-Agent": "nbd-copy" }),
      connections: Math.max(1, options.connections ?? HTTP_CONNECTIONS_NEAR),
      timeout: 60_000,
      // Transient failures are retried after 0.5, 1, 2 and 4 s: long enough to ride out a
      // hiccup, short enough that an unreachable server is reported within seconds.
      retries: 4,
      retryDelay: 500,
      follow: true,
    });
    try {
      await image.open();
    } catch (error) {
      if (error instanceof RangesIgnoredError) return await openInOrder(url, image, error.size);
      throw plainError(error);
    }
    if (options.connections === undefined && image.probeMs >= LATENT_PROBE_MS) {
      image.connections = HTTP_CONNECTIONS_FAR;
    }
    return new HttpSource(url, image);
  }

  /** One Range GET for the buffer. */
  override async read(buf: Uint8Array, offset: number): Promise<number> {
    await this.#image.read(buf, offset);
    return buf.length;
  }

  /** Closes the connections kept open for the reads. */
  override close(_complete: boolean): Promise<void> {
    this.#image.close();
    return Promise.resolve();
  }
}

/** How long a plain GET's body may stall before the copy gives up on it. */
const STALL_TIMEOUT_MS = 60_000;

/**
 * The whole image through one GET, read in order: its length (from HEAD or
 * the response) sizes the destination, and a body that ends early or
 * stalls for a minute fails the copy.
 */
async function openInOrder(
  url: string,
  image: HttpImage,
  announced: number | undefined,
): Promise<Endpoint> {
  const controller = new AbortController();
  let response: Response;
  try {
    response = await image.fetchWhole(controller.signal);
  } catch (error) {
    throw plainError(error);
  }
  const size = contentLength(response.headers) ?? announced;
  const body = (response.body ?? new ReadableStream<Uint8Array>({ start: (c) => c.close() }))
    .getReader();
  /** What is left of the last chunk the response delivered. */
  let rest: Uint8Array = new Uint8Array(0);
  const reader: StreamReader = {
    async read(buf: Uint8Array): Promise<number | null> {
      if (rest.length === 0) {
        const timer = setTimeout(
          () => controller.abort(new Error(`no data from ${url} for ${STALL_TIMEOUT_MS / 1000} s`)),
          STALL_TIMEOUT_MS,
        );
        try {
          const { value, done } = await body.read();
          if (done) return null;
          rest = value;
        } catch (error) {
          const reason = controller.signal.reason;
          throw reason instanceof Error ? reason : error;
        } finally {
          clearTimeout(timer);
        }
      }
      const n = Math.min(buf.length, rest.length);
      buf.set(rest.subarray(0, n));
      rest = rest.subarray(n);
      return n;
    },
    close(): void {
      controller.abort(new Error("closed"));
      body.cancel().catch(() => {});
    },
  };
  return new StreamSource(url, reader, { size, kind: "http" });
}
