/**
 * A small HTTP/1.1 client for ranged GETs over plain TCP, with keep-alive
 * connections: the body of a `206 Partial Content` answer is read from the
 * socket straight into the caller's buffer. It takes about a third of the
 * processor time `fetch` takes for the same bytes, which decides the rate
 * of an import when the processor is shared. Anything out of the ordinary
 * (a redirect, a chunked or compressed body) is left to the caller, which
 * falls back to `fetch`.
 *
 * @module
 */

/** Status and headers of an answer. */
export interface Http1Answer {
  /** The body is in the caller's buffer (a plain 206 of the range asked); else it was dropped. */
  filled: boolean;
  /** The status code. */
  status: number;
  /** The reason phrase. */
  statusText: string;
  /** The headers. */
  headers: Headers;
  /** The body of a refused streamed PUT (its error document), when short. */
  body?: Uint8Array;
}

/** A PUT whose body is sent piece by piece (`Http1Pool.putStream`). */
export interface Http1Upload {
  /** Sends the next bytes of the body; the promise settles once the socket took them. */
  write(bytes: Uint8Array): Promise<void>;
  /**
   * The answer: `filled` for a 2xx; any other answer carries its short body
   * in `body`. Rejects with `Http1Error` when the connection fails.
   */
  readonly answer: Promise<Http1Answer>;
  /** Drops the connection at once: the server sees a body cut short, and keeps nothing. */
  abort(reason: Error): void;
}

/** The connection broke or timed out: worth retrying. */
export class Http1Error extends Error {
  /** Nothing of the answer had arrived, on a connection used before (the server closed it idle). */
  readonly stale: boolean;
  /** Creates the error. */
  constructor(message: string, stale = false) {
    super(message);
    this.name = "Http1Error";
    this.stale = stale;
  }
}

const HEAD_END = new Uint8Array([13, 10, 13, 10]);
const MAX_HEAD = 64 * 1024;

function indexOfHeadEnd(bytes: Uint8Array, from: number): number {
  for (let i = Math.max(0, from - 3); i + 4 <= bytes.length; i++) {
    if (
      bytes[i] === HEAD_END[0] && bytes[i + 1] === HEAD_END[1] && bytes[i + 2] === HEAD_END[2] &&
      bytes[i + 3] === HEAD_END[3]
    ) return i;
  }
  return -1;
}

/** Parses a status line and header lines. */
function parseHead(text: string): Http1Answer {
  const lines = text.split("\r\n");
  const status = /^HTTP\/1\.[01] (\d{3}) ?(.*)$/.exec(lines[0] ?? "");
  if (!status) throw new Http1Error(`not an HTTP/1.1 answer: ${JSON.stringify(lines[0])}`);
  const headers = new Headers();
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    if (colon > 0) headers.append(line.slice(0, colon).trim(), line.slice(colon + 1).trim());
  }
  return { filled: false, status: Number(status[1]), statusText: status[2] ?? "", headers };
}

/** One keep-alive connection. */
class Connection {
  readonly conn: Deno.Conn;
  /** Requests answered on it so far. */
  uses = 0;
  constructor(conn: Deno.Conn) {
    this.conn = conn;
  }
  close(): void {
    try {
      this.conn.close();
    } catch { /* already closed */ }
  }
}

/** Keep-alive connections to one `http://` origin, each carrying one request at a time. */
export class Http1Pool {
  readonly #hostname: string;
  readonly #port: number;
  readonly #host: string;
  readonly #timeout: number;
  readonly #idle: Connection[] = [];
  #closed = false;

  /** Connections to the origin of `url` (http:), with a per-request `timeout` in milliseconds. */
  constructor(url: URL, timeout: number) {
    this.#hostname = url.hostname.replace(/^\[(.*)\]$/, "$1");
    this.#port = url.port === "" ? 80 : Number(url.port);
    this.#host = url.host;
    this.#timeout = timeout;
  }

