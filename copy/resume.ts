/**
 * Resumable copies: the state file of `nbd copy --state=FILE`. It names
 * both ends of the copy as they were (sizes, and for NBD exports what the
 * protocol shows of them: export name, size, flags, description), the
 * options that decide the result, and the ranges of the destination known
 * to be done. A range enters the file only after the destination has
 * flushed it, and the file is replaced atomically (written beside, synced,
 * renamed), so whatever stops the copy — a signal, a lost network, a
 * crash — the file never claims a range the destination may not hold.
 *
 * @module
 */

import type { Endpoint, EndpointSpec } from "./endpoint.ts";
import { describeSpec } from "./endpoint.ts";
import type { ImagePart } from "./scheduler.ts";

/** Version of the state file format. */
export const STATE_VERSION = 1;

/**
 * Most separate done ranges the state keeps. Completions arrive nearly in
 * offset order, so ranges merge into a few; past this bound the smallest
 * islands are forgotten (they are copied again), which keeps the file small.
 */
export const MAX_STATE_RANGES = 4096;

/** How often the progress is flushed and saved, in milliseconds. */
export const CHECKPOINT_INTERVAL_MS = 1000;

/** What the protocol shows of an NBD export. */
export interface ExportIdentity {
  /** The export name the server reports. */
  name: string;
  /** Transmission flags. */
  flags: number;
  /** Description, when the server sent one. */
  description?: string;
}

/** One end of the copy as the state file records it. */
export interface EndpointIdentity {
  /** The argument as given. */
  argument: string;
  /** Endpoint kind ("file", "nbd", ...). */
  kind: string;
  /** Size in bytes. */
  size: number;
  /** For NBD endpoints: the export as the protocol shows it. */
  export?: ExportIdentity;
  /** For a source file: its modification time in milliseconds. */
  mtime?: number;
  /** For a new destination file: the temporary file that holds the partial copy. */
  partial?: string;
}

/** The options that decide the bytes a copy writes. */
export interface ResultOptions {
  /** `--sparse` in bytes. */
  sparse: number;
  /** `--allocated`. */
  allocated: boolean;
  /** `--destination-is-zero`. */
  destinationIsZero: boolean;
  /** Extents were used (not `--no-extents`). */
  extents: boolean;
}

/** The content of a state file. */
export interface CopyState {
  /** Format version. */
  version: number;
  /** The source as it was. */
  source: EndpointIdentity;
  /** The destination as it was. */
  destination: EndpointIdentity;
  /** Options that decide the result. */
  options: ResultOptions;
  /** Done ranges, `[start, end)`, sorted and disjoint. */
  done: Array<[number, number]>;
  /**
   * Everything was copied and flushed; only renaming a new file into place
   * and removing this file were left.
   */
  complete?: boolean;
}

/** A set of disjoint byte ranges, merged as they are added. */
export class RangeSet {
  /** Sorted, disjoint, non-adjacent `[start, end)` pairs. */
  #ranges: Array<[number, number]>;

  /** A set holding `ranges` (any order; merged). */
  constructor(ranges: Array<[number, number]> = []) {
    this.#ranges = [];
    for (const [start, end] of ranges) this.add(start, end - start);
  }

