/**
 * An http(s) URL as a copy source: the size from HEAD (or the first ranged
 * GET), then Range requests with several in flight, retried on transient
 * failures. This reuses the http plugin's `HttpImage`, so both behave alike.
 *
 * @module
 */

import { HttpImage } from "../plugins/http.ts";
import type { BlockSize } from "../protocol/handshake.ts";
import { BaseEndpoint } from "./endpoint.ts";

/** Options of `HttpSource.open`. */
export interface HttpSourceOptions {
  /** Requests in flight at once (default 4). */
  connections?: number;
}

/** A remote image read with Range requests. */
export class HttpSource extends BaseEndpoint {
  readonly name: string;
  readonly kind = "http";
  readonly size: number;
  readonly blockSize: BlockSize = { minimum: 1, preferred: 4096, maximum: 64 << 20 };
  readonly #image: HttpImage;

  private constructor(name: string, image: HttpImage) {
    super();
    this.name = name;
    this.#image = image;
    this.size = image.size;
  }

  /** Finds the size of `url` and checks that the server honours Range requests. */
  static async open(url: string, options: HttpSourceOptions): Promise<HttpSource> {
    const image = new HttpImage({
      url,
      headers: new Headers({ "User-Agent": "nbd-copy" }),
      connections: Math.max(1, options.connections ?? 4),
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
      // The plugin's messages start with "http: " or an errno name; here the URL says enough.
      const message = (error as Error).message.replace(/^http: /, "").replace(/^E[A-Z]+: /, "");
      throw new Error(message, { cause: error });
    }
    return new HttpSource(url, image);
  }

  /** One Range GET for the buffer. */
  override async read(buf: Uint8Array, offset: number): Promise<number> {
    await this.#image.read(buf, offset);
    return buf.length;
  }
}
