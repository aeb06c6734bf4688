/**
 * The client side of NBD's STARTTLS: X.509 credentials from a directory
 * (`tls-certificates=DIR`: ca-cert.pem, and client-cert.pem/client-key.pem
 * when present) and the upgrade of the plaintext socket after the server's
 * ACK. Server certificates are always verified unless the URI says
 * `tls-verify-peer=false`.
 *
 * @module
 */

import { type ByteStream, fromDenoConn, fromNodeSocket } from "../io/byte_stream.ts";
import type { NbdUri } from "../protocol/uri.ts";
import { NbdConnectionError } from "./errors.ts";
import { type LoopbackBridge, openLoopbackBridge } from "../io/loopback_bridge.ts";
import { platform } from "../io/platform.ts";

/** Where libnbd looks for certificates when the URI names no directory. */
function defaultCertificateDirs(): string[] {
  const home = Deno.env.get("HOME");
  const dirs = home ? [`${home}/.pki/libnbd`, `${home}/.config/pki/libnbd`] : [];
  return [...dirs, "/etc/pki/libnbd"];
}

function readIfPresent(path: string): string | undefined {
  try {
    return Deno.readTextFileSync(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw new NbdConnectionError(
      `Cannot read TLS credentials ${path}: ${(error as Error).message}`,
    );
  }
}

/** The TLS settings a URI asks for. */
export interface ClientTlsSettings {
  /** CA certificates (PEM); undefined = the system's trust store. */
  ca?: string;
  /** Client certificate and key (PEM), when the directory has them. */
  cert?: string;
  /** Client key. */
  key?: string;
  /** Name to check the server certificate against; undefined = do not check the name. */
  hostname?: string;
  /** Verify the server's certificate (default true). */
  verify: boolean;
}

/** Works out the credentials and checks from a URI. */
export function clientTlsSettings(uri: NbdUri): ClientTlsSettings {
  if (uri.tlsPskFile !== undefined || uri.tlsType === "psk") {
    throw new NbdConnectionError(
      "TLS-PSK is not supported by this build's TLS library: use X.509 certificates (tls-certificates=DIR)",
    );
  }
  let dir = uri.tlsCertificates;
  if (dir === undefined) {
    dir = defaultCertificateDirs().find((d) => readIfPresent(`${d}/ca-cert.pem`) !== undefined);
  } else {
    try {
      if (!Deno.statSync(dir).isDirectory) throw new Error("not a directory");
    } catch (error) {
      throw new NbdConnectionError(
        `Cannot use tls-certificates=${dir}: ${(error as Error).message}`,
      );
    }
  }
  const ca = dir ? readIfPresent(`${dir}/ca-cert.pem`) : undefined;
  const cert = dir ? readIfPresent(`${dir}/client-cert.pem`) : undefined;
  const key = dir ? readIfPresent(`${dir}/client-key.pem`) : undefined;
  // Over TCP the host is the name to verify; over a Unix socket there is no
  // name unless the URI gives tls-hostname (then only the chain is checked).
  const hostname = uri.tlsHostname ?? (uri.transport === "tcp" ? uri.host : undefined);
  return {
    ca,
    cert: cert && key ? cert : undefined,
    key: cert && key ? key : undefined,
    hostname,
    verify: uri.tlsVerifyPeer !== false,
  };
}

/**
 * How a connection's TLS is made:
 * - "native": the runtime's own TLS started on the TCP connection
 *   (`Deno.startTls`): over TCP, with the server's certificate and name
 *   verified and no client certificate (which it cannot send);
 * - "bridge": the runtime's own TLS (`Deno.connectTls`, which can send a
 *   client certificate and check only the chain) through a loopback bridge
 *   to the socket (io/loopback_bridge.ts): on the Linux fast paths, for a
 *   Unix socket, or TCP to this machine (localhost, 127.0.0.1, ::1), when
 *   the name to check is absent (a Unix socket without tls-hostname: the
 *   chain only) or one the bridge can stand for (localhost, 127.0.0.1, ::1);
 * - "node": node:tls on a node:net socket, for everything else
 *   (tls-verify-peer=false, other names, the portable paths).
 *
 * The runtime's TLS moves data at about twice the speed of node:tls, for
 * less processor time and memory (docs/performance.md).
 */
export function clientTlsPath(
  uri: NbdUri,
  settings: ClientTlsSettings,
): "native" | "bridge" | "node" {
  if (!settings.verify) return "node";
  if (uri.transport === "tcp" && settings.cert === undefined && settings.hostname !== undefined) {
    return "native";
  }
  if (!platform().linuxFast) return "node";
  const loopbackName = settings.hostname === undefined ||
    LOOPBACK_NAMES.includes(settings.hostname.toLowerCase());
  if (uri.transport === "unix") return loopbackName ? "bridge" : "node";
  if (uri.transport === "tcp" && LOOPBACK_NAMES.includes(uri.host!.toLowerCase())) {
    return loopbackName ? "bridge" : "node";
  }
  return "node";
}

/** Names that a loopback bridge listens on, so the runtime's TLS can check them. */
const LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"];

/** Whether the runtime's own TLS makes this connection, directly or through a bridge. */
export function nativeTlsPossible(uri: NbdUri, settings: ClientTlsSettings): boolean {
  return clientTlsPath(uri, settings) !== "node";
}

const HANDSHAKE_TIMEOUT_MS = 30_000;

/**
 * Waits for the handshake of `secure`; on failure or after `timeoutMs`
 * closes it (and `also`) and rejects with a one-line reason.
 */
async function finishHandshake(
  secure: Deno.TlsConn,
  server: string,
  timeoutMs: number,
  also: () => void = () => {},
): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await Promise.race([
      secure.handshake(),
      new Promise((_, reject) => {
        timer = setTimeout(
          () => reject(new NbdConnectionError(`TLS handshake with ${server} timed out`)),
          timeoutMs,
        );
      }),
    ]);
  } catch (error) {
    try {
      secure.close();
    } catch { /* already closed */ }
    also();
    if (error instanceof NbdConnectionError) throw error;
    throw new NbdConnectionError(
      `TLS handshake with ${server} failed: ${oneLine(error)}`,
      { cause: error },
    );
  } finally {
    clearTimeout(timer);
  }
}

