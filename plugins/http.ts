/**
 * The `http` plugin (alias `curl`): a remote disk image over HTTP or
 * HTTPS, read-only. The size comes from HEAD (or from the Content-Range of
 * a first ranged GET), reads are Range GETs with several in flight, and
 * transient failures (network errors, 408, 429, 5xx) are retried with
 * exponential back-off. A server that ignores Range requests is refused
 * at start-up with a clear error, since reading it would mean downloading
 * the whole image for every request.
 *
 * ```
 * nbd serve http https://example.com/disk.img
 * nbd serve http url=https://example.com/disk.img header='Authorization: Bearer X' connections=8
 * ```
 *
 * Parameters:
 * - `[url=]URL` (required): http:// or https://.
 * - `header=NAME: VALUE` (repeatable): extra request headers.
 * - `cookie=COOKIE`: a Cookie header.
 * - `user=NAME`, `password=PASSWORD|+FILE`: HTTP basic authentication.
 * - `user-agent=TEXT`.
 * - `cainfo=FILE`: trust the CA certificates in FILE (PEM).
 * - `timeout=SECS`: per-request timeout (default 60).
 * - `connections=N`: requests in flight at once (default 4).
 * - `followlocation=false`: fail on redirects instead of following them.
 * - `http-retries=N`: retries of a failed request (default 5).
 * - `http-retry-delay=SECS|NNms`: first back-off wait (default 1s, doubling).
 *
 * @module
 */

import { completeBackend, type Plugin } from "../core/backend.ts";
import type { Params } from "../core/params.ts";
import { UsageError } from "../util/usage_error.ts";
import { HttpImage, type HttpOptions } from "../io/http_image.ts";

function secretValue(value: string): string {
  if (value.startsWith("+")) return Deno.readTextFileSync(value.slice(1)).replace(/\r?\n$/, "");
  return value;
}

/** Reads the plugin's parameters. */
function httpOptions(params: Params): HttpOptions {
  const url = params.take("url")!;
  if (!/^https?:\/\//i.test(url)) throw new UsageError(`http: url must be http:// or https://`);
  const headers = new Headers();
  for (const header of params.takeAll("header")) {
    const colon = header.indexOf(":");
    if (colon <= 0) throw new UsageError(`header: expected "Name: value", got "${header}"`);
    headers.append(header.slice(0, colon).trim(), header.slice(colon + 1).trim());
  }
  const cookie = params.take("cookie");
  if (cookie !== undefined) headers.set("Cookie", secretValue(cookie));
  const user = params.take("user");
  const password = params.take("password");
  if (user !== undefined) {
    const credentials = `${user}:${password === undefined ? "" : secretValue(password)}`;
    headers.set("Authorization", `Basic ${btoa(credentials)}`);
  }
  headers.set("User-Agent", params.take("user-agent") ?? "nbd-http");
  const cainfo = params.take("cainfo");
  const sslverify = params.takeBoolean("sslverify");
  if (sslverify === false) {
    throw new UsageError("sslverify=false is not supported; trust the server's CA with cainfo=");
  }
  const options: HttpOptions = {
    url,
    headers,
    connections: params.takeInteger("connections", 1, 64) ?? 4,
    timeout: params.takeDuration("timeout") ?? 60000,
    retries: params.takeInteger("http-retries", 0, 100) ?? 5,
    retryDelay: params.takeDuration("http-retry-delay") ?? 1000,
    follow: params.takeBoolean("followlocation") ?? true,
  };
  if (cainfo) {
    options.client = Deno.createHttpClient({ caCerts: [Deno.readTextFileSync(cainfo)] });
  }
  return options;
}

function makeHttpPlugin(name: string): Plugin {
  return {
    name,
    summary: name === "http"
      ? "remote disk image over HTTP(S) with Range requests (read-only)"
      : "alias of http",
    description: "Examples:\n  nbd serve http https://example.com/disk.img\n" +
      "  nbd serve http url=https://example.com/disk.img header='Authorization: Bearer X'",
    params: [
      {
        name: "url",
        value: "URL",
        type: "string",
        description: "the image (http:// or https://)",
        required: true,
      },
      {
        name: "header",
        value: "'NAME: VALUE'",
        type: "string",
        description: "extra header",
        repeatable: true,
      },
      {
        name: "cookie",
        value: "COOKIE|+FILE",
        type: "string",
        description: "Cookie header (+FILE reads it from FILE)",
      },
      { name: "user", value: "NAME", type: "string", description: "basic authentication user" },
      {
        name: "password",
        value: "PASSWORD|+FILE",
        type: "string",
        description: "basic authentication password (+FILE reads it from FILE)",
      },
      {
        name: "user-agent",
        value: "TEXT",
        type: "string",
        default: "nbd-http",
        description: "User-Agent header",
      },
      {
        name: "cainfo",
        value: "FILE",
        type: "path",
        description: "trust the CA certificates in FILE (PEM)",
      },
      {
        name: "sslverify",
        value: "BOOL",
        type: "boolean",
        default: "true",
        description: "verify the server certificate (false is refused)",
      },
      {
        name: "timeout",
        value: "SECS|NNms",
        type: "duration",
        default: "60",
        description: "per-request timeout",
      },
      {
        name: "connections",
        value: "N",
        type: "integer",
        default: "4",
        description: "requests in flight at once (1 to 64)",
      },
      {
        name: "followlocation",
        value: "BOOL",
        type: "boolean",
        default: "true",
        description: "follow redirects",
      },
      {
        name: "http-retries",
        value: "N",
        type: "integer",
        default: "5",
        description: "retries of a failed request (0 to 100)",
      },
      {
        name: "http-retry-delay",
        value: "SECS|NNms",
        type: "duration",
        default: "1",
        description: "first back-off wait, doubling after each retry",
      },
    ],
    magicParam: "url",
    async create(params) {
      const image = new HttpImage(httpOptions(params));
      try {
        await image.open();
      } catch (error) {
        image.close();
        if (error instanceof UsageError) throw error;
        throw new UsageError(`http: ${(error as Error).message}`);
      }
      return {
        open: () =>
          Promise.resolve(completeBackend({
            size: () => image.size,
            capabilities: () => ({ multiConn: true, cache: "none" }),
            pread: (buf, offset) => image.read(buf, offset),
          })),
        close() {
          image.close();
          return Promise.resolve();
        },
      };
    },
  };
}

/** The http plugin. */
export const httpPlugin: Plugin = makeHttpPlugin("http");
/** The curl plugin: the same as http, under nbdkit's name. */
export const curlPlugin: Plugin = { ...makeHttpPlugin("curl"), aliasOf: "http" };
