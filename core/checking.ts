/**
 * The checking layer: with `--debug-layers` (or NBD_DEBUG_LAYERS=1) one
 * sits between every two layers of an export (client → filter → ... →
 * plugin) and asserts what each side promises the other. Calls from
 * above must stay within the size of the layer below, use only flags it
 * advertised and come in states it can take (no write to a read-only
 * layer, no block status without `extents`, nothing after close); answers
 * from below must be well-formed (reads fill the buffer, zero-copy
 * segments cover the request, extents are a non-empty run of positive
 * lengths that stays inside the export). A broken promise fails the
 * request with EIO and is reported naming the layer that broke it.
 *
 * Off by default, and then it costs nothing: the wrapper is not inserted.
 *
 * @module
 */

import type {
  Backend,
  Capabilities,
  Extent,
  ExtentsFlags,
  FileRange,
  ReadSegment,
  WriteFlags,
  ZeroFlags,
} from "./backend.ts";
import {
  checkCapabilities,
  checkExtents,
  checkSegments,
  checkWriteViews,
  ContractError,
} from "./guard.ts";

/** The pattern written over a read buffer before the layer below fills it. */
const POISON = crypto.getRandomValues(new Uint8Array(8));

function poisonAll(buf: Uint8Array): void {
  for (let i = 0; i + 8 <= buf.length; i += 8) buf.set(POISON, i);
}

/** Offset of the first 8-byte word still holding the poison, or -1. */
function firstPoisoned(buf: Uint8Array): number {
  outer: for (let i = 0; i + 8 <= buf.length; i += 8) {
    for (let j = 0; j < 8; j++) if (buf[i + j] !== POISON[j]) continue outer;
    return i;
  }
  return -1;
}

/** Whether layer checking is asked for by the environment (NBD_DEBUG_LAYERS=1). */
export function debugLayersFromEnv(): boolean {
  try {
    // Never prompt for the permission: without it the answer is no.
    const state = Deno.permissions.querySync({ name: "env", variable: "NBD_DEBUG_LAYERS" }).state;
    if (state !== "granted") return false;
    const value = Deno.env.get("NBD_DEBUG_LAYERS");
    return value !== undefined && value !== "" && value !== "0";
  } catch {
    return false;
  }
}

/** How a broken promise is reported besides failing the request (stderr by default). */
export type LayerReport = (message: string) => void;

const defaultReport: LayerReport = (message) => console.error(`nbd: ${message}`);

/** The checking wrapper between `above` (the caller) and `below` (the layer it calls). */
export class CheckingBackend implements Backend {
  readonly #below: Backend;
  readonly #above: string;
  readonly #belowName: string;
  readonly #size: number;
  readonly #caps: Capabilities;
  readonly #report: LayerReport;
  #closed = false;
  /** How far writes have extended an extendable layer's store. */
  #grown = 0;
  /** Zero-copy read, checked; present only when the layer below has one. */
  readView?: (offset: number, length: number) => ReadSegment[] | undefined;
  /** The range in an open file; present only when the layer below has it. */
  fileRange?: (offset: number, length: number) => FileRange | undefined;
  /** In-place write, checked; present only when the layer below has one. */
  writeView?: (offset: number, length: number) => Uint8Array[] | undefined;
  /** Where a write may go into an open file; present only when the layer below has it. */
  writeTarget?: (offset: number, length: number) => FileRange | undefined;
  /** Whether the layer below fills every read buffer. */
  readonly preadFills: boolean;
  /** Other metadata contexts of the layer below; present only when it has some. */
  extraContexts?: () => string[];
  /** Block status in another metadata context, checked like `extents`. */
  contextExtents?: (
    name: string,
    offset: number,
    length: number,
    flags: ExtentsFlags,
  ) => Promise<Extent[]>;

  /** Wraps `below`; `above` and `belowName` name the two layers in reports. */
  constructor(below: Backend, above: string, belowName: string, report = defaultReport) {
    this.#below = below;
    this.#above = above;
    this.#belowName = belowName;
    this.#report = report;
    this.#size = below.size();
    this.preadFills = below.preadFills === true;
    if (!Number.isSafeInteger(this.#size) || this.#size < 0) {
      throw this.#fault("below", `size() returned ${this.#size}`);
    }
    try {
      this.#caps = checkCapabilities(below.capabilities(), belowName);
    } catch (error) {
      throw this.#fault("below", (error as Error).message);
    }
    if (below.readView) {
      this.readView = (offset, length) => {
        this.#range("readView", offset, length);
        const segments = below.readView!(offset, length);
        if (segments !== undefined) this.#answer(() => checkSegments(segments, length, "readView"));
        return segments;
      };
    }
    if (below.fileRange) {
      this.fileRange = (offset, length) => {
        this.#range("fileRange", offset, length);
        return below.fileRange!(offset, length);
      };
    }
    if (below.writeView) {
      this.writeView = (offset, length) => {
        this.#range("writeView", offset, length);
        if (!this.#caps.writable) throw this.#fault("above", "writeView on a read-only layer");
        const views = below.writeView!(offset, length);
        if (views !== undefined) this.#answer(() => checkWriteViews(views, length, "writeView"));
        return views;
      };
    }
    if (below.writeTarget) {
      this.writeTarget = (offset, length) => {
        this.#range("writeTarget", offset, length);
        if (!this.#caps.writable) throw this.#fault("above", "writeTarget on a read-only layer");
        return below.writeTarget!(offset, length);
      };
    }
    if (below.extraContexts && below.contextExtents) {
      this.extraContexts = () => below.extraContexts!();
      this.contextExtents = async (name, offset, length, flags) => {
        this.#range("contextExtents", offset, length);
        const extents = await below.contextExtents!(name, offset, length, flags);
        this.#answer(() => checkExtents(extents, `contextExtents(${name})`));
        return extents;
      };
    }
  }

  /** Reports a broken promise and returns the error that fails the request. */
  #fault(side: "above" | "below", what: string): ContractError {
    const culprit = side === "above" ? this.#above : this.#belowName;
    const message = side === "above"
      ? `layer check: ${culprit} broke the contract of ${this.#belowName}: ${what}`
      : `layer check: ${culprit} broke its contract (called by ${this.#above}): ${what}`;
    this.#report(message);
    return new ContractError(message);
  }

  #answer(check: () => void): void {
    try {
      check();
    } catch (error) {
      throw this.#fault("below", (error as Error).message);
    }
  }

  #state(call: string): void {
    if (this.#closed) throw this.#fault("above", `${call} after close`);
  }

  /** A write-like call: within the size, or (on an extendable layer) growing its store. */
  #writeRange(call: string, offset: number, length: number): void {
    if (this.#caps.extendable && Number.isSafeInteger(offset + length)) {
      this.#grown = Math.max(this.#grown, offset + length);
    }
    this.#range(call, offset, length);
  }

