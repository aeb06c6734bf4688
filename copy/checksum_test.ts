import { createHash } from "node:crypto";
import { assertEquals, assertRejects } from "../tests/assert.ts";
import { BLKHASH_VECTORS } from "../tests/blkhash_vectors.ts";
import { BlkHasher, OrderedFeed, Sha256Hasher } from "./checksum.ts";

const B = 64 * 1024;

/** Runs of a byte ("-" = a zero run given as zero(), not as data), as blkhash's own tests give them. */
function blkhash(runs: Array<[string, number]>): string {
  const hasher = new BlkHasher();
  for (const [byte, length] of runs) {
    if (byte === "-") hasher.zero(length);
    else hasher.update(new Uint8Array(length).fill(byte === "\0" ? 0 : byte.charCodeAt(0)));
  }
  return hasher.digest();
}

for (const [name, runs, digest] of BLKHASH_VECTORS) {
  Deno.test(`blkhash reference vector ${name}`, () => {
    assertEquals(blkhash(runs), digest);
  });
}

Deno.test("blkhash of data cut at odd places equals the whole", () => {
  const data = new Uint8Array(5 * B + 12345);
  for (let i = 0; i < data.length; i++) data[i] = (i * 2654435761) >>> 24;
  data.fill(0, B, 3 * B + 7);
  const whole = new BlkHasher();
  whole.update(data);
  const pieces = new BlkHasher();
  // An unaligned view too: the zero check must not need 4-byte alignment.
  const copy = new Uint8Array(data.length + 1).subarray(1);
  copy.set(data);
  for (let at = 0, step = 1; at < copy.length; at += step, step = step * 3 + 1) {
    pieces.update(copy.subarray(at, Math.min(at + step, copy.length)));
  }
  assertEquals(pieces.digest(), whole.digest());
});

Deno.test("sha256 zero() equals hashing zero bytes", () => {
  const hasher = new Sha256Hasher();
  hasher.update(new Uint8Array([1, 2, 3]));
  hasher.zero(3 * 1024 * 1024 + 5);
  const expected = createHash("sha256").update(new Uint8Array([1, 2, 3]))
    .update(new Uint8Array(3 * 1024 * 1024 + 5)).digest("hex");
  assertEquals(hasher.digest(), expected);
});

Deno.test("OrderedFeed hashes pieces that arrive out of order, in order", async () => {
  const hasher = new Sha256Hasher();
  const feed = new OrderedFeed(hasher);
  const data = new Uint8Array(300).map((_, i) => i);
  const settled: number[] = [];
  const third = feed.data(200, data.subarray(200)).then(() => settled.push(3));
  // A known zero range fills [100, 150) without a piece, and overlaps the read of [140, 200).
  feed.knownZero(100, 50);
  const second = feed.data(140, new Uint8Array(60)).then(() => settled.push(2));
  await new Promise((resolve) => setTimeout(resolve, 10));
  assertEquals(settled, [], "nothing is hashed before the first piece arrives");
  await feed.data(0, data.subarray(0, 100));
  await Promise.all([second, third]);
  assertEquals(feed.hashed, 300);
  const expected = new Uint8Array(300);
  expected.set(data.subarray(0, 100));
  expected.set(data.subarray(200), 200);
  assertEquals(hasher.digest(), createHash("sha256").update(expected).digest("hex"));
});

Deno.test("OrderedFeed abort fails the pieces still waiting", async () => {
  const feed = new OrderedFeed(new Sha256Hasher());
  const waiting = feed.data(10, new Uint8Array(5));
  feed.abort(new Error("stopped"));
  await assertRejects(() => waiting, Error, "stopped");
});
