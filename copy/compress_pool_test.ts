import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import {
  decompressCluster,
  hasZstdCompression,
  loadCompression,
} from "../formats/qcow2/compress.ts";
import type { CompressionType } from "../formats/qcow2/header.ts";
import { CompressPool } from "./compress_pool.ts";

const CS = 65536;

/** Clusters alternately compressible and random, then a short last one (compressible). */
function sample(clusters: number, tail: number): Uint8Array {
  const data = new Uint8Array(clusters * CS + tail);
  let x = 0x9e3779b9;
  for (let i = 0; i < clusters; i++) {
    const cluster = data.subarray(i * CS, (i + 1) * CS);
    if (i % 2 === 0) cluster.forEach((_, j) => cluster[j] = (i * 7 + (j >> 8)) & 0xff);
    else {
      for (let j = 0; j < CS; j++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        cluster[j] = x & 0xff;
      }
    }
  }
  data.fill(0x61, clusters * CS);
  return data;
}

/** Checks that each result inflates to its cluster, and that random clusters were left out. */
function checkResults(
  type: CompressionType,
  data: Uint8Array,
  results: (Uint8Array | undefined)[],
): void {
  assertEquals(results.length, Math.ceil(data.length / CS));
  for (let i = 0; i < results.length; i++) {
    const expected = new Uint8Array(CS);
    expected.set(data.subarray(i * CS, (i + 1) * CS));
    const compressed = results[i];
    const random = i % 2 === 1 && i < Math.floor(data.length / CS);
    if (random) {
      assertEquals(compressed, undefined, `cluster ${i} saves nothing compressed`);
      continue;
    }
    assertOk(compressed && compressed.length < CS - 512, `cluster ${i} compressed`);
    const out = new Uint8Array(CS);
    // The short last cluster inflates to its own length only.
    const length = Math.min(CS, data.length - i * CS);
    decompressCluster(type, compressed, out.subarray(0, length));
    assertBytes(out.subarray(0, length), expected.subarray(0, length));
  }
}

Deno.test("compress pool: clusters compressed on threads, incompressible ones left out", async () => {
  await loadCompression();
  const pool = new CompressPool("zlib", CS, 2);
  try {
    const data = sample(8, 1000);
    // Several jobs at once, spread over the threads, each answered with its own results.
    const jobs = [data, data.subarray(0, 2 * CS), data.subarray(4 * CS)];
    const results = await Promise.all(jobs.map((job) => pool.compress(job)));
    jobs.forEach((job, i) => checkResults("zlib", job, results[i]!));
  } finally {
    pool.close();
  }
});

Deno.test("compress pool: the caller's buffer may change once compress() is called", async () => {
  await loadCompression();
  const pool = new CompressPool("zlib", CS, 1);
  try {
    const data = sample(2, 0);
    const original = data.slice();
    const pending = pool.compress(data);
    data.fill(0xee);
    checkResults("zlib", original, await pending);
  } finally {
    pool.close();
  }
});

Deno.test("compress pool: with no threads the clusters are compressed in this one", async () => {
  await loadCompression();
  const pool = new CompressPool("zlib", CS, 0);
  const data = sample(4, 3000);
  checkResults("zlib", data, await pool.compress(data));
  pool.close();
});

Deno.test("compress pool: zstd", async () => {
  await loadCompression();
  if (!hasZstdCompression()) return;
  const pool = new CompressPool("zstd", CS, 1);
  try {
    const data = sample(4, 0);
    checkResults("zstd", data, await pool.compress(data));
  } finally {
    pool.close();
  }
});

Deno.test("compress pool: jobs waiting when it closes are refused, as are later ones", async () => {
  const pool = new CompressPool("zlib", CS, 1);
  const pending = pool.compress(sample(16, 0));
  pool.close();
  await assertRejects(() => pending, Error, "closed");
  await assertRejects(() => pool.compress(sample(1, 0)), Error, "closed");
});