/** An error's message on one line. */
function oneLine(error: unknown): string {
  return (error instanceof Error ? error.message : String(error)).split("\n")[0]!.trim();
}

/** TLS on a plain TCP connection with the runtime's own TLS. */
async function startNativeTls(
  conn: Deno.TcpConn,
  settings: ClientTlsSettings,
  server: string,
  timeoutMs: number,
): Promise<ByteStream> {
  let secure: Deno.TlsConn;
  try {
    secure = await Deno.startTls(conn, {
      hostname: settings.hostname!,
      caCerts: settings.ca === undefined ? undefined : [settings.ca],
    });
  } catch (error) {
    try {
      conn.close();
    } catch { /* already closed */ }
    throw new NbdConnectionError(
      `TLS handshake with ${server} failed: ${oneLine(error)}`,
      { cause: error },
    );
  }
  await finishHandshake(secure, server, timeoutMs);
  return fromDenoConn(secure);
}

/**
 * TLS with the runtime's own TLS over any plain connection: `Deno.connectTls`
 * to a loopback bridge joined with `conn`. The name checked is the
 * settings' (which the bridge listens on), or none (the chain only).
 */
async function startBridgedTls(
  conn: Deno.Conn,
  fd: number | undefined,
  settings: ClientTlsSettings,
  server: string,
  timeoutMs: number,
): Promise<ByteStream> {
  const raw = fromDenoConn(conn, fd);
  const name = settings.hostname?.toLowerCase();
  let bridge: LoopbackBridge;
  try {
    bridge = openLoopbackBridge(raw, { hostname: name === "::1" ? "::1" : name ?? "127.0.0.1" });
  } catch (error) {
    raw.close();
    throw new NbdConnectionError(
      `Cannot start TLS with ${server}: no loopback port for it: ${oneLine(error)}`,
      { cause: error },
    );
  }
  let secure: Deno.TlsConn;
  try {
    secure = await Deno.connectTls({
      // "localhost" resolves the way the listener's did: the first address only.
      hostname: name ?? bridge.hostname,
      port: bridge.port,
      autoSelectFamily: false,
      caCerts: settings.ca === undefined ? undefined : [settings.ca],
      unsafelyDisableHostnameVerification: name === undefined,
      ...(settings.cert !== undefined ? { cert: settings.cert, key: settings.key! } : {}),
    });
  } catch (error) {
    bridge.close();
    throw new NbdConnectionError(
      `TLS handshake with ${server} failed: ${oneLine(error)}`,
      { cause: error },
    );
  }
  await finishHandshake(secure, server, timeoutMs, () => bridge.close());
  const stream = fromDenoConn(secure);
  return {
    ...stream,
    close() {
      // The bridge closes the socket once it has passed on the TLS closure; a
      // stuck one after a second, without holding the process up for it.
      stream.close();
      const timer = setTimeout(() => bridge.close(), 1000);
      Deno.unrefTimer(timer);
      bridge.finished.then(() => clearTimeout(timer));
    },
    closed: () => bridge.finished,
  };
}

