/**
 * The server side of NBD's STARTTLS: X.509 credentials from a directory in
 * nbdkit's layout, and the upgrade of a plaintext node:net socket to TLS
 * once the STARTTLS ACK has been sent.
 *
 * @module
 */

import * as tls from "node:tls";
import { type ByteStream, fromNodeSocket } from "../io/byte_stream.ts";
import type { TlsUpgrader } from "./server.ts";

/** Options for server TLS. */
export interface ServerTlsOptions {
  /** Directory with ca-cert.pem, server-cert.pem, server-key.pem (and optionally ca-crl.pem). */
  certificates: string;
  /** Require a client certificate signed by the CA. */
  verifyPeer?: boolean;
  /** Seconds allowed for the TLS handshake (default 30). */
  handshakeTimeout?: number;
}

function readPem(dir: string, name: string, required: boolean): string | undefined {
  try {
    return Deno.readTextFileSync(`${dir}/${name}`);
  } catch (error) {
    if (!required && error instanceof Deno.errors.NotFound) return undefined;
    throw new Error(`Cannot load TLS credentials: ${dir}/${name}: ${(error as Error).message}`);
  }
}

/** Loads the credentials and returns an upgrader for the server. */
export function serverTls(options: ServerTlsOptions): TlsUpgrader {
  const dir = options.certificates;
  const cert = readPem(dir, "server-cert.pem", true)!;
  const key = readPem(dir, "server-key.pem", true)!;
  const ca = readPem(dir, "ca-cert.pem", options.verifyPeer === true);
  const crl = readPem(dir, "ca-crl.pem", false);
  let secureContext: tls.SecureContext;
  try {
    secureContext = tls.createSecureContext({ cert, key, ca, crl, minVersion: "TLSv1.2" });
  } catch (error) {
    throw new Error(`Cannot load TLS credentials from ${dir}: ${(error as Error).message}`);
  }
  const verifyPeer = options.verifyPeer ?? false;
  const timeoutMs = (options.handshakeTimeout ?? 30) * 1000;
  return {
    canUpgrade: (stream) => stream.detach !== undefined,
    async upgrade(stream: ByteStream, ack: Uint8Array): Promise<ByteStream> {
      // Stop reading before the ACK goes out: the client's first TLS bytes
      // must stay in the socket for the TLS layer, not reach our reader.
      const { socket, unread } = stream.detach!();
      if (unread.length > 0) {
        socket.destroy();
        throw new Error("the client sent data before the STARTTLS reply");
      }
      await new Promise<void>((resolve, reject) =>
        socket.write(ack, (error?: Error | null) => error ? reject(error) : resolve())
      );
      const secure = new tls.TLSSocket(socket, {
        isServer: true,
        secureContext,
        requestCert: verifyPeer,
        rejectUnauthorized: verifyPeer,
      });
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          secure.destroy();
          reject(new Error("TLS handshake timed out"));
        }, timeoutMs);
        secure.once("secure", () => {
          clearTimeout(timer);
          resolve(fromNodeSocket(secure));
        });
        secure.once("error", (error) => {
          clearTimeout(timer);
          secure.destroy();
          reject(new Error(`TLS handshake failed: ${error.message}`));
        });
      });
    },
  };
}
