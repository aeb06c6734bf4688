/**
 * `nbd`: a Network Block Device toolkit. This module is the library entry:
 * the NBD client (`NbdClient`, option-mode `NbdHandshake`, the multi-conn
 * `NbdClientPool`, `inspectServer`), NBD URI parsing, and the error types.
 *
 * @example
 * ```ts
 * import { NbdClient } from "./mod.ts";
 *
 * await using client = await NbdClient.connect("nbd+unix:///disk?socket=/tmp/nbd.sock");
 * const sector = new Uint8Array(512);
 * await client.pread(sector, 0);
 * for await (const extent of client.iterateExtents(0, client.size())) {
 *   console.log(extent.offset, extent.length, extent.flags);
 * }
 * ```
 *
 * @module
 */

export * from "./client/client.ts";
export * from "./client/errors.ts";
export * from "./client/handshake.ts";
export * from "./client/inspect.ts";
export * from "./client/pool.ts";
export { describeServer, openStream, toNbdUri } from "./client/connect.ts";
export { formatNbdUri, isNbdUri, type NbdUri, parseNbdUri } from "./protocol/uri.ts";
export { NbdError, ProtocolError } from "./protocol/errors.ts";
export type { BlockSize } from "./protocol/handshake.ts";
export type { ErrnoName } from "./protocol/constants.ts";
export type {
  Backend,
  Capabilities,
  ExtentsFlags,
  ReadSegment,
  Support,
  WriteFlags,
  ZeroFlags,
} from "./server/backend.ts";
export type { ByteStream } from "./io/byte_stream.ts";
export type { BufferedReader } from "./io/buffered_reader.ts";
export type { CorkedWriter } from "./io/corked_writer.ts";
