/**
 * The qcow2 fuzzer's mutations and its in-process oracle. A case is a seed
 * image (made by qemu-img or by our writer) with one or more targeted
 * mutations of its header, extensions, L1/L2 tables, refcount structures
 * or compressed data. Opening it must either succeed or fail with a
 * one-line format error; every read, block-status query and write after a
 * successful open must either succeed or fail with the per-request error
 * that the server turns into EIO. Any other exception is a crash.
 *
 * @module
 */

import { Qcow2FormatError } from "../formats/qcow2/header.ts";
import { type ImageStore, Qcow2Image, Qcow2IoError, readHeader } from "../formats/qcow2/image.ts";
import { Rng } from "./fuzz_cases.ts";

const MiB = 1024 * 1024;
/** Most bytes the oracle reads from one image (the front, then random ranges). */
const READ_BUDGET = MiB;

/** A growable in-memory image store. */
export class MemoryImage implements ImageStore {
  #bytes: Uint8Array;
  #length: number;

  /** Copies `initial` into a new store. */
  constructor(initial: Uint8Array) {
    this.#bytes = new Uint8Array(Math.max(initial.length, 4096));
    this.#bytes.set(initial);
    this.#length = initial.length;
  }

  /** Current length. */
  size(): number {
    return this.#length;
  }

