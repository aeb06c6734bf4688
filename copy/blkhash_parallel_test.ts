import { BlkHasher } from "./checksum.ts";
import { ParallelBlkHasher } from "./blkhash_parallel.ts";
import { assertEquals } from "../tests/assert.ts";
import { randomBytes } from "../tests/helpers.ts";

/** The same pieces (data of odd sizes, zero runs, a short last block) into both hashers. */
async function both(threads: number, blockSize: number, pieces: Array<Uint8Array | number>) {
  const serial = new BlkHasher(blockSize);
  const parallel = new ParallelBlkHasher(threads, blockSize);
  for (const piece of pieces) {
    if (typeof piece === "number") {
      serial.zero(piece);
      parallel.zero(piece);
    } else {
      serial.update(piece);
      parallel.update(piece);
      await parallel.ready();
    }
  }
  await parallel.settle();
  return [parallel.digest(), serial.digest()];
}

Deno.test("parallel blkhash equals blkhash: odd pieces, zero runs, zero data, short tail", async () => {
  const data = randomBytes(3 * 1024 * 1024 + 12345, 7);
  const pieces: Array<Uint8Array | number> = [];
  let at = 0;
  for (const n of [1, 65535, 65536, 200_000, 7, 1_000_000]) {
    pieces.push(data.subarray(at, at + n));
    at += n;
  }
  pieces.push(3 * 65536 + 100, new Uint8Array(65536 * 3), data.subarray(at), 999);
  for (const threads of [2, 3]) {
    const [got, expected] = await both(threads, 65536, pieces);
    assertEquals(got, expected, `${threads} workers`);
  }
  const [small, smallExpected] = await both(2, 4096, pieces);
  assertEquals(small, smallExpected, "4 KiB blocks");
  // Zero blocks in the data, last: the final run of zero blocks is counted without a worker.
  const zeroTail = [data.subarray(0, 65536 * 20 + 3), new Uint8Array(65536 * 5 - 3)];
  const [tail, tailExpected] = await both(2, 65536, zeroTail);
  assertEquals(tail, tailExpected, "zero data last");
  const [zeroes, zeroesExpected] = await both(2, 65536, [new Uint8Array(65536 * 7), 65536 * 3]);
  assertEquals(zeroes, zeroesExpected, "only zeroes");
  const [empty, emptyExpected] = await both(2, 65536, []);
  assertEquals(empty, emptyExpected, "empty");
});
