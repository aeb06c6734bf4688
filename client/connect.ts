/**
 * Opening the byte stream to an NBD server named by a URI: TCP or a Unix
 * socket. Errors name the server and say why in one line.
 *
 * @module
 */

import { type ByteStream, fromDenoConn } from "../io/byte_stream.ts";
import { formatNbdUri, type NbdUri, parseNbdUri } from "../protocol/uri.ts";
import { NbdConnectionError } from "./errors.ts";

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

/**
 * Connects to the server a URI names. TLS (`nbds` schemes) is refused here
 * with a clear error rather than silently connecting in plaintext.
 */
export async function openStream(uri: NbdUri): Promise<ByteStream> {
  if (uri.tls) {
    throw new NbdConnectionError(
      `Cannot connect to ${formatNbdUri(uri)}: TLS is not supported yet ` +
        `(use an nbd:// or nbd+unix:// URI for a plaintext server)`,
    );
  }
  let conn: Deno.Conn;
  try {
    switch (uri.transport) {
      case "unix":
        conn = await Deno.connect({ transport: "unix", path: uri.socket! });
        break;
      case "tcp": {
        const tcp = await Deno.connect({ hostname: uri.host!, port: uri.port! });
        tcp.setNoDelay(true);
        conn = tcp;
        break;
      }
      case "vsock":
        throw new NbdConnectionError(
          `Cannot connect to ${formatNbdUri(uri)}: vsock transport is not supported`,
        );
    }
  } catch (error) {
    if (error instanceof NbdConnectionError) throw error;
    throw new NbdConnectionError(
      `Cannot connect to NBD server at ${describeServer(uri)}: ${reason(error)}`,
      { cause: error },
    );
  }
  return fromDenoConn(conn);
}
