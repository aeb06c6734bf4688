import { createHash } from "node:crypto";
import { assertEquals, assertRejects } from "../tests/assert.ts";
import { BlkHasher, OrderedFeed, Sha256Hasher } from "./checksum.ts";

const B = 64 * 1024;
const H = B / 2;

/** Runs of a byte ("-" = a zero run given as zero(), not as data), as blkhash's own tests give them. */
function blkhash(runs: Array<[string, number]>): string {
  const hasher = new BlkHasher();
  for (const [byte, length] of runs) {
    if (byte === "-") hasher.zero(length);
    else hasher.update(new Uint8Array(length).fill(byte === "\0" ? 0 : byte.charCodeAt(0)));
  }
  return hasher.digest();
}

// The digests published with the blkhash library's test suite (SHA-256, 64 KiB blocks).
const VECTORS: Array<[string, Array<[string, number]>, string]> = [
  ["block_data", [["A", B]], "2e3a5f57d5e726ee5de62db1a85ff816f4fa6ea4627807d9a51bdc4c883e165e"],
  [
    "block_data_zero",
    [["\0", B]],
    "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af",
  ],
  ["block_zero", [["-", B]], "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af"],
  [
    "partial_block_data",
    [["A", H]],
    "9467334d6d7668a2f06898185b5cddc78cdfbd962f50c6bf250101f03a0e54dc",
  ],
  [
    "partial_block_data_zero",
    [["\0", H]],
    "842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56",
  ],
  [
    "partial_block_zero",
    [["-", H]],
    "842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56",
  ],
  ["sparse", [["-", 8 * B]], "722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d"],
  [
    "sparse_large",
    [["-", 1 << 30]],
    "c6d6562c3074a2caa0ceea3e1f460f3af678c792ed05e64157eb51e68ae5260d",
  ],
  [
    "sparse_unaligned",
    [["-", 8 * B], ["-", H]],
    "e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c",
  ],
  ["zero", [["\0", 8 * B]], "722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d"],
  [
    "zero_unaligned",
    [["\0", 8 * B], ["\0", H]],
    "e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c",
  ],
  [
    "full",
    ["ABCDEF"].flatMap((s) => [...s].map((c): [string, number] => [c, H])),
    "4ab1586084326f5beb911621282e9557cd26856105eff7f78cace5986af4738b",
  ],
  [
    "full_unaligned",
    [..."ABCDE"].map((c): [string, number] => [c, H]),
    "2cad558b3a2a8d87435e80fe7bae69fa664d92eaa1b9411f573b9fbb412a4d43",
  ],
  [
    "mix",
    [["A", H], ["-", H], ["-", H], ["\0", H], ["E", H], ["-", H], ["-", H], ["\0", H]],
    "4b2b5acd96f8105f4fb26abaf35c7c5756338ef9ccce19ffe7714c9ad94b4398",
  ],
  [
    "mix_unaligned",
    [["A", H], ["-", H], ["-", H], ["\0", H], ["E", H], ["-", H], ["-", H]],
    "2510ac29c7103f2e68c672d728cbd43db4ed3dc809a24cde96e62dc5862a0f57",
  ],
];

for (const [name, runs, digest] of VECTORS) {
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