  /**
   * GETs `buf.length` bytes at `start` of `path` (with its query). On a
   * plain `206` whose `Content-Range` starts at `start` and whose length is
   * `buf.length`, the body goes into `buf` (`filled`); any other answer is
   * returned with its body unread (and its connection closed). Throws `Http1Error` when the connection fails.
   */
  async getRange(
    path: string,
    headers: Headers,
    start: number,
    buf: Uint8Array,
  ): Promise<Http1Answer> {
    let request = `GET ${path} HTTP/1.1\r\nHost: ${this.#host}\r\n`;
    for (const [name, value] of headers) request += `${name}: ${value}\r\n`;
    request += `Range: bytes=${start}-${start + buf.length - 1}\r\n\r\n`;
    return await this.#pooled((connection) =>
      this.#exchange(connection, request, undefined, async (answer, early) => {
        const length = answer.headers.get("Content-Length");
        const range = /^bytes (\d+)-(\d+)\//.exec(answer.headers.get("Content-Range") ?? "");
        const plain = !answer.headers.has("Transfer-Encoding") &&
          !answer.headers.has("Content-Encoding");
        if (
          answer.status !== 206 || !plain || length !== String(buf.length) || !range ||
          Number(range[1]) !== start
        ) {
          return false;
        }
        if (early.length > buf.length) throw new Http1Error("more bytes than Content-Length");
        buf.set(early);
        for (let got = early.length; got < buf.length;) {
          const n = await connection.conn.read(buf.subarray(got));
          if (n === null) {
            throw new Http1Error(`short read from ${this.#host}: ${got} of ${buf.length} bytes`);
          }
          got += n;
        }
        return true;
      })
    );
  }

  /**
   * Sends a HEAD for `path` (with its query) and returns the answer, whatever
   * its status (`filled` once it is read whole: a HEAD answer has no body).
   * Throws `Http1Error` when the connection fails.
   */
  async head(path: string, headers: Headers): Promise<Http1Answer> {
    let request = `HEAD ${path} HTTP/1.1\r\nHost: ${this.#host}\r\n`;
    for (const [name, value] of headers) request += `${name}: ${value}\r\n`;
    request += "\r\n";
    return await this.#pooled((connection) =>
      this.#exchange(connection, request, undefined, (_answer, early) => {
        // Bytes past the head would be the next answer's: the connection cannot be trusted.
        return Promise.resolve(early.length === 0);
      })
    );
  }

  /**
   * PUTs `body` to `path` (with its query), written to the socket from the
   * caller's buffer. Returns the answer when it is a 2xx with an empty or
   * short body (read and dropped); any other answer comes back with
   * `filled` false and its connection closed. Throws `Http1Error` when the
   * connection fails.
   */
  async put(path: string, headers: Headers, body: Uint8Array): Promise<Http1Answer> {
    let request = `PUT ${path} HTTP/1.1\r\nHost: ${this.#host}\r\n`;
    for (const [name, value] of headers) request += `${name}: ${value}\r\n`;
    request += `Content-Length: ${body.length}\r\n\r\n`;
    return await this.#pooled((connection) =>
      this.#exchange(connection, request, body, async (answer, early) => {
        const length = answer.headers.get("Content-Length");
        const ok = answer.status >= 200 && answer.status < 300 && length !== null &&
          Number(length) <= MAX_HEAD && !answer.headers.has("Transfer-Encoding");
        if (!ok) return false;
        // A short body (an S3 part's answer has none): read and dropped.
        let rest = Number(length) - early.length;
        const scratch = new Uint8Array(Math.max(0, rest));
        while (rest > 0) {
          const n = await connection.conn.read(scratch.subarray(0, rest));
          if (n === null) throw new Http1Error(`short answer from ${this.#host}`);
          rest -= n;
        }
        return true;
      })
    );
  }

  /**
   * Starts a PUT of `length` bytes to `path` (with its query) on a
   * connection of its own (an idle one could turn out stale once part of
   * the body is gone, and the body cannot be sent again). The caller sends
   * the body with `write`, in order; the timeout applies to each write and
   * to the answer, not to the whole upload. A server that answers before
   * the body is all there (a refusal) still has its answer read.
   */
  putStream(path: string, headers: Headers, length: number): Http1Upload {
    let request = `PUT ${path} HTTP/1.1\r\nHost: ${this.#host}\r\n`;
    for (const [name, value] of headers) request += `${name}: ${value}\r\n`;
    request += `Content-Length: ${length}\r\n\r\n`;
    let connection: Connection | undefined;
    let send: ((bytes: Uint8Array) => Promise<void>) | undefined;
    let sent = 0;
    const ready = Promise.withResolvers<void>();
    const done = Promise.withResolvers<void>();
    ready.promise.catch(() => {});
    done.promise.catch(() => {});
    const body = async (write: (bytes: Uint8Array) => Promise<void>) => {
      send = write;
      ready.resolve();
      await done.promise;
    };
    const answer = this.#connect().then((opened) => {
      connection = opened;
      return this.#exchange(opened, request, body, async (answer, early) => {
        const length = Number(answer.headers.get("Content-Length") ?? "0");
        const ok = answer.status >= 200 && answer.status < 300;
        if (answer.headers.has("Transfer-Encoding") || !(length <= MAX_HEAD)) return false;
        const text = new Uint8Array(length);
        text.set(early.subarray(0, length));
        for (let got = Math.min(early.length, length); got < length;) {
          const n = await opened.conn.read(text.subarray(got));
          if (n === null) throw new Http1Error(`short answer from ${this.#host}`);
          got += n;
        }
        if (!ok) answer.body = text;
        return ok;
      });
    });
    answer.catch((error) => ready.reject(error));
    return {
      answer,
      write: async (bytes) => {
        if (sent + bytes.length > length) throw new Error("more bytes than the Content-Length");
        await ready.promise;
        try {
          await send!(bytes);
        } catch (error) {
          // The exchange stops waiting for the body, and reads the answer if there is one.
          done.reject(error);
          throw error;
        }
        sent += bytes.length;
        if (sent === length) done.resolve();
      },
      abort: (reason) => {
        done.reject(reason);
        ready.reject(reason);
        connection?.close();
      },
    };
  }

  /** Runs `exchange` on an idle connection, or a new one; once more on a new one if the idle one was stale. */
  async #pooled(exchange: (connection: Connection) => Promise<Http1Answer>): Promise<Http1Answer> {
    const reused = this.#idle.pop();
    try {
      return await exchange(reused ?? await this.#connect());
    } catch (error) {
      // A connection the server closed while it sat idle: once more on a new one.
      if (!(error instanceof Http1Error && error.stale && reused)) throw error;
      return await exchange(await this.#connect());
    }
  }

  async #connect(): Promise<Connection> {
    try {
      const conn = await Deno.connect({ hostname: this.#hostname, port: this.#port });
      conn.setNoDelay(true);
      return new Connection(conn);
    } catch (error) {
      throw new Http1Error(`connecting to ${this.#host}: ${(error as Error).message}`);
    }
  }

  /**
   * Sends `request` (a head) and `body`, reads the answer's head, and lets
   * `readBody` take the body (given what of it came with the head): it
   * resolves false to return the answer unfilled, its connection closed.
   * The timeout, keep-alive and the mapping of failures are the same for
   * every request.
   */
  async #exchange(
    connection: Connection,
    request: string,
    body: Uint8Array | ((write: (bytes: Uint8Array) => Promise<void>) => Promise<void>) | undefined,
    readBody: (answer: Http1Answer, early: Uint8Array) => Promise<boolean>,
  ): Promise<Http1Answer> {
    let timedOut = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    // Armed again by each piece of a streamed body: the timeout bounds waits, not uploads.
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        timedOut = true;
        connection.close();
      }, this.#timeout);
    };
    arm();
    let received = 0;
    let keep = false;
    try {
      const bytes = new TextEncoder().encode(request);
      for (let sent = 0; sent < bytes.length;) {
        sent += await connection.conn.write(bytes.subarray(sent));
      }
      if (typeof body === "function") {
        let refused: unknown;
        try {
          await body(async (bytes) => {
            arm();
            try {
              for (let sent = 0; sent < bytes.length;) {
                sent += await connection.conn.write(bytes.subarray(sent));
              }
            } catch (error) {
              refused = error;
              throw new Http1Error(`${this.#host}: ${(error as Error).message}`);
            }
          });
        } catch (error) {
          // Only a server that stopped reading may have said why; anything else ends here.
          if (refused === undefined) throw error;
        }
        arm();
      } else {
        for (let sent = 0; body && sent < body.length;) {
          sent += await connection.conn.write(body.subarray(sent));
        }
      }
      const { head, end, length } = await this.#readHead(connection, (n) => received = n);
      const answer = parseHead(new TextDecoder().decode(head.subarray(0, end)));
      if (!await readBody(answer, head.subarray(end + 4, length))) return answer;
      // HTTP/1.0 closes after each answer unless it says otherwise.
      const persistence = answer.headers.get("Connection") ?? "";
      keep = head[7] === 0x31 /* "HTTP/1.1" */
        ? !/\bclose\b/i.test(persistence)
        : /\bkeep-alive\b/i.test(persistence);
      answer.filled = true;
      return answer;
    } catch (error) {
      if (timedOut) throw new Http1Error(`${this.#host}: no answer within ${this.#timeout} ms`);
      if (error instanceof Http1Error) throw error;
      throw new Http1Error(
        `${this.#host}: ${(error as Error).message}`,
        received === 0 && connection.uses > 0,
      );
    } finally {
      clearTimeout(timer);
      connection.uses++;
      if (keep && !timedOut && !this.#closed) this.#idle.push(connection);
      else connection.close();
    }
  }

  /**
   * Reads an answer's head, and whatever part of the body came with it:
   * `end` is where the blank line starts, `length` the bytes received.
   * `progress` hears the count as it grows (for the stale-connection test).
   */
  async #readHead(
    connection: Connection,
    progress: (received: number) => void,
  ): Promise<{ head: Uint8Array; end: number; length: number }> {
    let head = new Uint8Array(4096);
    let received = 0;
    let end = -1;
    while (end < 0) {
      if (received === head.length) {
        if (head.length >= MAX_HEAD) {
          throw new Http1Error(`answer headers over ${MAX_HEAD} bytes`);
        }
        const bigger = new Uint8Array(head.length * 2);
        bigger.set(head);
        head = bigger;
      }
      const n = await connection.conn.read(head.subarray(received));
      if (n === null) {
        throw new Http1Error(
          `${this.#host} closed the connection`,
          received === 0 && connection.uses > 0,
        );
      }
      const before = received;
      received += n;
      progress(received);
      end = indexOfHeadEnd(head.subarray(0, received), before);
    }
    return { head, end, length: received };
  }

  close(): void {
    this.#closed = true;
    for (const connection of this.#idle.splice(0)) connection.close();
  }
}
