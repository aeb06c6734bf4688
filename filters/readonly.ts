/**
 * The `readonly` filter: serves the layer below read-only, whatever it
 * supports. Writes, trims and zeroes fail with EPERM (clients are told the
 * export is read-only, so they should not send any).
 *
 * ```
 * nbd serve --filter=readonly memory 1G
 * ```
 *
 * Parameters: none.
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import {
  type Capabilities,
  type Filter,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";

const READ_ONLY = "the export is read-only";

/** A backend that refuses every change. */
export class ReadonlyBackend extends PassthroughBackend {
  /** Capabilities with every write-like command removed. */
  override capabilities(): Capabilities {
    return {
      ...this.next.capabilities(),
      writable: false,
      trim: false,
      zero: false,
      fastZero: false,
      fua: "none",
    };
  }
  /** Always EPERM. */
  override pwrite(_buf: Uint8Array, _offset: number, _flags: WriteFlags): Promise<void> {
    return Promise.reject(new NbdError("EPERM", READ_ONLY));
  }
  /** Always EPERM. */
  override trim(_offset: number, _length: number, _flags: WriteFlags): Promise<void> {
    return Promise.reject(new NbdError("EPERM", READ_ONLY));
  }
  /** Always EPERM. */
  override zero(_offset: number, _length: number, _flags: ZeroFlags): Promise<void> {
    return Promise.reject(new NbdError("EPERM", READ_ONLY));
  }
}

/** The readonly filter. */
export const readonlyFilter: Filter = {
  name: "readonly",
  summary: "serve the layer below read-only",
  description: "Example:\n  nbd serve --filter=readonly memory 1G",
  params: [],
  create() {
    return Promise.resolve({
      wrap: (next) => Promise.resolve(new ReadonlyBackend(next)),
    });
  },
};
