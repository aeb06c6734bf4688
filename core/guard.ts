/**
 * The run-time guard around a plugin or filter loaded from a module: it
 * checks the types of what the module answers, cheaply, so that a wrong
 * answer (a pread that resolves without filling the buffer, extents that
 * are not an array, a size that is not an integer) fails that one request
 * with EIO instead of sending garbage or crashing the server.
 *
 * @module
 */

import { ERRNO_VALUES } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";
import type {
  Backend,
  Capabilities,
  Extent,
  ExtentsFlags,
  ReadSegment,
  WriteFlags,
  ZeroFlags,
} from "./backend.ts";

/**
 * Turns an error that looks like an `NbdError` from another copy of this
 * library (a module that imported its own) into ours, so its errno is
 * kept; anything else is returned as it is.
 */
export function toNbdError(error: unknown): unknown {
  if (error instanceof NbdError) return error;
  const e = error as { name?: unknown; errno?: unknown; detail?: unknown; message?: unknown };
  if (e?.name === "NbdError" && typeof e.errno === "string" && e.errno in ERRNO_VALUES) {
    const detail = typeof e.detail === "string" ? e.detail : String(e.message ?? "");
    return new NbdError(e.errno as keyof typeof ERRNO_VALUES, detail);
  }
  return error;
}

/**
 * A broken promise of the backend interface (not an I/O error): the
 * request fails with EIO and, not being an `NbdError`, the server logs it
 * with its stack, so the module's author sees where.
 */
export class ContractError extends Error {
  /** Creates the error; `message` names the layer at fault. */
  constructor(message: string) {
    super(message);
    this.name = "ContractError";
  }
}

/** A run of bytes no read fills by chance: random per process. */
const POISON = crypto.getRandomValues(new Uint8Array(8));
/** Below this a read is not poisoned: too few bytes to tell a fill from chance. */
const MIN_POISONED = 8;

function poisoned(buf: Uint8Array, at: number): boolean {
  for (let i = 0; i < 8; i++) if (buf[at + i] !== POISON[i]) return false;
  return true;
}

/** Writes the poison at both ends of `buf`. */
export function poison(buf: Uint8Array): void {
  if (buf.length < MIN_POISONED) return;
  buf.set(POISON, 0);
  buf.set(POISON, buf.length - 8);
}

/** Whether an end of `buf` still holds the poison (so the read did not fill it). */
export function stillPoisoned(buf: Uint8Array): boolean {
  if (buf.length < MIN_POISONED) return false;
  return poisoned(buf, 0) || poisoned(buf, buf.length - 8);
}

/** Checks a zero-copy answer: segments that cover exactly `length` bytes. */
export function checkSegments(segments: unknown, length: number, who: string): void {
  if (!Array.isArray(segments)) {
    throw new ContractError(`${who}: readView returned ${typeof segments}, not an array`);
  }
  let covered = 0;
  for (const seg of segments) {
    if (seg instanceof Uint8Array) covered += seg.length;
    else if (Number.isSafeInteger(seg) && seg >= 0) covered += seg;
    else {throw new ContractError(
        `${who}: readView returned a segment that is not bytes or a count`,
      );}
  }
  if (covered !== length) {
    throw new ContractError(`${who}: readView covered ${covered} bytes, ${length} were asked for`);
  }
}

/** Checks an in-place write answer: byte views that cover exactly `length` bytes. */
export function checkWriteViews(views: unknown, length: number, who = "writeView"): void {
  if (!Array.isArray(views)) throw new ContractError(`${who}: writeView returned ${typeof views}`);
  let covered = 0;
  for (const view of views) {
    if (!(view instanceof Uint8Array)) {
      throw new ContractError(`${who}: writeView returned a view that is not bytes`);
    }
    covered += view.length;
  }
  if (covered !== length) {
    throw new ContractError(`${who}: writeView covered ${covered} bytes, ${length} were asked for`);
  }
}

