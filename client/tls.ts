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
 * Whether the runtime's own TLS can make this connection: over TCP, with
 * the server's certificate and name verified, and no client certificate
 * (which it cannot send). It moves data at about twice the speed of
 * node:tls for less processor time (docs/performance.md); everything else
 * goes through node:tls.
 */
export function nativeTlsPossible(uri: NbdUri, settings: ClientTlsSettings): boolean {
  return uri.transport === "tcp" && settings.verify && settings.cert === undefined &&
    settings.hostname !== undefined;
}

const HANDSHAKE_TIMEOUT_MS = 30_000;

/** TLS on a plain TCP connection with the runtime's own TLS. */
async function startNativeTls(
  conn: Deno.TcpConn,
  settings: ClientTlsSettings,
  server: string,
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
      `TLS handshake with ${server} failed: ${(error as Error).message}`,
      { cause: error },
    );
  }
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await Promise.race([
      secure.handshake(),
      new Promise((_, reject) => {
        timer = setTimeout(
          () => reject(new NbdConnectionError(`TLS handshake with ${server} timed out`)),
          HANDSHAKE_TIMEOUT_MS,
        );
      }),
    ]);
  } catch (error) {
    try {
      secure.close();
    } catch { /* already closed */ }
    if (error instanceof NbdConnectionError) throw error;
    throw new NbdConnectionError(
      `TLS handshake with ${server} failed: ${(error as Error).message}`,
      { cause: error },
    );
  } finally {
    clearTimeout(timer);
  }
  return fromDenoConn(secure);
}

/**
 * Upgrades a plaintext stream to TLS after the server ACKed
 * NBD_OPT_STARTTLS: a plain TCP connection opened for it with the
 * runtime's own TLS (see `nativeTlsPossible`), a node:net socket with
 * node:tls. Rejects with a one-line reason if the handshake or the
 * certificate check fails.
 */
export async function startClientTls(
  stream: ByteStream,
  settings: ClientTlsSettings,
  server: string,
): Promise<ByteStream> {
  if (stream.takeConn) return await startNativeTls(stream.takeConn(), settings, server);
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
    }, 30_000);
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
