/**
 * The copy engine as a library: open endpoints from the same arguments
 * `nbd copy` takes, and copy between them with `copyImage`.
 *
 * @example Copy an export to a sparse file
 * ```ts
 * import { copyImage, openDestination, openSource, parseEndpoint } from "./mod.ts";
 *
 * const source = await openSource(parseEndpoint("nbd://server/disk"), {});
 * const destination = await openDestination(parseEndpoint("disk.img"), source, {});
 * try {
 *   await copyImage(source, destination, {
 *     requests: 64,
 *     requestSize: 256 * 1024,
 *     sparseSize: 4096,
 *     allocated: false,
 *     destinationIsZero: false,
 *     extents: true,
 *   });
 *   await destination.close(true);
 * } catch (error) {
 *   await destination.close(false);
 *   throw error;
 * } finally {
 *   await source.close(true);
 * }
 * ```
 *
 * @module
 */

export {
  BaseEndpoint,
  type CopyExtent,
  describeSpec,
  type Endpoint,
  type EndpointSpec,
  parseEndpoint,
  type Role,
} from "./endpoint.ts";
export { openDestination, type OpenOptions, openSource } from "./open.ts";
export {
  CopyError,
  copyImage,
  CopyInterrupted,
  type CopyOptions,
  type CopyStats,
  describeCause,
  planSizes,
} from "./scheduler.ts";
export { fdOutput, Progress, type ProgressOptions, type ProgressOutput } from "./progress.ts";
export { defaultConnections, NbdEndpoint } from "./nbd.ts";