  /** Adds `[offset, offset + length)`. */
  add(offset: number, length: number): void {
    if (length <= 0) return;
    let start = offset;
    let end = offset + length;
    const ranges = this.#ranges;
    // Most additions extend the last range (completions come nearly in order).
    const last = ranges[ranges.length - 1];
    if (last && start >= last[0]) {
      if (start <= last[1]) {
        last[1] = Math.max(last[1], end);
        return;
      }
      ranges.push([start, end]);
      return;
    }
    // First range ending at or after `start`.
    let lo = 0;
    let hi = ranges.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (ranges[mid]![1] < start) lo = mid + 1;
      else hi = mid;
    }
    const i = lo;
    let j = i;
    while (j < ranges.length && ranges[j]![0] <= end) {
      start = Math.min(start, ranges[j]![0]);
      end = Math.max(end, ranges[j]![1]);
      j++;
    }
    ranges.splice(i, j - i, [start, end]);
  }

  /** Bytes covered. */
  get bytes(): number {
    let total = 0;
    for (const [start, end] of this.#ranges) total += end - start;
    return total;
  }

  /** Number of separate ranges. */
  get count(): number {
    return this.#ranges.length;
  }

  /** Forgets every range. */
  clear(): void {
    this.#ranges = [];
  }

  /** Adds every range of `other`. */
  addAll(other: RangeSet): void {
    for (const [start, end] of other.#ranges) this.add(start, end - start);
  }

  /** The ranges of this set minus those of `other`. */
  without(other: RangeSet): RangeSet {
    const out = new RangeSet();
    const holes = other.#ranges;
    let h = 0;
    for (const [start, end] of this.#ranges) {
      let position = start;
      while (h < holes.length && holes[h]![1] <= position) h++;
      let k = h;
      while (position < end) {
        const hole = holes[k];
        if (!hole || hole[0] >= end) {
          out.add(position, end - position);
          break;
        }
        if (hole[0] > position) out.add(position, hole[0] - position);
        position = Math.max(position, hole[1]);
        k++;
      }
    }
    return out;
  }

  /** A copy of the ranges. */
  toArray(): Array<[number, number]> {
    return this.#ranges.map(([s, e]) => [s, e]);
  }

  /**
   * The ranges, at most `max` of them: beyond that the smallest are left out
   * (forgetting done work is safe; it is done again).
   */
  bounded(max: number): Array<[number, number]> {
    if (this.#ranges.length <= max) return this.toArray();
    const kept = [...this.#ranges]
      .sort((a, b) => (b[1] - b[0]) - (a[1] - a[0]))
      .slice(0, max)
      .sort((a, b) => a[0] - b[0]);
    return kept.map(([s, e]) => [s, e]);
  }

  /** The ranges as parts of the image, widened to `align` (and clipped to `size`). */
  aligned(size: number, align: number): ImagePart[] {
    const parts: ImagePart[] = [];
    for (const [start, end] of this.#ranges) {
      const s = Math.floor(start / align) * align;
      const e = Math.min(size, Math.ceil(end / align) * align);
      const previous = parts[parts.length - 1];
      if (previous && s <= previous.end) previous.end = Math.max(previous.end, e);
      else if (e > s) parts.push({ offset: s, end: e });
    }
    return parts;
  }

  /**
   * What is left of `[0, size)`: the gaps, widened to `align` so that every
   * request of the resumed copy is aligned (a little is then copied again).
   */
  gaps(size: number, align: number): ImagePart[] {
    const parts: ImagePart[] = [];
    let position = 0;
    const push = (start: number, end: number) => {
      const s = Math.floor(start / align) * align;
      const e = Math.min(size, Math.ceil(end / align) * align);
      const previous = parts[parts.length - 1];
      if (previous && s <= previous.end) previous.end = Math.max(previous.end, e);
      else if (e > s) parts.push({ offset: s, end: e });
    };
    for (const [start, end] of this.#ranges) {
      if (start >= size) break;
      if (start > position) push(position, start);
      position = Math.max(position, end);
    }
    if (position < size) push(position, size);
    return parts;
  }
}

/** A state file that cannot be used: the message is one line for the user. */
export class StateError extends Error {
  /** Creates the error. */
  constructor(message: string) {
    super(message);
    this.name = "StateError";
  }
}

/** The NBD export behind an endpoint, if it is one (a pool with a primary client). */
function exportOf(endpoint: Endpoint): ExportIdentity | undefined {
  const pool = (endpoint as { pool?: { primary?: unknown } }).pool;
  const client = pool?.primary as
    | { exportName: string; flags: number; description?: string }
    | undefined;
  if (!client || typeof client.flags !== "number") return undefined;
  const identity: ExportIdentity = { name: client.exportName, flags: client.flags };
  if (client.description) identity.description = client.description;
  return identity;
}

/** How `endpoint`, opened from `spec` as `role`, is recorded. */
export async function identify(
  spec: EndpointSpec,
  endpoint: Endpoint,
  role: "source" | "destination",
): Promise<EndpointIdentity> {
  if (endpoint.size === undefined || endpoint.sequential) {
    throw new StateError(
      `${endpoint.name} is a stream: only copies between files, block devices and NBD exports can be resumed`,
    );
  }
  const identity: EndpointIdentity = {
    argument: describeSpec(spec),
    kind: endpoint.kind,
    size: endpoint.size,
  };
  const nbd = exportOf(endpoint);
  if (nbd) identity.export = nbd;
  if (spec.kind === "path" && role === "source") {
    const info = await Deno.stat(spec.path);
    if (info.isFile && info.mtime) identity.mtime = info.mtime.getTime();
  }
  return identity;
}

function describeExport(e: ExportIdentity): string {
  const description = e.description === undefined ? "" : `, description "${e.description}"`;
  return `export "${e.name}", flags 0x${e.flags.toString(16)}${description}`;
}

/**
 * Why `saved` cannot continue as `current`, or undefined when it can.
 * `mtime` of the source is compared; a destination's is not (the copy wrote it).
 */
export function refusal(
  saved: CopyState,
  current: { source: EndpointIdentity; destination: EndpointIdentity; options: ResultOptions },
): string | undefined {
  for (const role of ["source", "destination"] as const) {
    const was = saved[role];
    const now = current[role];
    if (was.argument !== now.argument) {
      return `the ${role} was ${was.argument}, not ${now.argument}`;
    }
    if (was.size !== now.size) {
      return `the ${role} ${now.argument} changed size (${was.size} → ${now.size} bytes)`;
    }
    if ((was.export === undefined) !== (now.export === undefined)) {
      return `the ${role} ${now.argument} is no longer the same kind of endpoint`;
    }
    if (was.export && now.export) {
      const a = describeExport(was.export);
      const b = describeExport(now.export);
      if (a !== b) return `the ${role} ${now.argument} changed (${a} → ${b})`;
    }
    if (role === "source" && was.mtime !== undefined && was.mtime !== now.mtime) {
      return `the source ${now.argument} was modified since the copy stopped`;
    }
  }
  const keys = Object.keys(saved.options).sort() as Array<keyof ResultOptions>;
  for (const key of keys) {
    if (saved.options[key] !== current.options[key]) {
      return `it was made with other options (${key} was ${saved.options[key]}, now ${
        current.options[key]
      })`;
    }
  }
  return undefined;
}

function isRange(value: unknown): value is [number, number] {
  return Array.isArray(value) && value.length === 2 &&
    value.every((n) => Number.isSafeInteger(n) && n >= 0) && value[0] < value[1];
}

/**
 * Whether `state` describes a copy that finished: complete, its new file
 * renamed into place (the temporary file gone, the destination there).
 */
export async function finishedCopy(state: CopyState): Promise<boolean> {
  const partial = state.destination.partial;
  if (!state.complete || partial === undefined) return false;
  const exists = (path: string) => Deno.lstat(path).then(() => true, () => false);
  return !(await exists(partial)) && await exists(state.destination.argument);
}

/** Reads and checks a state file; `StateError` with one line when it cannot be used. */
export async function readState(path: string): Promise<CopyState> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new StateError(`${path}: no such state file (start the copy without --resume)`);
    }
    throw new StateError(`${path}: ${(error as Error).message}`);
  }
  let state: CopyState;
  try {
    state = JSON.parse(text);
  } catch {
    throw new StateError(`${path} is not a copy state file`);
  }
  const ok = typeof state === "object" && state !== null &&
    state.version === STATE_VERSION &&
    typeof state.source?.size === "number" && typeof state.destination?.size === "number" &&
    typeof state.options === "object" && Array.isArray(state.done) && state.done.every(isRange);
  if (!ok) throw new StateError(`${path} is not a copy state file of version ${STATE_VERSION}`);
  return state;
}

