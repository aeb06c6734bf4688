/**
 * Errors raised by the NBD client: a failed request (with the errno the
 * server sent and the request it answered), an option the server refused
 * during the handshake, and a connection that could not be made or was lost.
 *
 * @module
 */

import { commandName, errnoName, optionName, replyTypeName } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";

/** What a request asked for, kept on the error so callers can report it. */
export interface RequestDescription {
  /** Command name, e.g. "READ". */
  command: string;
  /** Offset of the request. */
  offset: number;
  /** Length of the request. */
  length: number;
}

/**
 * A request failed: the server answered it with an error, or the client
 * refused to send it (then `local` is true). `errno` is the protocol error
 * name, e.g. "EIO"; `serverMessage` is the text of a structured error
 * chunk, when the server sent one.
 *
 * @example
 * ```ts
 * try {
 *   await client.pread(buf, 0);
 * } catch (error) {
 *   if (error instanceof NbdRequestError) console.error(error.errno, error.offset);
 * }
 * ```
 */
export class NbdRequestError extends NbdError implements RequestDescription {
  /** Command name, e.g. "READ". */
  readonly command: string;
  /** Offset of the request. */
  readonly offset: number;
  /** Length of the request. */
  readonly length: number;
  /** Message the server sent with the error, if any. */
  readonly serverMessage: string | undefined;
  /** True when the client refused the request before sending it. */
  readonly local: boolean;

  /** Creates the error for request `request` failing with `errno`. */
  constructor(
    errno: number,
    request: RequestDescription,
    serverMessage?: string,
    local = false,
  ) {
    super(errno, undefined);
    const what = `${request.command} of ${request.length} bytes at offset ${request.offset}`;
    const detail = serverMessage ? `: ${serverMessage}` : "";
    this.message = local
      ? `${what} not sent: ${errnoName(errno)}${detail}`
      : `${what} failed: ${errnoName(errno)}${detail}`;
    this.name = "NbdRequestError";
    this.command = request.command;
    this.offset = request.offset;
    this.length = request.length;
    this.serverMessage = serverMessage;
    this.local = local;
  }
}

/** Describes a request by its command number. */
export function describeRequest(
  command: number,
  offset: number,
  length: number,
): RequestDescription {
  return { command: commandName(command), offset, length };
}

/**
 * The server refused an option during the handshake (an NBD_REP_ERR_*
 * reply), e.g. GO for an export that does not exist.
 */
export class NbdOptionError extends Error {
  /** The option, e.g. "GO". */
  readonly option: string;
  /** The reply type, e.g. "ERR_UNKNOWN". */
  readonly reply: string;
  /** Wire value of the reply type. */
  readonly replyType: number;
  /** Message the server sent with the error, if any. */
  readonly serverMessage: string | undefined;

  /** Creates the error; `message` replaces the default description when given. */
  constructor(option: number, replyType: number, serverMessage?: string, message?: string) {
    const reply = replyTypeName(replyType);
    const detail = serverMessage ? ` (${serverMessage})` : "";
    super(message ?? `server refused option ${optionName(option)}: ${reply}${detail}`);
    this.name = "NbdOptionError";
    this.option = optionName(option);
    this.reply = reply;
    this.replyType = replyType;
    this.serverMessage = serverMessage;
  }
}

/** The connection could not be opened, or it ended while requests were in flight. */
export class NbdConnectionError extends Error {
  /** Creates the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "NbdConnectionError";
  }
}
