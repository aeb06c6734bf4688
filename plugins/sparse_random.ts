/**
 * The `sparse-random` plugin: a reproducible disk shaped like a virtual
 * machine image: runs of data separated by holes. The same seed gives the
 * same disk, and any byte can be computed directly (no state), so a huge
 * disk costs nothing. Writes succeed only when they write what a read
 * returns (and zeroes only where the disk reads as zero), so one instance
 * can be both the source and the destination of a copy test.
 *
 * ```
 * nbd serve sparse-random 1T seed=42
 * nbd serve -U - sparse-random size=8G --run 'nbdcopy "$uri" "$uri"'
 * ```
 *
 * Parameters:
 * - `[size=]SIZE` (required).
 * - `seed=N`: random seed (default: a random one, printed by `--verbose`).
 * - `percent=N`: share of the disk holding data, 0-100 (default 10).
 * - `runlength=SIZE`: average length of a run of data (default 16M).
 * - `random-content=BOOL`: every byte random (default: each 4K block is
 *   one random non-zero byte repeated, which is faster).
 *
 * Layout: the disk is cut into segments of `runlength × 100 / percent`;
 * each segment holds one run of data of about `runlength` (varying by up
 * to ±50%) at a position chosen from the seed.
 *
 * @module
 */

import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";
import { completeBackend, type Extent, type Plugin } from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";

/** Granularity of data and holes. */
export const SPARSE_BLOCK = 4096;

/** A 32-bit hash of (seed, n, salt): deterministic, well mixed. */
function hash(seed: number, n: number, salt: number): number {
  let h = (seed ^ Math.imul(salt, 0x9e3779b9)) >>> 0;
  h = Math.imul(h ^ (n % 0x100000000), 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h ^ Math.floor(n / 0x100000000), 0xc2b2ae35);
  h ^= h >>> 16;
  h = Math.imul(h, 0x27d4eb2f);
  h ^= h >>> 15;
  return h >>> 0;
}

/** The layout and content of one sparse-random disk. */
export class SparseRandom {
  readonly size: number;
  readonly #seed: number;
  readonly #percent: number;
  readonly #runBlocks: number;
  readonly #segBlocks: number;
  readonly #variation: number;
  readonly #randomContent: boolean;

  /** Creates the disk description. */
  constructor(
    size: number,
    options: { seed: number; percent: number; runlength: number; randomContent: boolean },
  ) {
    this.size = size;
    this.#seed = options.seed >>> 0;
    this.#percent = options.percent;
    this.#runBlocks = Math.max(1, Math.round(options.runlength / SPARSE_BLOCK));
    this.#segBlocks = Math.max(1, Math.round(this.#runBlocks * 100 / Math.max(options.percent, 1)));
    this.#variation = options.percent > 0
      ? Math.min(0.5, (100 - options.percent) / options.percent)
      : 0;
    this.#randomContent = options.randomContent;
  }

