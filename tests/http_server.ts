/**
 * An HTTP server for tests and benchmarks of http imports: it serves one
 * image with Range support at `/disk.img`, a redirect to it at
 * `/redirect/disk.img` (302 to `/signed/TOKEN/disk.img`, where only the
 * current token is valid, as with a signed URL that expires), and counts
 * requests per path. It can add a round-trip time before each answer and
 * pace each body as one TCP stream with a fixed window would go over that
 * round trip, so that a single stream is slower than several in parallel,
 * as over a long link.
 *
 * As a script (for benchmarks, in its own process, with the image in memory):
 *
 * ```
 * deno run -A tests/http_server.ts FILE [--rtt=MS] [--window=BYTES]
 * ```
 *
 * prints `port N` once it listens.
 *
 * @module
 */

/** Settings of the server. */
export interface ImageServerOptions {
  /** Milliseconds before each answer's headers, and between two windows of a body. */
  rttMs?: number;
  /** Bytes of a body sent per round trip (default: all at once). */
  windowBytes?: number;
}

/** A running image server. */
export interface ImageServer extends AsyncDisposable {
  /** Its port on 127.0.0.1. */
  port: number;
  /** The image, served directly. */
  directUrl: string;
  /** The redirect to the image. */
  redirectUrl: string;
  /** Requests per path, then per `METHOD path`. */
  counts: Map<string, number>;
  /** Makes the signed URLs given so far invalid (they answer 403 from now on). */
  expire(): void;
  /** Stops the server. */
  close(): Promise<void>;
}

/** The part of a body sent at once, so that pacing and cancellation have a grain. */
const CHUNK = 1 << 20;

/** `length` bytes of `data` from `start`, paced by `options`. */
function body(
  data: Uint8Array<ArrayBuffer>,
  start: number,
  length: number,
  options: ImageServerOptions,
): Uint8Array<ArrayBuffer> | ReadableStream<Uint8Array> {
  const window = options.windowBytes;
  // Unpaced: the runtime copies the range once, with no stream machinery in the way.
  if (window === undefined) return data.subarray(start, start + length);
  let sent = 0;
  let inWindow = 0;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (sent >= length) {
        controller.close();
        return;
      }
      if (inWindow >= window) {
        await new Promise((resolve) => setTimeout(resolve, options.rttMs ?? 0));
        inWindow = 0;
      }
      const n = Math.min(CHUNK, length - sent, window - inWindow);
      // A copy: a view would let the runtime take (detach) the whole image's buffer.
      controller.enqueue(data.slice(start + sent, start + sent + n));
      sent += n;
      inWindow += n;
    },
  });
}

/** Starts the server on a free port of 127.0.0.1. */
export function serveImage(
  bytes: Uint8Array,
  options: ImageServerOptions = {},
): ImageServer {
  const data = bytes.buffer instanceof ArrayBuffer
    ? new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength)
    : new Uint8Array(bytes);
  const size = data.length;
  const counts = new Map<string, number>();
  const count = (key: string) => counts.set(key, (counts.get(key) ?? 0) + 1);
  let token = 1;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    const path = new URL(req.url).pathname;
    count(path);
    count(`${req.method} ${path}`);
    if (options.rttMs) await new Promise((resolve) => setTimeout(resolve, options.rttMs));
    if (path === "/redirect/disk.img") {
      return new Response(null, {
        status: 302,
        headers: { Location: `/signed/${token}/disk.img` },
      });
    }
    const signed = /^\/signed\/(\d+)\/disk\.img$/.exec(path);
    if (signed && Number(signed[1]) !== token) return new Response("expired", { status: 403 });
    if (!signed && path !== "/disk.img") return new Response("not found", { status: 404 });
    if (req.method === "HEAD") {
      return new Response(null, {
        headers: { "Content-Length": String(size), "Accept-Ranges": "bytes" },
      });
    }
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.get("Range") ?? "");
    if (!range) {
      return new Response(body(data, 0, size, options), {
        headers: { "Content-Length": String(size) },
      });
    }
    const start = Number(range[1]);
    const end = Math.min(range[2] === "" ? size - 1 : Number(range[2]), size - 1);
    if (start >= size) {
      return new Response(null, { status: 416, headers: { "Content-Range": `bytes */${size}` } });
    }
    return new Response(body(data, start, end - start + 1, options), {
      status: 206,
      headers: {
        "Content-Range": `bytes ${start}-${end}/${size}`,
        "Content-Length": String(end - start + 1),
      },
    });
  });
  const base = `http://127.0.0.1:${server.addr.port}`;
  return {
    port: server.addr.port,
    directUrl: `${base}/disk.img`,
    redirectUrl: `${base}/redirect/disk.img`,
    counts,
    expire: () => void token++,
    close: () => server.shutdown(),
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

if (import.meta.main) {
  const [path, ...flags] = Deno.args;
  if (!path) {
    console.error("usage: http_server.ts FILE [--rtt=MS] [--window=BYTES]");
    Deno.exit(2);
  }
  const flag = (name: string) => {
    const value = flags.find((f) => f.startsWith(`--${name}=`))?.split("=")[1];
    return value === undefined ? undefined : Number(value);
  };
  const server = serveImage(await Deno.readFile(path), {
    rttMs: flag("rtt"),
    windowBytes: flag("window"),
  });
  console.log(`port ${server.port}`);
}