  /**
   * A read: within the size, or anywhere on an extendable layer, whose store
   * a layer above may have grown through another connection (a qcow2 image
   * shared by all of them), out of this connection's sight.
   */
  #readRange(call: string, offset: number, length: number): void {
    if (this.#caps.extendable && Number.isSafeInteger(offset + length)) {
      this.#grown = Math.max(this.#grown, offset + length);
    }
    this.#range(call, offset, length);
  }

  #range(call: string, offset: number, length: number): void {
    this.#state(call);
    if (!Number.isSafeInteger(offset) || offset < 0) {
      throw this.#fault("above", `${call} at offset ${offset}`);
    }
    if (!Number.isSafeInteger(length) || length <= 0) {
      throw this.#fault("above", `${call} of length ${length}`);
    }
    if (offset + length > Math.max(this.#size, this.#grown)) {
      throw this.#fault(
        "above",
        `${call}(offset=${offset}, length=${length}) beyond the size ${this.#size}`,
      );
    }
  }

  #writable(call: string): void {
    if (!this.#caps.writable) throw this.#fault("above", `${call} on a read-only layer`);
  }

  #fua(call: string, flags: WriteFlags): void {
    if (flags.fua && this.#caps.fua === "none") {
      throw this.#fault("above", `${call} with fua, which was not advertised (fua: none)`);
    }
  }

  /** Size of the layer below; it must not change while open. */
  size(): number {
    const size = this.#below.size();
    if (size !== this.#size) {
      throw this.#fault("below", `size() changed from ${this.#size} to ${size}`);
    }
    return size;
  }

  /** Capabilities of the layer below (as checked when opened). */
  capabilities(): Capabilities {
    return this.#caps;
  }

  /** Reads, checking that the whole buffer is filled. */
  async pread(buf: Uint8Array, offset: number): Promise<void> {
    this.#readRange("pread", offset, buf.length);
    poisonAll(buf);
    const result = await this.#below.pread(buf, offset);
    if (result !== undefined) {
      throw this.#fault(
        "below",
        `pread resolved to ${typeof result} instead of filling its buffer`,
      );
    }
    const at = firstPoisoned(buf);
    if (at >= 0) {
      throw this.#fault(
        "below",
        `pread(offset=${offset}, length=${buf.length}) left bytes from ${at} unfilled`,
      );
    }
  }

  /** Writes. */
  pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    this.#writeRange("pwrite", offset, buf.length);
    this.#writable("pwrite");
    this.#fua("pwrite", flags);
    return this.#below.pwrite(buf, offset, flags);
  }

  /** Flushes. */
  flush(): Promise<void> {
    this.#state("flush");
    if (!this.#caps.flush) throw this.#fault("above", "flush, which was not advertised");
    return this.#below.flush();
  }

  /** Trims. */
  trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    this.#writeRange("trim", offset, length);
    this.#writable("trim");
    if (!this.#caps.trim) throw this.#fault("above", "trim, which was not advertised");
    this.#fua("trim", flags);
    return this.#below.trim(offset, length, flags);
  }

  /** Zeroes. */
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    this.#writeRange("zero", offset, length);
    this.#writable("zero");
    if (!this.#caps.zero) throw this.#fault("above", "zero, which was not advertised");
    if (flags.fast && !this.#caps.fastZero) {
      throw this.#fault("above", "a fast zero, which was not advertised (fastZero: false)");
    }
    this.#fua("zero", flags);
    return this.#below.zero(offset, length, flags);
  }

  /** Block status, checking the answer. */
  async extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    this.#range("extents", offset, length);
    if (!this.#caps.extents) {
      throw this.#fault("above", "extents on a layer without extents");
    }
    const extents = await this.#below.extents(offset, length, flags);
    this.#answer(() => {
      checkExtents(extents, "extents");
      const covered = extents.reduce((sum, e) => sum + e.length, 0);
      if (offset + covered > Math.max(this.#size, this.#grown)) {
        throw new Error(
          `extents from ${offset} cover ${covered} bytes, past the end of the export (${this.#size})`,
        );
      }
    });
    return extents;
  }

  /** Prefetch. */
  cache(offset: number, length: number): Promise<void> {
    this.#range("cache", offset, length);
    if (this.#caps.cache === "none") {
      throw this.#fault("above", "cache, which was not advertised (cache: none)");
    }
    return this.#below.cache(offset, length);
  }

  /** Closes; nothing may be called afterwards. */
  close(): Promise<void> {
    this.#state("close");
    this.#closed = true;
    return this.#below.close();
  }
}
