/**
 * Timeout flags shared by every command that connects to an NBD server
 * (info, list, map, dump, copy, checksum, mount, attach, proxy's upstream):
 * how long connecting and the handshake may take, and how long the server
 * may leave requests unanswered.
 *
 * @module
 */

import { DEFAULT_CONNECT_TIMEOUT } from "../client/handshake.ts";
import { parseDuration } from "../util/parse.ts";
import { formatOptions } from "./command.ts";

/** The timeout flags of the client commands. */
export const CLIENT_OPTIONS = {
  timeout: {
    type: "string",
    value: "SECONDS",
    help:
      `give up when connecting, or any step of the NBD handshake, takes longer (default ${DEFAULT_CONNECT_TIMEOUT}; 0 = wait forever)`,
  },
  "request-timeout": {
    type: "string",
    value: "SECONDS",
    help:
      "fail the requests (EIO) of a connection whose server answers nothing for SECONDS (default: wait forever)",
  },
} as const;

/** Help lines for the timeout flags. */
export const CLIENT_USAGE = `Timeouts:
${formatOptions(CLIENT_OPTIONS)}`;

/** The parsed timeout flags, in seconds, as `ConnectOptions` takes them. */
export interface ClientTimeouts {
  /** Connect and handshake timeout (0 = none). */
  timeout: number;
  /** Request timeout (0 = none). */
  requestTimeout: number;
}

/** Reads the timeout flags; `requestTimeout` is the default request timeout in seconds. */
export function clientTimeouts(
  values: { timeout?: string; "request-timeout"?: string },
  requestTimeout = 0,
): ClientTimeouts {
  return {
    timeout: values.timeout === undefined
      ? DEFAULT_CONNECT_TIMEOUT
      : parseDuration(values.timeout, "--timeout") / 1000,
    requestTimeout: values["request-timeout"] === undefined
      ? requestTimeout
      : parseDuration(values["request-timeout"], "--request-timeout") / 1000,
  };
}