/** Checks a block-status answer: a non-empty array of extents with positive lengths. */
export function checkExtents(extents: unknown, who: string): Extent[] {
  if (!Array.isArray(extents)) {
    throw new ContractError(`${who}: extents returned ${typeof extents}, not an array`);
  }
  if (extents.length === 0) throw new ContractError(`${who}: extents returned no extent`);
  for (const e of extents) {
    if (
      typeof e !== "object" || e === null || !Number.isSafeInteger(e.length) || e.length <= 0 ||
      !Number.isInteger(e.flags) || e.flags < 0
    ) {
      throw new ContractError(
        `${who}: extents returned ${JSON.stringify(e)} (want { length > 0, flags })`,
      );
    }
  }
  return extents;
}

const SUPPORT = ["none", "emulate", "native"];

/** Checks a capabilities object once, when the backend is opened. */
export function checkCapabilities(caps: unknown, who: string): Capabilities {
  const c = caps as Capabilities;
  const bad = (what: string) => new ContractError(`${who}: capabilities(): ${what}`);
  if (typeof c !== "object" || c === null) throw bad("not an object");
  for (
    const key of [
      "writable",
      "flush",
      "trim",
      "zero",
      "fastZero",
      "extents",
      "multiConn",
    ] as const
  ) {
    if (typeof c[key] !== "boolean") throw bad(`${key} must be a boolean`);
  }
  if (!SUPPORT.includes(c.fua)) throw bad("fua must be none, emulate or native");
  if (!SUPPORT.includes(c.cache)) throw bad("cache must be none, emulate or native");
  const b = c.blockSize;
  if (
    typeof b !== "object" || b === null ||
    ![b.minimum, b.preferred, b.maximum].every((n) => Number.isSafeInteger(n) && n > 0)
  ) {
    throw bad("blockSize must have positive minimum, preferred and maximum");
  }
  return c;
}

async function settle<T>(run: () => Promise<T> | T): Promise<T> {
  try {
    return await run();
  } catch (error) {
    throw toNbdError(error);
  }
}

/** The guard: see the module comment. */
class GuardedBackend implements Backend {
  readonly #inner: Backend;
  readonly #who: string;
  readonly #caps: Capabilities;
  readView?: (offset: number, length: number) => ReadSegment[] | undefined;
  writeView?: (offset: number, length: number) => Uint8Array[] | undefined;
  readonly preadFills: boolean;

  constructor(inner: Backend, who: string) {
    this.#inner = inner;
    this.preadFills = inner.preadFills === true;
    this.#who = who;
    this.size();
    this.#caps = checkCapabilities(inner.capabilities(), who);
    if (inner.readView) {
      this.readView = (offset, length) => {
        const segments = inner.readView!(offset, length);
        if (segments !== undefined) checkSegments(segments, length, who);
        return segments;
      };
    }
    if (inner.writeView) {
      this.writeView = (offset, length) => {
        const views = inner.writeView!(offset, length);
        if (views !== undefined) checkWriteViews(views, length, who);
        return views;
      };
    }
  }

  size(): number {
    const size = this.#inner.size();
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new ContractError(`${this.#who}: size() returned ${size}, not a byte count`);
    }
    return size;
  }

  capabilities(): Capabilities {
    return this.#caps;
  }

  async pread(buf: Uint8Array, offset: number): Promise<void> {
    poison(buf);
    const result = await settle(() => this.#inner.pread(buf, offset));
    if (result !== undefined) {
      throw new ContractError(
        `${this.#who}: pread must fill its buffer and resolve to nothing, it returned ${typeof result}`,
      );
    }
    if (stillPoisoned(buf)) {
      throw new ContractError(`${this.#who}: pread resolved without filling its buffer`);
    }
  }

  pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return settle(() => this.#inner.pwrite(buf, offset, flags));
  }

  flush(): Promise<void> {
    return settle(() => this.#inner.flush());
  }

  trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return settle(() => this.#inner.trim(offset, length, flags));
  }

  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return settle(() => this.#inner.zero(offset, length, flags));
  }

  async extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    return checkExtents(await settle(() => this.#inner.extents(offset, length, flags)), this.#who);
  }

  cache(offset: number, length: number): Promise<void> {
    return settle(() => this.#inner.cache(offset, length));
  }

  close(): Promise<void> {
    return settle(() => this.#inner.close());
  }
}

/** Wraps a backend from a loaded module in the guard (checks its size and capabilities now). */
export function guardBackend(backend: Backend, who: string): Backend {
  return new GuardedBackend(backend, who);
}
