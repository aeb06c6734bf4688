/**
 * Opening the endpoint a SOURCE or DESTINATION argument names.
 *
 * @module
 */

import { UsageError } from "../util/usage_error.ts";
import { describeSpec, type Endpoint, type EndpointSpec, type NbdTimeouts } from "./endpoint.ts";
import { NbdEndpoint, type RetryOptions } from "./nbd.ts";
import type { PartialFile } from "./file_destination.ts";
import { NullDestination } from "./null.ts";
import { stdinSource, stdoutDestination } from "./pipe.ts";
import { lazyImport } from "../util/lazy_import.ts";

// Endpoints most copies never use load on first use (util/lazy_import.ts).
const rbdModule = () => lazyImport<typeof import("./rbd.ts")>(new URL("./rbd.ts", import.meta.url));
const s3Module = () => lazyImport<typeof import("./s3.ts")>(new URL("./s3.ts", import.meta.url));
const httpModule = () =>
  lazyImport<typeof import("./http.ts")>(new URL("./http.ts", import.meta.url));
const subprocessModule = () =>
  lazyImport<typeof import("./subprocess.ts")>(new URL("./subprocess.ts", import.meta.url));

// File, http and subprocess endpoints are loaded only when used: their
// runtime modules (node:fs, node:child_process...) cost every start-up, and
// a quick NBD → null: copy should not pay for them.

/** Options of the openers. */
export interface OpenOptions {
  /**
   * Connections per NBD endpoint (when the server allows several) and http
   * requests in flight; undefined picks a default for each endpoint.
   */
  connections?: number;
  /** Stops connecting, and a server started for the copy while the copy is still connecting to it. */
  signal?: AbortSignal;
  /** Connect, handshake and request timeouts of NBD endpoints. */
  timeouts?: NbdTimeouts;
  /** A new destination file is kept after a failure, or resumed (`nbd copy --state`). */
  partial?: PartialFile;
  /** Reconnect NBD endpoints after a lost connection (`nbd copy --retry`). */
  retry?: RetryOptions;
}

/** Opens the source of a copy. */
export async function openSource(spec: EndpointSpec, options: OpenOptions): Promise<Endpoint> {
  switch (spec.kind) {
    case "path":
      return await (await import("./file_source.ts")).FileSource.open(spec.path);
    case "nbd":
      return await NbdEndpoint.open(spec.uri, spec.uri, "source", options);
    case "http":
      return await (await httpModule()).HttpSource.open(spec.url, options);
    case "stdio":
      return stdinSource();
    case "command":
      return await (await subprocessModule()).openCommandEndpoint(
        spec.argv,
        "source",
        options,
      );
    case "rbd":
      return await (await rbdModule()).RbdEndpoint.open(spec.image, "source");
    case "s3":
      return await (await s3Module()).S3Source.open(spec.url, options.connections);
    case "null":
      throw new UsageError('"null:" can only be the destination');
  }
}

/**
 * Opens the destination of a copy from `source`; a file destination is
 * created or truncated to the source's size.
 */
export async function openDestination(
  spec: EndpointSpec,
  source: Endpoint,
  options: OpenOptions,
): Promise<Endpoint> {
  switch (spec.kind) {
    case "path": {
      const { FileDestination } = await import("./file_destination.ts");
      const { FileSource } = await import("./file_source.ts");
      return await FileDestination.open(
        spec.path,
        source.size,
        source instanceof FileSource ? source.identity : undefined,
        options.partial,
      );
    }
    case "nbd":
      return await NbdEndpoint.open(spec.uri, spec.uri, "destination", options);
    case "stdio":
      return stdoutDestination();
    case "null":
      return new NullDestination();
    case "command":
      return await (await subprocessModule()).openCommandEndpoint(
        spec.argv,
        "destination",
        options,
      );
    case "rbd":
      return await (await rbdModule()).RbdEndpoint.open(
        spec.image,
        "destination",
        source.size,
      );
    case "s3": {
      if (source.size === undefined) {
        throw new UsageError(`${spec.url}: the source's size must be known to upload to S3`);
      }
      return await (await s3Module()).S3Destination.open(
        spec.url,
        source.size,
        options.connections,
      );
    }
    case "http":
      throw new UsageError(`${describeSpec(spec)}: an http(s) URL can only be the source`);
  }
}
