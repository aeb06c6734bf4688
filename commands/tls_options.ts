/**
 * TLS flags shared by the client commands (info, list, map, dump, copy):
 * they adjust the NBD URI the same way its query parameters would.
 *
 * @module
 */

import { formatNbdUri, isNbdUri, parseNbdUri } from "../protocol/uri.ts";
import { formatOptions } from "./command.ts";

/** The TLS flags of the client commands. */
export const TLS_OPTIONS = {
  tls: { type: "boolean", help: "require TLS (as an nbds:// URI does)" },
  "tls-certificates": {
    type: "string",
    value: "DIR",
    path: true,
    help:
      "ca-cert.pem, and client-cert.pem/client-key.pem if the server wants a client certificate (implies --tls)",
  },
  "tls-hostname": {
    type: "string",
    value: "NAME",
    help: "name to check the server certificate against",
  },
  "no-tls-verify-peer": {
    type: "boolean",
    help: "do not verify the server certificate (insecure)",
  },
} as const;

/** Help lines for the TLS flags. */
export const TLS_USAGE = `TLS:
${formatOptions(TLS_OPTIONS)}`;

/** The parsed TLS flags. */
export interface TlsFlags {
  tls?: boolean;
  "tls-certificates"?: string;
  "tls-hostname"?: string;
  "no-tls-verify-peer"?: boolean;
}

/** Applies the TLS flags to an NBD URI; other arguments (files, "-", "null:") pass unchanged. */
export function withTlsFlags(uri: string, flags: TlsFlags): string {
  const given = flags.tls || flags["tls-certificates"] !== undefined ||
    flags["tls-hostname"] !== undefined ||
    flags["no-tls-verify-peer"];
  if (!given || !isNbdUri(uri)) return uri;
  const parsed = parseNbdUri(uri);
  parsed.tls = true;
  if (flags["tls-certificates"] !== undefined) parsed.tlsCertificates = flags["tls-certificates"];
  if (flags["tls-hostname"] !== undefined) parsed.tlsHostname = flags["tls-hostname"];
  if (flags["no-tls-verify-peer"]) parsed.tlsVerifyPeer = false;
  return formatNbdUri(parsed);
}
