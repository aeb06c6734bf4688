/**
 * Certificate revocation lists for `--tls-verify-peer`: the runtime's TLS
 * layer does not verify client certificates, so it does not consult
 * ca-crl.pem either. This module reads the CRLs (PEM, X.509 v2), checks
 * that each is signed by a trusted CA, and answers whether a certificate
 * that CA issued has been revoked.
 *
 * @module
 */

import { verify, type X509Certificate } from "node:crypto";

/** A verified revocation list of one CA. */
export interface RevocationList {
  /** The trusted CA that signed the list. */
  issuer: X509Certificate;
  /** Revoked serial numbers, as normalised hex (see `normaliseSerial`). */
  revoked: Set<string>;
}

/** The parts of a DER CertificateList the server needs. */
export interface ParsedCrl {
  /** The signed bytes (TBSCertList, with its header). */
  tbs: Uint8Array;
  /** Signature algorithm OID, dotted. */
  algorithm: string;
  /** Signature bytes. */
  signature: Uint8Array;
  /** Revoked serial numbers, normalised. */
  revoked: string[];
}

interface Tlv {
  tag: number;
  start: number;
  body: number;
  end: number;
}

function tlv(der: Uint8Array, pos: number, limit: number): Tlv {
  if (pos + 2 > limit) throw new SyntaxError("Cannot parse CRL: truncated DER");
  const tag = der[pos]!;
  let length = der[pos + 1]!;
  let body = pos + 2;
  if (length & 0x80) {
    const n = length & 0x7f;
    if (n === 0 || n > 4 || body + n > limit) throw new SyntaxError("Cannot parse CRL: bad length");
    length = 0;
    for (let i = 0; i < n; i++) length = length * 256 + der[body++]!;
  }
  if (body + length > limit) {
    throw new SyntaxError("Cannot parse CRL: value runs past its container");
  }
  return { tag, start: pos, body, end: body + length };
}

function children(der: Uint8Array, parent: Tlv): Tlv[] {
  const out: Tlv[] = [];
  for (let pos = parent.body; pos < parent.end;) {
    const child = tlv(der, pos, parent.end);
    out.push(child);
    pos = child.end;
  }
  return out;
}

function oid(der: Uint8Array, t: Tlv): string {
  if (t.tag !== 0x06 || t.end === t.body) {
    throw new SyntaxError("Cannot parse CRL: expected an OID");
  }
  const parts: number[] = [];
  let value = 0;
  for (let i = t.body; i < t.end; i++) {
    value = value * 128 + (der[i]! & 0x7f);
    if (!(der[i]! & 0x80)) {
      if (parts.length === 0) {
        parts.push(value < 80 ? Math.floor(value / 40) : 2, value < 80 ? value % 40 : value - 80);
      } else parts.push(value);
      value = 0;
    }
  }
  return parts.join(".");
}

/** Serial numbers as uppercase hex without leading zeroes (the form X509Certificate uses, normalised). */
export function normaliseSerial(hex: string): string {
  return hex.toUpperCase().replace(/[^0-9A-F]/g, "").replace(/^0+(?=.)/, "");
}

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Parses one DER-encoded CertificateList (RFC 5280 §5.1); throws SyntaxError if malformed. */
export function parseCrl(der: Uint8Array): ParsedCrl {
  const list = tlv(der, 0, der.length);
  if (list.tag !== 0x30 || list.end !== der.length) {
    throw new SyntaxError("Cannot parse CRL: not a DER sequence");
  }
  const [tbs, sigAlg, sigValue] = children(der, list);
  if (
    !tbs || !sigAlg || !sigValue || tbs.tag !== 0x30 || sigAlg.tag !== 0x30 || sigValue.tag !== 0x03
  ) {
    throw new SyntaxError("Cannot parse CRL: expected tbsCertList, algorithm and signature");
  }
  const algorithm = oid(der, children(der, sigAlg)[0]!);
  if (der[sigValue.body] !== 0) {
    throw new SyntaxError("Cannot parse CRL: signature has unused bits");
  }
  const fields = children(der, tbs);
  let i = 0;
  if (fields[i]?.tag === 0x02) i++; // version
  i += 2; // signature algorithm, issuer
  const isTime = (t: Tlv | undefined) => t !== undefined && (t.tag === 0x17 || t.tag === 0x18);
  if (!isTime(fields[i])) throw new SyntaxError("Cannot parse CRL: expected thisUpdate");
  i++;
  if (isTime(fields[i])) i++; // nextUpdate
  const revoked: string[] = [];
  if (fields[i]?.tag === 0x30) {
    for (const entry of children(der, fields[i]!)) {
      const serial = children(der, entry)[0];
      if (!serial || serial.tag !== 0x02) {
        throw new SyntaxError("Cannot parse CRL: bad revoked entry");
      }
      revoked.push(normaliseSerial(hex(der.subarray(serial.body, serial.end))));
    }
  }
  return {
    tbs: der.subarray(tbs.start, tbs.end),
    algorithm,
    signature: der.subarray(sigValue.body + 1, sigValue.end),
    revoked,
  };
}

// Signature algorithms a CA signs CRLs with, and the digest each uses.
const DIGESTS: Record<string, string | null> = {
  "1.2.840.113549.1.1.5": "sha1",
  "1.2.840.113549.1.1.11": "sha256",
  "1.2.840.113549.1.1.12": "sha384",
  "1.2.840.113549.1.1.13": "sha512",
  "1.2.840.10045.4.3.2": "sha256",
  "1.2.840.10045.4.3.3": "sha384",
  "1.2.840.10045.4.3.4": "sha512",
  "1.3.101.112": null, // Ed25519
};

/**
 * Reads every CRL in a PEM file and keeps each with the trusted CA that
 * signed it. Throws if a CRL is malformed, uses an unsupported signature
 * algorithm, or is signed by none of the trusted CAs: a revocation list that
 * cannot be applied must stop the server, not be ignored.
 */
export function loadRevocationLists(pem: string, trusted: X509Certificate[]): RevocationList[] {
  const blocks = pem.match(/-----BEGIN X509 CRL-----[\s\S]+?-----END X509 CRL-----/g) ?? [];
  if (blocks.length === 0) throw new SyntaxError("Cannot parse CRL: no X509 CRL block in the file");
  return blocks.map((block) => {
    const base64 = block.replace(/-----[A-Z0-9 ]+-----/g, "").replace(/\s+/g, "");
    const der = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const crl = parseCrl(der);
    if (!(crl.algorithm in DIGESTS)) {
      throw new Error(`Cannot use CRL: unsupported signature algorithm ${crl.algorithm}`);
    }
    const digest = DIGESTS[crl.algorithm]!;
    const issuer = trusted.find((ca) => {
      try {
        return verify(digest, crl.tbs, ca.publicKey, crl.signature);
      } catch {
        return false;
      }
    });
    if (!issuer) throw new Error("Cannot use CRL: it is not signed by a CA in ca-cert.pem");
    return { issuer, revoked: new Set(crl.revoked) };
  });
}

/** Whether `cert`, issued by `issuer`, is on one of that issuer's revocation lists. */
export function isRevoked(
  cert: X509Certificate,
  issuer: X509Certificate,
  lists: RevocationList[],
): boolean {
  const serial = normaliseSerial(cert.serialNumber);
  return lists.some((l) =>
    l.issuer.fingerprint256 === issuer.fingerprint256 && l.revoked.has(serial)
  );
}
