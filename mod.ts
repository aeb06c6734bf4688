/**
 * `nbd` as a library: the NBD wire format, the server with its plugin and
 * filter interface, and the built-in plugins.
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
export * from "./server/backend.ts";
export * from "./server/params.ts";
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
