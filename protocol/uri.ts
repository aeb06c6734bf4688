/**
 * NBD URIs (`nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`, and the
 * vsock forms), parsed and formatted after the NBD URI specification.
 *
 * @module
 */

import { NBD_DEFAULT_PORT } from "./constants.ts";

/** A parsed NBD URI. */
export interface NbdUri {
  /** True for the `nbds*` schemes: TLS is required. */
  tls: boolean;
  /** How to reach the server. */
  transport: "tcp" | "unix" | "vsock";
  /** Host name or IP address (TCP); IPv6 without brackets. */
  host?: string;
  /** TCP or vsock port. */
  port?: number;
  /** Unix socket path (`socket=` query parameter). */
  socket?: string;
  /** vsock context id. */
  cid?: number;
  /** Export name, percent-decoded ("" = default export). */
  exportName: string;
  /** User name (the TLS PSK identity). */
  user?: string;
  /** `tls-certificates=DIR`. */
  tlsCertificates?: string;
  /** `tls-verify-peer=false` turns verification off; undefined means default (verify). */
  tlsVerifyPeer?: boolean;
  /** `tls-hostname=NAME`: name to check the server certificate against. */
  tlsHostname?: string;
  /** `tls-psk-file=FILE`. */
  tlsPskFile?: string;
  /** `tls-type=anon|x509|psk`. */
  tlsType?: string;
}

const SCHEMES: Record<string, { tls: boolean; transport: NbdUri["transport"] }> = {
  "nbd": { tls: false, transport: "tcp" },
  "nbds": { tls: true, transport: "tcp" },
  "nbd+unix": { tls: false, transport: "unix" },
  "nbds+unix": { tls: true, transport: "unix" },
  "nbd+vsock": { tls: false, transport: "vsock" },
  "nbds+vsock": { tls: true, transport: "vsock" },
};

const QUERY_KEYS = new Set([
  "socket",
  "tls-certificates",
  "tls-verify-peer",
  "tls-hostname",
  "tls-psk-file",
  "tls-type",
  "tls-username",
]);

/** Whether `text` looks like an NBD URI (by its scheme). */
export function isNbdUri(text: string): boolean {
  const match = /^([a-zA-Z][a-zA-Z0-9+.-]*):\/\//.exec(text);
  return match !== null && match[1]!.toLowerCase() in SCHEMES;
}

function decode(part: string, what: string, uri: string): string {
  try {
    return decodeURIComponent(part);
  } catch {
    throw new SyntaxError(`Cannot parse NBD URI "${uri}": bad percent-encoding in the ${what}`);
  }
}

function parseBoolean(value: string, key: string, uri: string): boolean {
  const v = value.toLowerCase();
  if (["1", "true", "yes", "on"].includes(v)) return true;
  if (["0", "false", "no", "off"].includes(v)) return false;
  throw new SyntaxError(
    `Cannot parse NBD URI "${uri}": ${key} must be true or false, got "${value}"`,
  );
}

/**
 * Parses an NBD URI. Throws `SyntaxError` naming the part that is wrong.
 *
 * @example
 * ```ts
 * const uri = parseNbdUri("nbd+unix:///disk?socket=/tmp/s.sock");
 * // uri.transport === "unix", uri.exportName === "disk", uri.socket === "/tmp/s.sock"
 * ```
 */
