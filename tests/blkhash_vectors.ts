/**
 * The digests published with the blkhash library's test suite (SHA-256,
 * 64 KiB blocks), as runs of a byte: "-" is a run known to be zero (a hole,
 * never read), "\0" zero bytes given as data, a letter that byte.
 *
 * @module
 */

const B = 64 * 1024;
const H = B / 2;

/** [name, runs, digest] of each vector. */
export const BLKHASH_VECTORS: Array<[string, Array<[string, number]>, string]> = [
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