  /** Reads; past the end reads zeroes, as a file does. A bad offset is a bug in the caller. */
  pread(buf: Uint8Array, offset: number): Promise<void> {
    if (!Number.isSafeInteger(offset) || offset < 0) {
      return Promise.reject(new RangeError(`pread at offset ${offset}`));
    }
    buf.fill(0);
    if (offset < this.#length) {
      buf.set(this.#bytes.subarray(offset, Math.min(this.#length, offset + buf.length)));
    }
    return Promise.resolve();
  }

  /** Writes, growing the store (bounded: a runaway writer fails like a full disk). */
  pwrite(buf: Uint8Array, offset: number): Promise<void> {
    if (!Number.isSafeInteger(offset) || offset < 0) {
      return Promise.reject(new RangeError(`pwrite at offset ${offset}`));
    }
    const end = offset + buf.length;
    if (end > 256 * MiB) return Promise.reject(new Qcow2IoError("fuzz store full (256 MiB)"));
    if (end > this.#bytes.length) {
      const grown = new Uint8Array(Math.max(end, this.#bytes.length * 2));
      grown.set(this.#bytes.subarray(0, this.#length));
      this.#bytes = grown;
    }
    this.#bytes.set(buf, offset);
    this.#length = Math.max(this.#length, end);
    return Promise.resolve();
  }

  /** Nothing to flush. */
  flush(): Promise<void> {
    return Promise.resolve();
  }
}

/** Where a seed image keeps its metadata, read from its header and L1 table. */
export interface SeedLayout {
  /** A short description of how the seed was made. */
  name: string;
  /** The image bytes. */
  bytes: Uint8Array;
  /** Header version. */
  version: number;
  /** Cluster size. */
  clusterSize: number;
  /** L1 table offset and entry count. */
  l1Offset: number;
  /** L1 entries. */
  l1Size: number;
  /** Refcount table offset. */
  refcountTableOffset: number;
  /** Offsets of the L2 tables in use. */
  l2Offsets: number[];
  /** Offsets (in the file) of L2 entries that describe compressed clusters. */
  compressedEntries: number[];
  /** Offsets (in the file) of L2 entries that describe normal data clusters. */
  dataEntries: number[];
  /** Offsets of the refcount blocks in use. */
  refcountBlocks: number[];
  /** Extended L2 entries (16 bytes). */
  extendedL2: boolean;
}

const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;

/** Reads a seed image's layout (the seed must be a valid image). */
export function layoutOf(name: string, bytes: Uint8Array): SeedLayout {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const version = v.getUint32(4);
  const clusterBits = v.getUint32(20);
  const clusterSize = 2 ** clusterBits;
  const l1Size = v.getUint32(36);
  const l1Offset = Number(v.getBigUint64(40));
  const refcountTableOffset = Number(v.getBigUint64(48));
  const refcountTableClusters = v.getUint32(56);
  const incompatible = version >= 3 ? Number(v.getBigUint64(72) & 0xffffn) : 0;
  const extendedL2 = (incompatible & 16) !== 0;
  const entryBytes = extendedL2 ? 16 : 8;
  const l2Offsets: number[] = [];
  const compressedEntries: number[] = [];
  const dataEntries: number[] = [];
  for (let i = 0; i < l1Size; i++) {
    const at = l1Offset + 8 * i;
    if (at + 8 > bytes.length) break;
    const l2 = Number(v.getBigUint64(at) & OFFSET_MASK);
    if (l2 === 0 || l2 + clusterSize > bytes.length) continue;
    l2Offsets.push(l2);
    for (let j = 0; j < clusterSize / entryBytes; j++) {
      const e = l2 + j * entryBytes;
      const entry = v.getBigUint64(e);
      if (entry & (1n << 62n)) compressedEntries.push(e);
      else if (entry & OFFSET_MASK) dataEntries.push(e);
    }
  }
  const refcountBlocks: number[] = [];
  for (let i = 0; i < (refcountTableClusters * clusterSize) / 8; i++) {
    const at = refcountTableOffset + 8 * i;
    if (at + 8 > bytes.length) break;
    const block = Number(v.getBigUint64(at) & OFFSET_MASK);
    if (block !== 0) refcountBlocks.push(block);
  }
  return {
    name,
    bytes,
    version,
    clusterSize,
    l1Offset,
    l1Size,
    refcountTableOffset,
    l2Offsets,
    compressedEntries,
    dataEntries,
    refcountBlocks,
    extendedL2,
  };
}

/** One mutated image. */
export interface Qcow2Case {
  /** The mutation classes applied (first is the main one). */
  classes: string[];
  /** The seed's name. */
  seed: string;
  /** The mutated image. */
  bytes: Uint8Array;
}

type Mutation = (s: SeedLayout, b: Uint8Array, v: DataView, rng: Rng) => string | undefined;

const ABSURD_U64 = [
  0n,
  1n,
  0x7fff_ffff_ffff_ffffn,
  0xffff_ffff_ffff_ffffn,
  1n << 53n,
  (1n << 53n) + 1n,
  1n << 62n,
  0x00ff_ffff_ffff_fe00n,
  0x8000_0000_0000_0000n,
];

function pickOffset(rng: Rng, s: SeedLayout, fileSize: number): { value: bigint; what: string } {
  const r = rng.int(7);
  if (r === 0) {
    return { value: BigInt(fileSize + s.clusterSize * rng.range(0, 1000)), what: "past EOF" };
  }
  if (r === 1) return { value: rng.pick(ABSURD_U64), what: "absurd" };
  if (r === 2) {
    return {
      value: BigInt(s.clusterSize * rng.range(0, 4) + rng.range(1, 511)),
      what: "unaligned",
    };
  }
  if (r === 3) return { value: 0n, what: "on the header" };
  if (r === 4) return { value: BigInt(s.l1Offset), what: "on the L1 table" };
  if (r === 5) return { value: BigInt(s.refcountTableOffset), what: "on the refcount table" };
  return {
    value: BigInt(s.l2Offsets.length > 0 ? rng.pick(s.l2Offsets) : s.l1Offset),
    what: "on an L2 table",
  };
}

/** The mutations, each returning its class name (undefined when it does not apply to the seed). */
const MUTATIONS: Mutation[] = [
  (_s, _b, v, rng) => {
    v.setUint32(4, rng.pick([0, 1, 4, 5, 0xffffffff, rng.next()]));
    return "header: version";
  },
  (_s, _b, v, rng) => {
    v.setUint32(20, rng.pick([0, 1, 8, 22, 30, 31, 32, 63, 64, rng.next()]));
    return "header: cluster bits";
  },
  (_s, _b, v, rng) => {
    v.setBigUint64(24, rng.pick(ABSURD_U64));
    return "header: absurd virtual size";
  },
  (_s, _b, v, rng) => {
    v.setBigUint64(24, BigInt(rng.range(1, 2 ** 31)) * 512n * BigInt(rng.range(1, 4096)));
    return "header: large virtual size";
  },
  (_s, _b, v, rng) => {
    v.setUint32(32, rng.pick([1, 2, 3, rng.next()]));
    return "header: encryption method";
  },
  (_s, _b, v, rng) => {
    v.setUint32(36, rng.pick([0, 1, 0xffffffff, 0x7fffffff, 4 * MiB + 1, rng.next()]));
    return "header: L1 size";
  },
  (s, b, v, rng) => {
    const o = pickOffset(rng, s, b.length);
    v.setBigUint64(40, o.value);
    return `header: L1 offset ${o.what}`;
  },
  (s, b, v, rng) => {
    const o = pickOffset(rng, s, b.length);
    v.setBigUint64(48, o.value);
    return `header: refcount table offset ${o.what}`;
  },
  (_s, _b, v, rng) => {
    v.setUint32(56, rng.pick([0, 0xffffffff, 1 << 20, rng.next()]));
    return "header: refcount table clusters";
  },
  (s, b, v, rng) => {
    v.setUint32(60, rng.pick([1, 0xffffffff, rng.next()]));
    v.setBigUint64(64, pickOffset(rng, s, b.length).value);
    return "header: snapshots";
  },
  (s, b, v, rng) => {
    const o = pickOffset(rng, s, b.length);
    v.setBigUint64(8, o.value);
    v.setUint32(16, rng.pick([1, 16, 1023, 1024, 4096, 0xffffffff, rng.next()]));
    return `header: backing name ${o.what}`;
  },
  (s, _b, v, rng) => {
    if (s.version < 3) return undefined;
    v.setBigUint64(72, BigInt(rng.next()) << BigInt(rng.pick([0, 0, 5, 32])));
    return "header: incompatible features";
  },
  (s, _b, v, rng) => {
    if (s.version < 3) return undefined;
    v.setUint32(96, rng.pick([0, 1, 3, 6, 7, 8, 31, 0xffffffff]));
    return "header: refcount order";
  },
  (s, _b, v, rng) => {
    if (s.version < 3) return undefined;
    v.setUint32(100, rng.pick([0, 71, 72, 103, 105, 111, 4096, 65536, 0xffffffff, rng.next()]));
    return "header: header length";
  },
  (s, b, v, rng) => {
    if (s.version < 3 || v.getUint32(100) < 105) return undefined;
    b[104] = rng.pick([1, 2, 3, 0xff]);
    v.setBigUint64(72, v.getBigUint64(72) | 8n);
    return "header: compression type";
  },
  (s, b, v, rng) => {
    // A header extension whose length runs past the first cluster.
    if (s.version < 3) return undefined;
    const at = v.getUint32(100);
    if (at + 8 > b.length) return undefined;
    v.setUint32(
      at,
      rng.pick([0xe2792aca, 0x6803f857, 0x23852875, 0x44415441, 0x0537be77, rng.next()]),
    );
    v.setUint32(at + 4, rng.pick([1, 7, 65536, 0x7fffffff, 0xffffffff, rng.next()]));
    return "header: extension length";
  },
  (s, b, _v, rng) => {
    // Bytes flipped in the header cluster.
    const n = rng.range(1, 8);
    for (let i = 0; i < n; i++) b[rng.int(Math.min(b.length, s.clusterSize))] ^= 1 << rng.int(8);
    return "header cluster: bit flips";
  },
  (s, b, v, rng) => {
    if (s.l1Size === 0) return undefined;
    const at = s.l1Offset + 8 * rng.int(s.l1Size);
    if (at + 8 > b.length) return undefined;
    const o = pickOffset(rng, s, b.length);
    v.setBigUint64(at, o.value | (rng.chance(0.5) ? 1n << 63n : 0n));
    return `L1 entry ${o.what}`;
  },
  (s, b, v, rng) => {
    if (s.l1Size === 0) return undefined;
    const at = s.l1Offset + 8 * rng.int(s.l1Size);
    if (at + 8 > b.length) return undefined;
    v.setBigUint64(at, v.getBigUint64(at) | (BigInt(rng.range(1, 511)) | (1n << 62n)));
    return "L1 entry reserved bits";
  },
  (s, b, v, rng) => {
    if (s.dataEntries.length === 0) return undefined;
    const at = rng.pick(s.dataEntries);
    const o = pickOffset(rng, s, b.length);
    v.setBigUint64(at, o.value | (1n << 63n));
    return `L2 data entry ${o.what}`;
  },
  (s, _b, v, rng) => {
    if (s.dataEntries.length === 0) return undefined;
    const at = rng.pick(s.dataEntries);
    v.setBigUint64(at, v.getBigUint64(at) | BigInt(rng.range(1, 511)));
    return "L2 entry reserved bits";
  },
  (s, _b, v, rng) => {
    if (s.dataEntries.length === 0 || !s.extendedL2) return undefined;
    const at = rng.pick(s.dataEntries);
    v.setUint32(at + 8, rng.next());
    v.setUint32(at + 12, rng.next());
    return "L2 subcluster bitmap garbage";
  },
  (s, b, v, rng) => {
    if (s.compressedEntries.length === 0) return undefined;
    const at = rng.pick(s.compressedEntries);
    const x = s.clusterSize === 0 ? 62 : 62 - (Math.log2(s.clusterSize) - 8);
    const o = pickOffset(rng, s, b.length);
    const sectors = BigInt(rng.pick([0, 1, 2, 255, (1 << (62 - x)) - 1]));
    v.setBigUint64(at, (1n << 62n) | (sectors << BigInt(x)) | (o.value & ((1n << BigInt(x)) - 1n)));
    return `compressed descriptor ${o.what}`;
  },
  (s, b, v, rng) => {
    // A compressed cluster whose data does not inflate.
    if (s.compressedEntries.length === 0) return undefined;
    const at = rng.pick(s.compressedEntries);
    const x = 62 - (Math.log2(s.clusterSize) - 8);
    const offset = Number(v.getBigUint64(at) & ((1n << BigInt(x)) - 1n));
    const n = Math.min(rng.range(1, 600), b.length - offset);
    if (n <= 0) return undefined;
    if (rng.chance(0.5)) b.set(new Uint8Array(n).map(() => rng.next()), offset);
    else b[offset + rng.int(n)] ^= 0xff;
    return "compressed data does not inflate";
  },
  (s, b, v, rng) => {
    if (s.refcountBlocks.length === 0) return undefined;
    const at = s.refcountTableOffset + 8 * rng.int(s.refcountBlocks.length + 2);
    if (at + 8 > b.length) return undefined;
    const o = pickOffset(rng, s, b.length);
    v.setBigUint64(at, o.value);
    return `refcount table entry ${o.what}`;
  },
  (s, b, _v, rng) => {
    if (s.refcountBlocks.length === 0) return undefined;
    const block = rng.pick(s.refcountBlocks);
    const n = Math.min(s.clusterSize, b.length - block);
    for (let i = 0; i < rng.range(1, 64); i++) b[block + rng.int(n)] = rng.next();
    return "refcount block garbage";
  },
  (s, b, _v, rng) => {
    // Flips anywhere in the metadata clusters (header, L1, refcounts, L2).
    const spots = [0, s.l1Offset, s.refcountTableOffset, ...s.l2Offsets, ...s.refcountBlocks];
    for (let i = 0; i < rng.range(1, 32); i++) {
      const base = rng.pick(spots);
      const at = base + rng.int(s.clusterSize);
      if (at < b.length) b[at] ^= 1 << rng.int(8);
    }
    return "metadata bit flips";
  },
];

/** Cuts an image short; returns the new bytes. */
function truncate(s: SeedLayout, b: Uint8Array, rng: Rng): { bytes: Uint8Array; what: string } {
  const r = rng.int(4);
  if (r === 0) return { bytes: b.slice(0, rng.int(112)), what: "truncated header" };
  if (r === 1) {
    return {
      bytes: b.slice(0, rng.range(112, Math.min(b.length, s.clusterSize))),
      what: "truncated header cluster",
    };
  }
  if (r === 2) {
    const ends = [s.l1Offset, s.refcountTableOffset, ...s.l2Offsets, ...s.refcountBlocks];
    const cut = rng.pick(ends) + rng.int(s.clusterSize);
    return { bytes: b.slice(0, Math.min(cut, b.length)), what: "truncated in the metadata" };
  }
  return { bytes: b.slice(0, rng.int(b.length)), what: "truncated anywhere" };
}

/** Makes the next case from one of the seeds. */
export function nextQcow2Case(seeds: SeedLayout[], rng: Rng): Qcow2Case {
  const s = rng.pick(seeds);
  let bytes: Uint8Array = s.bytes.slice();
  const classes: string[] = [];
  const count = rng.chance(0.7) ? 1 : rng.range(2, 4);
  for (let i = 0; i < count; i++) {
    const v = new DataView(bytes.buffer);
    if (rng.chance(0.1)) {
      const t = truncate(s, bytes, rng);
      bytes = t.bytes;
      classes.push(t.what);
      continue;
    }
    for (let tries = 0; tries < 10; tries++) {
      let what: string | undefined;
      try {
        what = rng.pick(MUTATIONS)(s, bytes, v, rng);
      } catch (error) {
        // The spot lies past the end of an image already cut short: try another mutation.
        if (!(error instanceof RangeError)) throw error;
      }
      if (what) {
        classes.push(what);
        break;
      }
    }
  }
  if (classes.length === 0) classes.push("unmutated");
  return { classes, seed: s.name, bytes };
}

/** How a case ended in process. */
export type CaseOutcome =
  | { kind: "open error"; message: string }
  | { kind: "served"; requests: number; ioErrors: number }
  | { kind: "crash"; message: string };

function expected(error: unknown): boolean {
  return error instanceof Qcow2FormatError || error instanceof Qcow2IoError;
}

function oneLine(message: string): boolean {
  return message.length > 0 && !message.includes("\n");
}

function crash(error: unknown, during: string): CaseOutcome {
  const e = error as Error;
  return {
    kind: "crash",
    message: `${during}: ${e?.name ?? "?"}: ${e?.message ?? String(error)}`.slice(0, 400),
  };
}

/**
 * Opens a case and exercises it like a client would: reads of the front and
 * of random ranges, block status, and (when `writable`) writes, zeroes,
 * discards and a flush. Never throws.
 */
export async function runQcow2Case(
  c: Qcow2Case,
  rng: Rng,
  writable: boolean,
): Promise<CaseOutcome> {
  const store = new MemoryImage(c.bytes);
  let image: Qcow2Image;
  try {
    await readHeader(store);
    image = await Qcow2Image.open(store, { writable, warn: () => {} });
  } catch (error) {
    if (!expected(error)) return crash(error, "open");
    const message = (error as Error).message;
    if (!oneLine(message)) return crash(error, "open (message not one line)");
    return { kind: "open error", message };
  }
  let requests = 0;
  let ioErrors = 0;
  const attempt = async (
    what: string,
    fn: () => Promise<unknown>,
  ): Promise<CaseOutcome | undefined> => {
    requests++;
    try {
      await fn();
    } catch (error) {
      if (!expected(error)) return crash(error, what);
      if (!oneLine((error as Error).message)) return crash(error, `${what} (message not one line)`);
      ioErrors++;
    }
    return undefined;
  };
  const size = image.size;
  const ranges: Array<[number, number]> = [];
  if (size > 0) {
    ranges.push([0, Math.min(size, 256 * 1024)]);
    for (let i = 0; i < 6; i++) {
      const length = Math.min(size, rng.range(1, 65536));
      ranges.push([rng.int(size - length + 1), length]);
    }
  }
  let budget = READ_BUDGET;
  for (const [offset, length] of ranges) {
    if (budget < length) break;
    budget -= length;
    const buf = new Uint8Array(length);
    const r = await attempt(`read ${offset}+${length}`, () => image.read(store, buf, offset));
    if (r) return r;
    const s = await attempt(
      `status ${offset}+${length}`,
      () => image.status(store, offset, length),
    );
    if (s) return s;
  }
  if (size > 0) {
    const whole = await attempt(
      "status of the whole disk",
      () => image.status(store, 0, Math.min(size, 2 ** 31)),
    );
    if (whole) return whole;
  }
  if (writable && image.writable && size > 0) {
    for (let i = 0; i < 4; i++) {
      const length = Math.min(size, rng.range(1, 131072));
      const offset = rng.int(size - length + 1);
      const op = rng.int(3);
      const r = op === 0
        ? await attempt(
          `write ${offset}+${length}`,
          () => image.write(store, new Uint8Array(length).fill(0x5a), offset),
        )
        : op === 1
        ? await attempt(
          `zero ${offset}+${length}`,
          () => image.zero(store, offset, length, rng.chance(0.5)),
        )
        : await attempt(`discard ${offset}+${length}`, () => image.discard(store, offset, length));
      if (r) return r;
    }
    const f = await attempt("flush", () => image.flush(store));
    if (f) return f;
  }
  return { kind: "served", requests, ioErrors };
}

/** The random stream of case `index` of a run: cases replay on their own. */
export function caseRng(seed: number, index: number): Rng {
  return new Rng((Math.imul(seed, 0x9e3779b1) ^ Math.imul(index + 1, 0x85ebca6b)) >>> 0);
}