  /** The data run of segment `seg`: [start, end) in blocks from the segment start. */
  #run(seg: number): [number, number] {
    if (this.#percent >= 100) return [0, this.#segBlocks];
    if (this.#percent <= 0) return [0, 0];
    const u1 = hash(this.#seed, seg, 1) / 2 ** 32;
    const u2 = hash(this.#seed, seg, 2) / 2 ** 32;
    const v = this.#variation;
    const length = Math.min(
      this.#segBlocks,
      Math.max(1, Math.round(this.#runBlocks * (1 - v + 2 * v * u1))),
    );
    const start = Math.floor(u2 * (this.#segBlocks - length + 1));
    return [start, start + length];
  }

  /** Whether block `block` holds data. */
  isData(block: number): boolean {
    const seg = Math.floor(block / this.#segBlocks);
    const within = block - seg * this.#segBlocks;
    const [start, end] = this.#run(seg);
    return within >= start && within < end;
  }

  /** Fills `buf` with the disk's bytes at `offset`. */
  read(buf: Uint8Array, offset: number): void {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const block = Math.floor(pos / SPARSE_BLOCK);
      const within = pos - block * SPARSE_BLOCK;
      const n = Math.min(SPARSE_BLOCK - within, buf.length - done);
      const piece = buf.subarray(done, done + n);
      if (!this.isData(block)) piece.fill(0);
      else if (!this.#randomContent) piece.fill(1 + (hash(this.#seed, block, 3) % 255));
      else {
        // Every byte random: an xorshift stream seeded per block, skipped to `within`.
        let x = hash(this.#seed, block, 4) | 1;
        for (let i = 0; i < within + n; i++) {
          x ^= x << 13;
          x ^= x >>> 17;
          x ^= x << 5;
          if (i >= within) piece[i - within] = x & 0xff;
        }
      }
      done += n;
    }
  }

  /** Allocation status from `offset`. */
  extents(offset: number, length: number): Extent[] {
    const out: Extent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const block = Math.floor(pos / SPARSE_BLOCK);
      const data = this.isData(block);
      // Extend over following blocks of the same kind, a segment's run at a time.
      let next = block + 1;
      while (next * SPARSE_BLOCK < end && this.isData(next) === data) {
        const seg = Math.floor(next / this.#segBlocks);
        const [start, stop] = this.#run(seg);
        const segStart = seg * this.#segBlocks;
        const within = next - segStart;
        if (data && within >= start && within < stop) next = segStart + stop;
        else if (!data && within < start) next = segStart + start;
        else if (!data && within >= stop) next = segStart + this.#segBlocks;
        else next++;
      }
      const runEnd = Math.min(next * SPARSE_BLOCK, end);
      out.push({ length: runEnd - pos, flags: data ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO });
      pos = runEnd;
    }
    return out;
  }
}

/** The sparse-random plugin. */
export const sparseRandomPlugin: Plugin = {
  name: "sparse-random",
  summary: "reproducible sparse random disk; writes must match what reads return",
  description: "Examples:\n  nbd serve sparse-random 1T seed=42\n" +
    '  nbd serve -U - sparse-random size=8G --run \'nbdcopy "$uri" "$uri"\'',
  params: [
    { name: "size", value: "SIZE", type: "size", description: "size of the disk", required: true },
    {
      name: "seed",
      value: "N",
      type: "integer",
      default: "random",
      description: "random seed (0 to 2^32-1)",
    },
    {
      name: "percent",
      value: "N",
      type: "string",
      default: "10",
      description: "share of the disk holding data, 0 to 100 (a trailing % is allowed)",
    },
    {
      name: "runlength",
      value: "SIZE",
      type: "size",
      default: "16M",
      description: "average run of data",
    },
    {
      name: "random-content",
      value: "BOOL",
      type: "boolean",
      default: "false",
      description: "every byte random (false: one byte repeated per 4K block)",
    },
  ],
  magicParam: "size",
  create(params) {
    const size = params.takeSize("size")!;
    const seed = params.takeInteger("seed", 0, 2 ** 32 - 1) ??
      crypto.getRandomValues(new Uint32Array(1))[0]!;
    const percentText = params.take("percent");
    const percent = percentText === undefined ? 10 : Number(percentText.replace(/%$/, ""));
    if (!(percent >= 0 && percent <= 100)) {
      throw new UsageError(`percent: expected 0 to 100, got "${percentText}"`);
    }
    const runlength = params.takeSize("runlength") ?? 16 * 1024 * 1024;
    if (runlength < 1) throw new UsageError("runlength: must be at least 1");
    const randomContent = params.takeBoolean("random-content") ?? false;
    const disk = new SparseRandom(size, { seed, percent, runlength, randomContent });
    const check = (buf: Uint8Array, offset: number) => {
      const expected = new Uint8Array(buf.length);
      disk.read(expected, offset);
      for (let i = 0; i < buf.length; i++) {
        if (buf[i] !== expected[i]) {
          throw new NbdError(
            "EIO",
            `data written at ${offset + i} differs from the disk's (${buf[i]} != ${expected[i]})`,
          );
        }
      }
    };
    return Promise.resolve({
      open: () =>
        Promise.resolve(completeBackend({
          size: () => size,
          capabilities: () => ({
            multiConn: true,
            fua: "native",
            cache: "native",
            fastZero: true,
            extents: true,
          }),
          pread(buf, offset) {
            disk.read(buf, offset);
            return Promise.resolve();
          },
          pwrite(buf, offset) {
            check(buf, offset);
            return Promise.resolve();
          },
          flush: () => Promise.resolve(),
          trim: () => Promise.resolve(),
          zero(offset, length) {
            for (const e of disk.extents(offset, length)) {
              if (!(e.flags & NBD_STATE_ZERO)) {
                return Promise.reject(new NbdError("EIO", `zeroing data at ${offset}`));
              }
            }
            return Promise.resolve();
          },
          extents: (offset, length) => Promise.resolve(disk.extents(offset, length)),
          cache: () => Promise.resolve(),
        })),
    });
  },
};