/**
 * Upgrades a plaintext stream to TLS after the server ACKed
 * NBD_OPT_STARTTLS: a plain connection opened for it with the runtime's
 * own TLS, directly or through a loopback bridge (see `clientTlsPath`), a
 * node:net socket with node:tls. The handshake may take `timeoutMs`. Rejects with a one-line reason if the handshake or the
 * certificate check fails.
 */
export async function startClientTls(
  stream: ByteStream,
  settings: ClientTlsSettings,
  server: string,
  timeoutMs = HANDSHAKE_TIMEOUT_MS,
): Promise<ByteStream> {
  if (stream.takeConn) {
    const { conn, fd } = stream.takeConn();
    const viaBridge = conn.remoteAddr.transport !== "tcp" || settings.cert !== undefined ||
      settings.hostname === undefined;
    return viaBridge
      ? await startBridgedTls(conn, fd, settings, server, timeoutMs)
      : await startNativeTls(conn as Deno.TcpConn, settings, server, timeoutMs);
  }
  if (!stream.detach) {
    throw new NbdConnectionError("Cannot start TLS: this connection does not support it");
  }
  // Loaded on first use: the Node compatibility layer costs every copy start-up time and memory.
  const tls = await import("node:tls");
  const { socket, unread } = stream.detach();
  if (unread.length > 0) {
    socket.destroy();
    throw new NbdConnectionError(
      "the server sent data after its STARTTLS reply before the TLS handshake",
    );
  }
  return await new Promise((resolve, reject) => {
    const secure = tls.connect({
      socket,
      ca: settings.ca,
      cert: settings.cert,
      key: settings.key,
      servername: settings.hostname && !/^[\d.]+$|:/.test(settings.hostname)
        ? settings.hostname
        : undefined,
      rejectUnauthorized: settings.verify,
      minVersion: "TLSv1.2",
      checkServerIdentity: (_name, cert) =>
        settings.verify && settings.hostname !== undefined
          ? tls.checkServerIdentity(settings.hostname, cert)
          : undefined,
    });
    const timer = setTimeout(() => {
      secure.destroy();
      reject(new NbdConnectionError(`TLS handshake with ${server} timed out`));
    }, timeoutMs);
    secure.once("secureConnect", () => {
      clearTimeout(timer);
      resolve(fromNodeSocket(secure));
    });
    secure.once("error", (error) => {
      clearTimeout(timer);
      secure.destroy();
      reject(
        new NbdConnectionError(`TLS handshake with ${server} failed: ${error.message}`, {
          cause: error,
        }),
      );
    });
  });
}
