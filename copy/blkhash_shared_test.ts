import { BlkHasher } from "./checksum.ts";
import { BlkhashCollector, BlockDigester, type BlockReport } from "./blkhash_shared.ts";
import { assertEquals, assertThrows } from "../tests/assert.ts";
import { randomBytes } from "../tests/helpers.ts";

/** A deterministic generator, so that a failure can be replayed. */
function generator(seed: number): (n: number) => number {
  let state = seed >>> 0;
  return (n) => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state % n;
  };
}

/**
 * Cuts `image` into writes and zero runs of random sizes (zero runs only
 * where the image is zero), hands them to `threads` digesters in a
 * shuffled order, delivers the reports shuffled, and returns the digest.
 */
function sharedDigest(
  image: Uint8Array,
  blockSize: number,
  threads: number,
  seed: number,
): string {
  const random = generator(seed);
  const collector = new BlkhashCollector(blockSize, image.length);
  const reports: BlockReport[] = [];
  const digesters = Array.from(
    { length: threads },
    () => new BlockDigester(blockSize, image.length, (report) => reports.push(report)),
  );
  const pieces: Array<[number, number]> = [];
  for (let at = 0; at < image.length;) {
    const n = Math.min(image.length - at, 1 + random(3 * blockSize));
    pieces.push([at, n]);
    at += n;
  }
  for (let i = pieces.length - 1; i > 0; i--) {
    const j = random(i + 1);
    [pieces[i], pieces[j]] = [pieces[j]!, pieces[i]!];
  }
  for (const [offset, length] of pieces) {
    const digester = digesters[random(threads)]!;
    const bytes = image.subarray(offset, offset + length);
    if (bytes.every((b) => b === 0) && random(2) === 0) digester.zero(offset, length);
    // Unaligned views too: the zero check must not need 4-byte alignment.
    else if (random(2) === 0) digester.write(bytes.slice(), offset);
    else {
      const copy = new Uint8Array(length + 1);
      copy.set(bytes, 1);
      digester.write(copy.subarray(1), offset);
    }
  }
  for (let i = reports.length - 1; i > 0; i--) {
    const j = random(i + 1);
    [reports[i], reports[j]] = [reports[j]!, reports[i]!];
  }
  for (const report of reports) collector.add(report);
  return collector.digest();
}

function serialDigest(image: Uint8Array, blockSize: number): string {
  const hasher = new BlkHasher(blockSize);
  hasher.update(image);
  return hasher.digest();
}

/** Random data with zero runs and whole zero blocks, `size` bytes. */
function image(size: number, blockSize: number, seed: number): Uint8Array {
  const bytes = randomBytes(size, seed);
  const random = generator(seed + 1);
  for (let i = 0; i < 12; i++) {
    const start = random(size);
    bytes.fill(0, start, Math.min(size, start + random(4 * blockSize)));
  }
  return bytes;
}

Deno.test("shared blkhash equals blkhash: pieces in any order on several threads", () => {
  for (const [size, blockSize] of [[3 * 65536 + 12345, 65536], [20 * 4096, 4096], [5000, 4096]]) {
    const bytes = image(size!, blockSize!, size!);
    const expected = serialDigest(bytes, blockSize!);
    for (const threads of [1, 2, 3]) {
      for (const seed of [1, 2, 3, 4]) {
        assertEquals(
          sharedDigest(bytes, blockSize!, threads, seed),
          expected,
          `${size} bytes, ${blockSize}-byte blocks, ${threads} threads, seed ${seed}`,
        );
      }
    }
  }
});

Deno.test("shared blkhash: a zero image and an empty one", () => {
  const zeroes = new Uint8Array(5 * 4096 + 100);
  assertEquals(sharedDigest(zeroes, 4096, 2, 9), serialDigest(zeroes, 4096));
  const empty = new Uint8Array(0);
  assertEquals(sharedDigest(empty, 4096, 2, 9), serialDigest(empty, 4096));
});

Deno.test("shared blkhash: a missing block is an error, not a digest", () => {
  const collector = new BlkhashCollector(4096, 3 * 4096);
  const digester = new BlockDigester(4096, 3 * 4096, (report) => collector.add(report));
  digester.write(new Uint8Array(4096).fill(1), 0);
  digester.zero(2 * 4096, 4096);
  assertThrows(() => collector.digest(), Error, "1 of 3 blocks");
});
