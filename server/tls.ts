/**
 * The server side of NBD's STARTTLS: X.509 credentials from a directory in
 * nbdkit's layout, and the upgrade of a plaintext node:net socket to TLS
 * once the STARTTLS ACK has been sent.
 *
 * @module
 */

import { X509Certificate } from "node:crypto";
import * as tls from "node:tls";
import { type ByteStream, fromNodeSocket } from "../io/byte_stream.ts";
import { isRevoked, loadRevocationLists, type RevocationList } from "./crl.ts";
import type { TlsUpgrader } from "./context.ts";

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
  const trusted = ca ? splitPem(ca).map((pem) => new X509Certificate(pem)) : [];
  // Client certificates are checked by checkClientCertificate, so the CRL is applied there too.
  let revocations: RevocationList[] = [];
  if (crl && verifyPeer) {
    try {
      revocations = loadRevocationLists(crl, trusted);
    } catch (error) {
      throw new Error(
        `Cannot load TLS credentials: ${dir}/ca-crl.pem: ${(error as Error).message}`,
      );
    }
  }
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
          if (verifyPeer) {
            const problem = checkClientCertificate(secure, trusted, revocations);
            if (problem) {
              secure.destroy();
              reject(new Error(`TLS client certificate rejected: ${problem}`));
              return;
            }
          }
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

function splitPem(text: string): string[] {
  return text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
}

/**
 * Checks the client's certificate chain against the trusted CAs: each link
 * signed by the next, none revoked by a CRL in ca-crl.pem, all within their
 * validity period, ending at a CA we trust. (The TLS layer of this runtime
 * requests client certificates but does not verify them itself.) Returns a
 * problem description, or undefined.
 */
function checkClientCertificate(
  socket: tls.TLSSocket,
  trusted: X509Certificate[],
  revocations: RevocationList[],
): string | undefined {
  const peer = socket.getPeerCertificate(true);
  if (!peer || !peer.raw) return "the client sent no certificate";
  const chain: X509Certificate[] = [];
  const seen = new Set<string>();
  for (
    let link: tls.DetailedPeerCertificate | undefined = peer;
    link?.raw;
    link = link.issuerCertificate
  ) {
    if (seen.has(link.fingerprint256)) break;
    seen.add(link.fingerprint256);
    chain.push(new X509Certificate(link.raw));
  }
  const now = Date.now();
  const inPeriod = (c: X509Certificate) =>
    Date.parse(c.validFrom) <= now && now <= Date.parse(c.validTo);
  const issuedBy = (c: X509Certificate, issuer: X509Certificate) =>
    c.checkIssued(issuer) && c.verify(issuer.publicKey);
  let current = chain[0]!;
  for (let depth = 0; depth < 8; depth++) {
    if (!inPeriod(current)) return `certificate "${current.subject}" is expired or not yet valid`;
    const anchor = trusted.find((ca) => issuedBy(current, ca));
    const issuer = anchor ?? chain.find((c) => c !== current && c.ca && issuedBy(current, c));
    if (!issuer) return `certificate "${current.subject}" is not signed by a trusted CA`;
    if (isRevoked(current, issuer, revocations)) {
      return `certificate "${current.subject}" has been revoked`;
    }
    if (anchor) return inPeriod(anchor) ? undefined : "the CA certificate is expired";
    current = issuer;
  }
  return "certificate chain is too long";
}
