/**
 * Opening the byte stream to an NBD server named by a URI: TCP or a Unix
 * socket. Errors name the server and say why in one line.
 *
 * @module
 */

import { type ByteStream, fromDenoConn, fromNodeSocket } from "../io/byte_stream.ts";
import { formatNbdUri, type NbdUri, parseNbdUri } from "../protocol/uri.ts";
import { NbdConnectionError } from "./errors.ts";
import { unixSocketUnsupported } from "../io/platform.ts";
import { connectWithFd } from "../io/socket_fast.ts";
import { abortError } from "../util/signals.ts";

/** Options of `openStream`. */
export interface OpenStreamOptions {
  /**
   * Use a plain connection (TCP or Unix) for TLS, upgraded later by the
   * runtime's own TLS (see `clientTlsPath` in tls.ts), not a node:net socket.
   */
  nativeTls?: boolean;
  /** Milliseconds the connection may take to open (0 or undefined = no limit). */
  timeoutMs?: number;
  /** Stops the attempt. */
  signal?: AbortSignal;
}

/** "10 s", "0.5 s": a timeout for messages. */
export function seconds(ms: number): string {
  return `${Number((ms / 1000).toFixed(3))} s`;
}

/** Parses `uri` if it is a string; URI syntax errors name the part that is wrong. */
export function toNbdUri(uri: string | NbdUri): NbdUri {
  return typeof uri === "string" ? parseNbdUri(uri) : uri;
}

/** Where a URI points, for error messages: "unix socket /x" or "host:port". */
export function describeServer(uri: NbdUri): string {
  switch (uri.transport) {
    case "unix":
      return `Unix socket ${uri.socket}`;
    case "tcp":
      return `${uri.host?.includes(":") ? `[${uri.host}]` : uri.host}:${uri.port}`;
    case "vsock":
      return `vsock ${uri.cid}:${uri.port}`;
  }
}

function reason(error: unknown): string {
  if (error instanceof Deno.errors.NotFound) return "no such socket";
  if (error instanceof Deno.errors.ConnectionRefused) return "connection refused";
  if (error instanceof Deno.errors.PermissionDenied) return "permission denied";
  if (error instanceof Deno.errors.TimedOut) return "timed out";
  const message = error instanceof Error ? error.message : String(error);
  // Deno appends the OS error code, e.g. "Connection refused (os error 111)".
  return message.replace(/\s*\(os error \d+\)$/, "").toLowerCase();
}

/** Connects through node:net, whose sockets can be upgraded to TLS mid-stream. */
async function openNodeStream(uri: NbdUri, signal: AbortSignal): Promise<ByteStream> {
  // Loaded on demand: only TLS connections need it, and it slows every start-up.
  const net = await import("node:net");
  return await new Promise((resolve, reject) => {
    const socket = uri.transport === "unix"
      ? net.connect({ path: uri.socket! })
      : net.connect({ host: uri.host!, port: uri.port! });
    const onAbort = () => {
      socket.destroy();
      reject(signal.reason);
    };
    if (signal.aborted) return onAbort();
    signal.addEventListener("abort", onAbort, { once: true });
    socket.once("connect", () => {
      signal.removeEventListener("abort", onAbort);
      socket.off("error", onError);
      if (uri.transport === "tcp") socket.setNoDelay(true);
      resolve(fromNodeSocket(socket));
    });
    const onError = (error: Error) => {
      signal.removeEventListener("abort", onAbort);
      socket.destroy();
      const code = (error as { code?: string }).code;
      const why = code === "ENOENT"
        ? "no such socket"
        : code === "ECONNREFUSED"
        ? "connection refused"
        : code === "EACCES"
        ? "permission denied"
        : error.message.toLowerCase();
      reject(
        new NbdConnectionError(`Cannot connect to NBD server at ${describeServer(uri)}: ${why}`, {
          cause: error,
        }),
      );
    };
    socket.once("error", onError);
  });
}

/**
 * Connects to the server a URI names. For TLS (`nbds` schemes) the socket
 * is one that can be upgraded after NBD_OPT_STARTTLS: a plain connection
 * with `nativeTls`, else a node:net socket. A connection that
 * does not open within `timeoutMs` (a host that drops the packets) fails
 * with "no answer"; `signal` stops the attempt with its reason.
 */
export async function openStream(
  uri: NbdUri,
  options: OpenStreamOptions = {},
): Promise<ByteStream> {
  if (uri.transport === "vsock") {
    throw new NbdConnectionError(
      `Cannot connect to ${formatNbdUri(uri)}: vsock transport is not supported`,
    );
  }
  const timeoutMs = options.timeoutMs ?? 0;
  const attempt = new AbortController();
  const timeout = new NbdConnectionError(
    `Cannot connect to NBD server at ${describeServer(uri)}: no answer within ${
      seconds(timeoutMs)
    }`,
  );
  const timer = timeoutMs > 0 ? setTimeout(() => attempt.abort(timeout), timeoutMs) : undefined;
  const onAbort = () =>
    attempt.abort(abortError(options.signal!, `while connecting to ${describeServer(uri)}`));
  if (options.signal?.aborted) onAbort();
  options.signal?.addEventListener("abort", onAbort, { once: true });
  try {
    return await raceAbort(openStreamNow(uri, options, attempt.signal), attempt.signal);
  } finally {
    clearTimeout(timer);
    options.signal?.removeEventListener("abort", onAbort);
  }
}

/**
 * `opening`, or a rejection with the reason as soon as `signal` aborts; a
 * stream that opens after that is closed.
 */
function raceAbort(opening: Promise<ByteStream>, signal: AbortSignal): Promise<ByteStream> {
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      reject(signal.reason);
      opening.then((stream) => stream.close(), () => {});
    };
    if (signal.aborted) return onAbort();
    signal.addEventListener("abort", onAbort, { once: true });
    opening.then(
      (stream) => {
        signal.removeEventListener("abort", onAbort);
        if (signal.aborted) stream.close();
        else resolve(stream);
      },
      (error) => {
        signal.removeEventListener("abort", onAbort);
        reject(signal.aborted ? signal.reason : error);
      },
    );
  });
}

async function openStreamNow(
  uri: NbdUri,
  options: OpenStreamOptions,
  signal: AbortSignal,
): Promise<ByteStream> {
  // TLS that the runtime's own TLS can do (see tls.ts) starts on a plain connection.
  const native = uri.tls && options.nativeTls === true;
  if (uri.tls && !native) return await openNodeStream(uri, signal);
  let conn: Deno.Conn;
  let fd: number | undefined;
  try {
    switch (uri.transport) {
      case "unix":
        ({ conn, fd } = await connectWithFd(() =>
          Deno.connect({ transport: "unix", path: uri.socket! })
        ));
        break;
      case "tcp": {
        // Not in turn: each TCP connection takes a round trip to open.
        const opened = await connectWithFd(
          () => Deno.connect({ hostname: uri.host!, port: uri.port!, signal }),
          false,
        );
        opened.conn.setNoDelay(true);
        ({ conn, fd } = opened);
        break;
      }
      default:
        throw new NbdConnectionError(`Cannot connect to ${formatNbdUri(uri)}: unsupported`);
    }
  } catch (error) {
    if (signal.aborted) throw signal.reason;
    if (error instanceof NbdConnectionError) throw error;
    const why = (uri.transport === "unix" ? unixSocketUnsupported(error) : undefined) ??
      reason(error);
    throw new NbdConnectionError(
      `Cannot connect to NBD server at ${describeServer(uri)}: ${why}`,
      { cause: error },
    );
  }
  return fromDenoConn(conn, fd, { upgradable: native });
}
