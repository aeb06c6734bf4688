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

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Writes all of `bytes`. */
async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
}

/** One answer: status line and headers, then `body` paced by `options`. */
async function answer(
  conn: Deno.Conn,
  status: string,
  headers: Record<string, string>,
  body: Uint8Array,
  options: ImageServerOptions,
  sendBody: boolean,
): Promise<void> {
  let head = `HTTP/1.1 ${status}\r\nContent-Length: ${body.length}\r\n`;
  for (const [name, value] of Object.entries(headers)) head += `${name}: ${value}\r\n`;
  await writeAll(conn, new TextEncoder().encode(head + "\r\n"));
  if (!sendBody) return;
  // Views of the image, no copies: the server's own cost stays small beside its clients'.
  const window = options.windowBytes ?? body.length;
  for (let sent = 0; sent < body.length; sent += window) {
    if (sent > 0) await sleep(options.rttMs ?? 0);
    await writeAll(conn, body.subarray(sent, sent + window));
  }
}

/**
 * Starts the server on a free port of 127.0.0.1: plain HTTP/1.1 with
 * keep-alive, written on the sockets directly.
 */
export function serveImage(data: Uint8Array, options: ImageServerOptions = {}): ImageServer {
  const size = data.length;
  const counts = new Map<string, number>();
  const count = (key: string) => counts.set(key, (counts.get(key) ?? 0) + 1);
  let token = 1;
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const open = new Set<Deno.Conn>();
  const served = new Set<Promise<void>>();

  /** Answers one request; false when the connection is to be closed. */
  const handle = async (conn: Deno.Conn, head: string): Promise<boolean> => {
    const [requestLine, ...lines] = head.split("\r\n");
    const [method = "", target = ""] = (requestLine ?? "").split(" ");
    const headers = new Map<string, string>();
    for (const line of lines) {
      const colon = line.indexOf(":");
      if (colon > 0) {
        headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
      }
    }
    const path = new URL(target, "http://localhost").pathname;
    count(path);
    count(`${method} ${path}`);
    const withBody = method !== "HEAD";
    const empty = new Uint8Array(0);
    if (options.rttMs) await sleep(options.rttMs);
    if (path === "/redirect/disk.img") {
      await answer(
        conn,
        "302 Found",
        { Location: `/signed/${token}/disk.img` },
        empty,
        options,
        false,
      );
    } else if (
      path !== "/disk.img" && Number(/^\/signed\/(\d+)\/disk\.img$/.exec(path)?.[1]) !== token
    ) {
      const known = /^\/signed\//.test(path);
      const text = new TextEncoder().encode(known ? "expired" : "not found");
      await answer(conn, known ? "403 Forbidden" : "404 Not Found", {}, text, options, withBody);
    } else {
      const range = /^bytes=(\d+)-(\d*)$/.exec(headers.get("range") ?? "");
      if (!range) {
        await answer(conn, "200 OK", { "Accept-Ranges": "bytes" }, data, options, withBody);
      } else {
        const start = Number(range[1]);
        const end = Math.min(range[2] === "" ? size - 1 : Number(range[2]), size - 1);
        if (start >= size) {
          await answer(
            conn,
            "416 Range Not Satisfiable",
            { "Content-Range": `bytes */${size}` },
            empty,
            options,
            withBody,
          );
        } else {
          await answer(
            conn,
            "206 Partial Content",
            { "Content-Range": `bytes ${start}-${end}/${size}` },
            data.subarray(start, end + 1),
            options,
            withBody,
          );
        }
      }
    }
    return !/close/i.test(headers.get("connection") ?? "");
  };

  const serve = async (conn: Deno.TcpConn) => {
    // As any real server: without it, a body's first segment waits for the ack of the head's.
    conn.setNoDelay(true);
    const buf = new Uint8Array(16384);
    let pending = "";
    try {
      for (;;) {
        const end = pending.indexOf("\r\n\r\n");
        if (end >= 0) {
          const head = pending.slice(0, end);
          pending = pending.slice(end + 4);
          if (!await handle(conn, head)) break;
          continue;
        }
        const n = await conn.read(buf);
        if (n === null) break;
        pending += new TextDecoder().decode(buf.subarray(0, n));
      }
    } catch {
      // The client went away.
    } finally {
      open.delete(conn);
      try {
        conn.close();
      } catch { /* closed already */ }
    }
  };

  const accepting = (async () => {
    for await (const conn of listener) {
      open.add(conn);
      const done = serve(conn);
      served.add(done);
      done.then(() => served.delete(done));
    }
  })().catch(() => {});

  const close = async () => {
    listener.close();
    for (const conn of open) {
      try {
        conn.close();
      } catch { /* closed already */ }
    }
    await accepting;
    await Promise.all(served);
  };
  const port = (listener.addr as Deno.NetAddr).port;
  const base = `http://127.0.0.1:${port}`;
  return {
    port,
    directUrl: `${base}/disk.img`,
    redirectUrl: `${base}/redirect/disk.img`,
    counts,
    expire: () => void token++,
    close,
    [Symbol.asyncDispose]: close,
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
