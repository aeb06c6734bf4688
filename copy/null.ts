/**
 * The `null:` destination: accepts everything and keeps nothing. Useful to
 * check that a source can be read end to end, and for benchmarks.
 *
 * @module
 */

import type { BlockSize } from "../protocol/handshake.ts";
import { BaseEndpoint, COPY_BLOCK_SIZE, type ShareSpec } from "./endpoint.ts";

/** Discards writes; reads as zero everywhere, so zero runs are skipped. */
export class NullDestination extends BaseEndpoint {
  readonly name = "null:";
  readonly kind = "null";
  readonly size: number | undefined = undefined;
  readonly blockSize: BlockSize = COPY_BLOCK_SIZE;
  override readonly isZero = true;
  override readonly discards = true;
  override readonly synchronous = true;

  /** Discards `buf`. */
  override write(): Promise<void> {
    return Promise.resolve();
  }

  /** Nothing to do. */
  override zero(): Promise<void> {
    return Promise.resolve();
  }

  /** Another null. */
  override shareSpec(): ShareSpec {
    return { kind: "null" };
  }

  /** Nothing was kept, so nothing can be incomplete. */
  override incompleteNote(): string {
    return "nothing was written";
  }
}
