/**
 * The `random` plugin: a read-only disk of reproducible pseudo-random bytes.
 * The same seed always gives the same contents; every byte depends only on
 * its offset, so any range can be read in any order.
 *
 * ```
 * nbd serve random 1G seed=42
 * ```
 *
 * @module
 */

import { completeBackend, type Plugin } from "../core/backend.ts";

/** Mixes a 32-bit value (a fast, well-distributed integer hash). */
function mix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x7feb352d);
  x = Math.imul(x ^ (x >>> 15), 0x846ca68b);
  return (x ^ (x >>> 16)) >>> 0;
}

/** Fills `buf` with the random contents at `offset` for `seed`. */
export function fillRandom(buf: Uint8Array, offset: number, seed: number): void {
  // Each 8-byte word is a hash of (seed, word index): position-independent and reproducible.
  const firstWord = Math.floor(offset / 8);
  const skip = offset - firstWord * 8;
  const words = Math.ceil((skip + buf.length) / 8);
  const scratch = skip === 0 && buf.length % 8 === 0 && buf.byteOffset % 4 === 0
    ? buf
    : new Uint8Array(words * 8);
  const view = new Uint32Array(scratch.buffer, scratch.byteOffset, words * 2);
  const seedMix = mix32(seed ^ 0x9e3779b9);
  for (let i = 0; i < words; i++) {
    const w = firstWord + i;
    const lo = w >>> 0;
    const hi = Math.floor(w / 0x1_0000_0000);
    const a = mix32(lo ^ seedMix ^ mix32(hi + 0x632be5ab));
    view[2 * i] = a;
    view[2 * i + 1] = mix32(a ^ 0x85ebca6b ^ seedMix);
  }
  if (scratch !== buf) buf.set(scratch.subarray(skip, skip + buf.length));
}

/** The random plugin. */
export const randomPlugin: Plugin = {
  name: "random",
  summary: "read-only disk of reproducible pseudo-random bytes",
  description: "Example:\n  nbd serve random 1G seed=42",
  params: [
    { name: "size", value: "SIZE", type: "size", description: "size of the disk", required: true },
    {
      name: "seed",
      value: "N",
      type: "integer",
      default: "the current time",
      description: "random seed (0 to 2^32-1)",
    },
  ],
  magicParam: "size",
  create(params) {
    const size = params.takeSize("size")!;
    const seed = params.takeInteger("seed", 0, 2 ** 32 - 1) ?? (Date.now() >>> 0);
    return Promise.resolve({
      open: () =>
        Promise.resolve(completeBackend({
          size: () => size,
          capabilities: () => ({ multiConn: true, cache: "native" }),
          pread(buf, offset) {
            fillRandom(buf, offset, seed);
            return Promise.resolve();
          },
          cache: () => Promise.resolve(),
        })),
    });
  },
};