/** Writes `state` to `path` atomically: to a file beside it, synced, then renamed over it. */
export async function writeState(path: string, state: CopyState): Promise<void> {
  const temporary = `${path}.tmp`;
  const file = await Deno.open(temporary, { write: true, create: true, truncate: true });
  try {
    const bytes = new TextEncoder().encode(JSON.stringify(state) + "\n");
    let written = 0;
    while (written < bytes.length) written += await file.write(bytes.subarray(written));
    await file.sync();
  } finally {
    file.close();
  }
  await Deno.rename(temporary, path);
}

/**
 * Records the ranges a copy finishes and saves them every `intervalMs`:
 * first the destination is flushed, then the ranges finished before the
 * flush started are written to the state file. `save()` does one more
 * round (at the end of a stopped copy).
 */
export class Checkpointer {
  readonly #path: string;
  readonly #base: Omit<CopyState, "done">;
  readonly #done: RangeSet;
  readonly #flush: () => Promise<void>;
  readonly #intervalMs: number;
  readonly #lost: (() => RangeSet) | undefined;
  #running = false;
  #loop: Promise<void> | undefined;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #wake: (() => void) | undefined;
  #saving: Promise<void> = Promise.resolve();
  /** Saves that failed: the copy goes on; the last good file stays. */
  failures = 0;
  /** Checkpoints written. */
  saved = 0;

  /** A checkpointer for the state `base`, continuing from `done`. */
  constructor(
    path: string,
    base: Omit<CopyState, "done">,
    done: RangeSet,
    flush: () => Promise<void>,
    intervalMs = CHECKPOINT_INTERVAL_MS,
    lost?: () => RangeSet,
  ) {
    this.#lost = lost;
    this.#path = path;
    this.#base = base;
    this.#done = done;
    this.#flush = flush;
    this.#intervalMs = intervalMs;
  }

  /** The ranges done so far (live). */
  get done(): RangeSet {
    return this.#done;
  }

  /** Notes that `[offset, offset + length)` was written (not yet flushed). */
  record(offset: number, length: number): void {
    this.#done.add(offset, length);
  }

