/**
 * `nbd` as a library: the NBD wire format, the client (`NbdClient`,
 * option-mode `NbdHandshake`, the multi-conn `NbdClientPool`,
 * `inspectServer`), the server with its plugin and filter interface, the
 * built-in plugins, the copy engine behind `nbd copy`, and an export as a
 * FUSE file (`ExportFile` served by `FuseFileServer`; Linux, root).
 *
 * @example Read from an export and walk its allocation map
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
 * @example Serve a RAM disk from your own program
 * ```ts
 * import { Exports, listenUnix, memoryPlugin, NbdServer, Params } from "./mod.ts";
 * const plugin = await memoryPlugin.create(Params.parse(["64M"], "size"));
 * const server = new NbdServer({ exports: new Exports({ plugin }) });
 * await listenUnix(server, "/tmp/disk.sock");
 * ```
 *
 * @module
 */

export * from "./protocol/constants.ts";
export * from "./protocol/errors.ts";
export * from "./protocol/uri.ts";
export type { BlockSize } from "./protocol/handshake.ts";
export type { Extent } from "./protocol/transmission.ts";
export * from "./client/client.ts";
export * from "./client/errors.ts";
export * from "./client/handshake.ts";
export * from "./client/inspect.ts";
export * from "./client/pool.ts";
export { describeServer, openStream, toNbdUri } from "./client/connect.ts";
export * from "./core/backend.ts";
export * from "./core/params.ts";
export * from "./core/authoring.ts";
export { THREAD_MODELS } from "./core/thread_model.ts";
export * from "./util/usage_error.ts";
export * from "./util/parse.ts";
export { ZERO_BUFFER } from "./util/zero_buffer.ts";
export { VERSION } from "./util/version.ts";
export { Exports, type ExportsOptions } from "./server/exports.ts";
export {
  NbdServer,
  type NbdServerOptions,
  type TlsMode,
  type TlsUpgrader,
} from "./server/server.ts";
export { type Listener, listenTcp, listenUnix } from "./server/listener.ts";
export { PLUGINS } from "./plugins/mod.ts";
export { FILTERS } from "./filters/mod.ts";
export { memoryPlugin } from "./plugins/memory.ts";
export { filePlugin } from "./plugins/file.ts";
export type { ByteStream } from "./io/byte_stream.ts";
export type { BufferedReader } from "./io/buffered_reader.ts";
export type { CorkedWriter } from "./io/corked_writer.ts";
export * from "./copy/mod.ts";
export { ExportFile, type ExportFileOptions } from "./mount/export_file.ts";
export {
  type FileContents,
  FuseFileServer,
  type FuseFileServerOptions,
} from "./mount/fuse_file_server.ts";
export type { IoStats } from "./mount/io_counters.ts";