export function parseNbdUri(text: string): NbdUri {
  const match = /^([a-zA-Z][a-zA-Z0-9+.-]*):\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?$/.exec(
    text,
  );
  if (!match) {
    throw new SyntaxError(
      `Cannot parse NBD URI "${text}": expected scheme://[host[:port]]/[export][?query]`,
    );
  }
  const scheme = match[1]!.toLowerCase();
  const kind = SCHEMES[scheme];
  if (!kind) {
    throw new SyntaxError(
      `Cannot parse NBD URI "${text}": unknown scheme "${scheme}" (expected nbd, nbds, nbd+unix or nbds+unix)`,
    );
  }
  const uri: NbdUri = { tls: kind.tls, transport: kind.transport, exportName: "" };
  let authority = match[2]!;
  const path = match[3]!;
  const query = match[4];

  const at = authority.lastIndexOf("@");
  if (at >= 0) {
    uri.user = decode(authority.slice(0, at), "user name", text);
    authority = authority.slice(at + 1);
  }
  let host = authority;
  let portText: string | undefined;
  if (authority.startsWith("[")) {
    const close = authority.indexOf("]");
    if (close < 0) {
      throw new SyntaxError(
        `Cannot parse NBD URI "${text}": unterminated IPv6 address in the host`,
      );
    }
    host = authority.slice(1, close);
    const rest = authority.slice(close + 1);
    if (rest) {
      if (!rest.startsWith(":")) {
        throw new SyntaxError(`Cannot parse NBD URI "${text}": junk after the IPv6 address`);
      }
      portText = rest.slice(1);
    }
  } else {
    const colon = authority.lastIndexOf(":");
    if (colon >= 0) {
      host = authority.slice(0, colon);
      portText = authority.slice(colon + 1);
    }
  }
  if (portText !== undefined && portText !== "") {
    if (!/^\d+$/.test(portText) || Number(portText) > 65535) {
      throw new SyntaxError(`Cannot parse NBD URI "${text}": bad port "${portText}"`);
    }
    uri.port = Number(portText);
  }
  host = decode(host, "host", text);

  if (path !== "" && !path.startsWith("/")) {
    throw new SyntaxError(`Cannot parse NBD URI "${text}": the export name must follow a "/"`);
  }
  uri.exportName = decode(path.slice(1), "export name", text);

  if (query) {
    for (const pair of query.split("&")) {
      if (pair === "") continue;
      const eq = pair.indexOf("=");
      const key = decode(eq < 0 ? pair : pair.slice(0, eq), "query", text);
      const value = decode(eq < 0 ? "" : pair.slice(eq + 1), "query", text);
      if (!QUERY_KEYS.has(key) && !key.startsWith("x-")) {
        throw new SyntaxError(`Cannot parse NBD URI "${text}": unknown query parameter "${key}"`);
      }
      switch (key) {
        case "socket":
          uri.socket = value;
          break;
        case "tls-certificates":
          uri.tlsCertificates = value;
          break;
        case "tls-verify-peer":
          uri.tlsVerifyPeer = parseBoolean(value, key, text);
          break;
        case "tls-hostname":
          uri.tlsHostname = value;
          break;
        case "tls-psk-file":
          uri.tlsPskFile = value;
          break;
        case "tls-type":
          if (!["anon", "x509", "psk"].includes(value)) {
            throw new SyntaxError(
              `Cannot parse NBD URI "${text}": tls-type must be anon, x509 or psk`,
            );
          }
          uri.tlsType = value;
          break;
        case "tls-username":
          uri.user = value;
          break;
      }
    }
  }

  switch (uri.transport) {
    case "tcp":
      if (uri.socket !== undefined) {
        throw new SyntaxError(`Cannot parse NBD URI "${text}": socket= needs the nbd+unix scheme`);
      }
      uri.host = host || "localhost";
      uri.port ??= NBD_DEFAULT_PORT;
      break;
    case "unix":
      if (uri.socket === undefined || uri.socket === "") {
        throw new SyntaxError(
          `Cannot parse NBD URI "${text}": ${scheme} needs a socket=PATH query parameter`,
        );
      }
      if (host) {
        throw new SyntaxError(`Cannot parse NBD URI "${text}": a Unix socket URI takes no host`);
      }
      break;
    case "vsock":
      if (!/^\d+$/.test(host)) {
        throw new SyntaxError(
          `Cannot parse NBD URI "${text}": the vsock host must be a numeric CID`,
        );
      }
      uri.cid = Number(host);
      uri.port ??= NBD_DEFAULT_PORT;
      break;
  }
  return uri;
}

function encodeExportName(name: string): string {
  return encodeURIComponent(name).replace(/%2F/g, "/");
}

/** Formats an NBD URI; the inverse of `parseNbdUri`. */
export function formatNbdUri(uri: NbdUri): string {
  const s = uri.tls ? "s" : "";
  const query: string[] = [];
  const user = uri.user ? `${encodeURIComponent(uri.user)}@` : "";
  let base: string;
  switch (uri.transport) {
    case "tcp": {
      const host = uri.host ?? "localhost";
      const hostPart = host.includes(":") ? `[${host}]` : host;
      const port = uri.port !== undefined && uri.port !== NBD_DEFAULT_PORT ? `:${uri.port}` : "";
      base = `nbd${s}://${user}${hostPart}${port}/${encodeExportName(uri.exportName)}`;
      break;
    }
    case "unix":
      base = `nbd${s}+unix://${user}/${encodeExportName(uri.exportName)}`;
      query.push(`socket=${encodeURIComponent(uri.socket ?? "").replace(/%2F/g, "/")}`);
      break;
    case "vsock": {
      const port = uri.port !== undefined && uri.port !== NBD_DEFAULT_PORT ? `:${uri.port}` : "";
      base = `nbd${s}+vsock://${user}${uri.cid ?? 0}${port}/${encodeExportName(uri.exportName)}`;
      break;
    }
  }
  if (uri.tlsCertificates !== undefined) {
    query.push(`tls-certificates=${encodeURIComponent(uri.tlsCertificates).replace(/%2F/g, "/")}`);
  }
  if (uri.tlsVerifyPeer === false) query.push("tls-verify-peer=false");
  if (uri.tlsHostname !== undefined) {
    query.push(`tls-hostname=${encodeURIComponent(uri.tlsHostname)}`);
  }
  if (uri.tlsPskFile !== undefined) {
    query.push(`tls-psk-file=${encodeURIComponent(uri.tlsPskFile).replace(/%2F/g, "/")}`);
  }
  if (uri.tlsType !== undefined) query.push(`tls-type=${uri.tlsType}`);
  return query.length ? `${base}?${query.join("&")}` : base;
}