  /** The ranges to save: done, less any the destination may have lost (to be copied again). */
  #saveable(): Array<[number, number]> {
    const lost = this.#lost?.();
    const done = lost && lost.count > 0 ? this.#done.without(lost) : this.#done;
    return done.bounded(MAX_STATE_RANGES);
  }

  /** Saves the state as it is now, without flushing (the copy has not written yet). */
  async saveNow(): Promise<void> {
    await writeState(this.#path, { ...this.#base, done: this.#saveable() });
    this.saved++;
  }

  /** Starts the periodic checkpoints. */
  start(): void {
    this.#running = true;
    this.#loop = (async () => {
      while (this.#running) {
        await new Promise<void>((resolve) => {
          this.#wake = resolve;
          this.#timer = setTimeout(resolve, this.#intervalMs);
        });
        if (!this.#running) break;
        await this.save().catch(() => this.failures++);
      }
    })();
  }

  /** Flushes the destination and saves what was done before the flush. */
  save(): Promise<void> {
    const next = this.#saving.then(async () => {
      const done = this.#done.toArray();
      await this.#flush();
      // Lost while flushing (a reconnection): not saved as done.
      const saved = new RangeSet(done);
      const lost = this.#lost?.();
      const kept = lost && lost.count > 0 ? saved.without(lost) : saved;
      await writeState(this.#path, { ...this.#base, done: kept.bounded(MAX_STATE_RANGES) });
      this.saved++;
    });
    this.#saving = next.catch(() => {});
    return next;
  }

  /** Stops the periodic checkpoints (waits for one in progress). */
  async stop(): Promise<void> {
    this.#running = false;
    clearTimeout(this.#timer);
    this.#wake?.();
    await this.#loop;
    await this.#saving;
  }

  /**
   * Records that the copy is complete and flushed, before a new file is
   * renamed into place: a crash between the rename and `remove()` then
   * leaves a state that says so.
   */
  async markComplete(size: number): Promise<void> {
    await this.stop();
    await writeState(this.#path, {
      ...this.#base,
      done: size > 0 ? [[0, size]] : [],
      complete: true,
    });
  }

  /** Removes the state file (the copy is complete). */
  async remove(): Promise<void> {
    await Deno.remove(this.#path).catch(() => {});
    await Deno.remove(`${this.#path}.tmp`).catch(() => {});
  }
}

/** Largest amount written between two flushes of a retrying destination before any loss. */
export const FLUSH_BYTES = 256 << 20;

/**
 * Paces the flushes of a destination that reconnects after lost
 * connections: what it acknowledged since its last flush is written again
 * after a loss, so it is flushed every second and after `FLUSH_BYTES`;
 * after each loss the byte interval drops to a quarter of what was lost
 * (not below `minBytes`), so that a connection cut again and again still
 * lets the copy advance.
 */
export class FlushPacer {
  readonly #flush: () => Promise<void>;
  readonly #lost: RangeSet;
  readonly #minBytes: number;
  readonly #intervalMs: number;
  #interval = FLUSH_BYTES;
  #since = 0;
  #lostSeen = 0;
  #running: Promise<void> | undefined;
  #timer: ReturnType<typeof setInterval> | undefined;
  /** Flushes started. */
  flushes = 0;

  /** Paces `flush`; `lost` is the destination's live set of lost ranges. */
  constructor(
    flush: () => Promise<void>,
    lost: RangeSet,
    minBytes: number,
    intervalMs = CHECKPOINT_INTERVAL_MS,
  ) {
    this.#flush = flush;
    this.#lost = lost;
    this.#minBytes = minBytes;
    this.#intervalMs = intervalMs;
  }

  /** Bytes written between flushes now. */
  get interval(): number {
    return this.#interval;
  }

  /** Starts the timer. */
  start(): void {
    this.#timer = setInterval(() => this.kick(), this.#intervalMs);
  }

  /** Notes `length` bytes done; flushes when enough went by or something was lost. */
  done(length: number): void {
    this.#since += length;
    const lost = this.#lost.bytes;
    if (lost > this.#lostSeen) {
      const shrunk = Math.floor((lost - this.#lostSeen) / 4);
      this.#interval = Math.max(this.#minBytes, Math.min(this.#interval, shrunk));
    }
    this.#lostSeen = lost;
    if (this.#since >= this.#interval) this.kick();
  }

  /** Starts a flush unless one is running. */
  kick(): void {
    if (this.#running) return;
    this.#since = 0;
    this.flushes++;
    this.#running = this.#flush().catch(() => {}).finally(() => this.#running = undefined);
  }

  /** Stops the timer and waits for a flush in progress. */
  async stop(): Promise<void> {
    clearInterval(this.#timer);
    await this.#running;
  }
}
