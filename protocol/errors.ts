/**
 * Error types shared by the server, the client and the backends.
 *
 * @module
 */

import { ERRNO_NAMES, ERRNO_VALUES, type ErrnoName } from "./constants.ts";

/**
 * An error with an NBD error number. Backends throw it to make the server
 * send that error to the client; the client throws it when the server
 * answers a request with an error.
 *
 * @example
 * ```ts
 * throw new NbdError("ENOSPC", "write beyond the end of the export");
 * ```
 */
export class NbdError extends Error {
  /** Name of the protocol error, e.g. "EIO". */
  readonly errno: ErrnoName | string;
  /** Wire value of the error. */
  readonly code: number;
  /** The message without the error name in front (what a server sends to its client). */
  readonly detail: string;

  /** Creates an error from an errno name ("EIO") or a wire value (5). */
  constructor(errno: ErrnoName | number, message?: string, options?: ErrorOptions) {
    const code = typeof errno === "number" ? errno : ERRNO_VALUES[errno];
    const name = typeof errno === "number" ? (ERRNO_NAMES[errno] ?? `errno ${errno}`) : errno;
    super(message ? `${name}: ${message}` : name, options);
    this.name = "NbdError";
    this.errno = name;
    this.code = code;
    this.detail = message ?? name;
  }
}

/** The peer broke the protocol; the connection cannot be trusted any more. */
export class ProtocolError extends Error {
  /** Creates a protocol error with a description of what was wrong. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ProtocolError";
  }
}

/** Maps the error numbers of the operating system to the protocol's errors. */
const OS_ERRNO: Record<string, ErrnoName> = {
  EPERM: "EPERM",
  EACCES: "EPERM",
  EROFS: "EPERM",
  EIO: "EIO",
  ENOMEM: "ENOMEM",
  EINVAL: "EINVAL",
  ENOSPC: "ENOSPC",
  EDQUOT: "ENOSPC",
  EFBIG: "ENOSPC",
  EOVERFLOW: "EOVERFLOW",
  ENOTSUP: "ENOTSUP",
  EOPNOTSUPP: "ENOTSUP",
  ESHUTDOWN: "ESHUTDOWN",
};

/**
 * Converts anything thrown by a backend to the protocol error to send:
 * `NbdError` keeps its number, operating-system errors are mapped by their
 * code, and everything else becomes EIO.
 */
export function toWireErrno(error: unknown): number {
  if (error instanceof NbdError) return error.code;
  const code = (error as { code?: unknown })?.code;
  if (typeof code === "string" && code in OS_ERRNO) return ERRNO_VALUES[OS_ERRNO[code]!];
  if (error instanceof Deno.errors.PermissionDenied) return ERRNO_VALUES.EPERM;
  return ERRNO_VALUES.EIO;
}
