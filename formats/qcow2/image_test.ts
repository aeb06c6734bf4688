import {
  assertBytes,
  assertEquals,
  assertOk,
  assertRejects,
  assertThrows,
} from "../../tests/assert.ts";
import { hasCommand, run } from "../../tests/helpers.ts";
import { createImage } from "./create.ts";
import {
  compressCluster,
  decompressCluster,
  loadCompression,
  zstdFrameLength,
} from "./compress.ts";
import { Qcow2Writer } from "./writer.ts";
import { parseHeader, Qcow2FormatError } from "./header.ts";
import { type ImageStore, type Layer, Qcow2Image, Qcow2IoError } from "./image.ts";
import * as zlib from "node:zlib";

/** A growable in-memory store that counts flushes. */
class MemoryStore implements ImageStore {
  bytes: Uint8Array;
  length: number;
  constructor(initial: Uint8Array) {
    this.bytes = new Uint8Array(Math.max(initial.length * 2, 1 << 20));
    this.bytes.set(initial);
    this.length = initial.length;
  }
  size(): number {
    return this.length;
  }
  pread(buf: Uint8Array, offset: number): Promise<void> {
    buf.fill(0);
    if (offset < this.length) {
      buf.set(this.bytes.subarray(offset, Math.min(this.length, offset + buf.length)));
    }
    return Promise.resolve();
  }
  pwrite(buf: Uint8Array, offset: number): Promise<void> {
    const end = offset + buf.length;
    if (end > this.bytes.length) {
      const grown = new Uint8Array(Math.max(end, this.bytes.length * 2));
      grown.set(this.bytes);
      this.bytes = grown;
    }
    this.bytes.set(buf, offset);
    this.length = Math.max(this.length, end);
    return Promise.resolve();
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  contents(): Uint8Array {
    return this.bytes.slice(0, this.length);
  }
}

function rng(seed: number) {
  let x = seed;
  return () => (x = (x * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
}

/** Random writes, zeroes and discards, checked against a model after each reopen. */
async function exercise(options: Parameters<typeof createImage>[0], seed: number, backing?: Layer) {
  const store = new MemoryStore(createImage(options));
  const model = new Uint8Array(options.size);
  if (backing) await backing.read(model, 0);
  let image = await Qcow2Image.open(store, { writable: true, backing });
  const next = rng(seed);
  for (let i = 0; i < 60; i++) {
    const offset = Math.floor(next() * options.size);
    const length = Math.max(1, Math.min(options.size - offset, Math.floor(next() * 200000)));
    const kind = next();
    if (kind < 0.6) {
      const data = new Uint8Array(length).fill(1 + (i % 250));
      await image.write(store, data, offset);
      model.set(data, offset);
    } else if (kind < 0.9) {
      await image.zero(store, offset, length, next() < 0.5);
      model.fill(0, offset, offset + length);
    } else {
      // Discarded whole clusters (subclusters with extended L2) read as zeroes
      // afterwards; partial ones are unchanged.
      await image.discard(store, offset, length);
      const cs = (options.clusterSize ?? 65536) / (options.extendedL2 ? 32 : 1);
      const from = Math.ceil(offset / cs) * cs;
      let to = Math.floor((offset + length) / cs) * cs;
      if (offset + length === options.size) to = options.size;
      if (from < to && !(backing && options.version === 2)) model.fill(0, from, to);
    }
    if (i % 20 === 19) {
      await image.flush(store);
      image = await Qcow2Image.open(store, { writable: true, backing });
    }
  }
  await image.flush(store);
  const reopened = await Qcow2Image.open(store, { writable: false, backing });
  const got = new Uint8Array(options.size);
  await reopened.read(store, got, 0);
  assertBytes(got, model, JSON.stringify(options));
  return store;
}

const qemuImg = hasCommand("qemu-img");

async function qemuCheck(store: MemoryStore, what: string) {
  if (!qemuImg) return;
  const path = await Deno.makeTempFile({ suffix: ".qcow2" });
  try {
    await Deno.writeFile(path, store.contents());
    const result = await run("qemu-img", ["check", path]);
    assertEquals(result.code, 0, `${what}: qemu-img check\n${result.stdout}${result.stderr}`);
  } finally {
    await Deno.remove(path);
  }
}

Deno.test("qcow2 image: refcount widths 1..64 and cluster sizes 512 B..2 MiB, written and read back", async () => {
  let seed = 1;
  const pairs = [[1, 512], [2, 4096], [4, 65536], [8, 2 << 20], [16, 512], [32, 16384], [64, 512], [
    64,
    2 << 20,
  ]];
  for (const [refcountBits, clusterSize] of pairs) {
    const options = { size: 3 * 1024 * 1024 + 512, clusterSize, refcountBits };
    const store = await exercise(options, seed++);
    await qemuCheck(store, JSON.stringify(options));
  }
});

Deno.test("qcow2 image: version 2, extended L2, and a raw backing layer", async () => {
  const base = new Uint8Array(2 * 1024 * 1024).map((_, i) => (i * 7) % 251);
  const backing: Layer = {
    size: base.length - 4096, // shorter than the image: the rest reads as zeroes
    read: (buf, offset) => {
      buf.set(base.subarray(offset, offset + buf.length));
      return Promise.resolve();
    },
    status: (_o, length) => Promise.resolve([{ length, data: true, zero: false }]),
    close: () => Promise.resolve(),
  };
  const size = 2 * 1024 * 1024;
  for (
    const options of [
      { size, version: 2, clusterSize: 4096 },
      { size, extendedL2: true, clusterSize: 65536 },
      { size, extendedL2: true, clusterSize: 16384, refcountBits: 64 },
    ]
  ) {
    await qemuCheck(await exercise(options, 5), JSON.stringify(options));
    await exercise({ ...options, backingFile: "base.raw", backingFormat: "raw" }, 9, backing);
  }
});

Deno.test("qcow2 header: malformed headers are one-line errors", () => {
  const good = createImage({ size: 1 << 20 });
  const bad = (mutate: (v: DataView, b: Uint8Array) => void, pattern: RegExp) => {
    const bytes = good.slice();
    mutate(new DataView(bytes.buffer), bytes);
    assertThrows(() => parseHeader(bytes, bytes.length), Qcow2FormatError, pattern);
  };
  bad((v) => v.setUint32(0, 0), /bad magic/);
  bad((v) => v.setUint32(4, 4), /version 4/);
  bad((v) => v.setUint32(20, 22), /cluster_bits 22/);
  bad((v) => v.setUint32(24, 0x7fffffff), /virtual size is too large/);
  bad((v) => v.setUint32(36, 0), /L1 table is too small/);
  bad((v) => v.setUint32(44, 0x01000000), /L1 table lies past the end/);
  bad((v) => v.setUint32(52, 0x1000), /refcount table is not cluster-aligned/);
  bad((v) => v.setUint32(52, 0), /refcount table overlaps the header/);
  bad((v) => v.setUint32(76, 1 << 9), /unsupported incompatible qcow2 features: bit 9/);
  bad((v) => v.setUint32(96, 7), /refcount_order 7/);
  bad((v) => v.setUint32(100, 4001), /header length/);
  bad((v) => v.setUint32(112 + 4, 100000), /extension runs past/);
  assertThrows(() => parseHeader(good.subarray(0, 50), 50), Qcow2FormatError, /too short/);
  const h = parseHeader(good, good.length);
  assertEquals([h.version, h.clusterSize, h.refcountOrder, h.compressionType], [
    3,
    65536,
    4,
    "zlib",
  ]);
  assertOk(h.featureNames.some((f) => f.name === "extended L2 entries"));
});

Deno.test("qcow2 compression: zlib and zstd with trailing sector bytes; bad data refused", async () => {
  await loadCompression();
  const cluster = new Uint8Array(65536).map((_, i) => (i >> 5) & 0xff);
  const pad = (b: Uint8Array) => {
    const out = new Uint8Array(Math.ceil((b.length + 1) / 512) * 512).fill(0x5a);
    out.set(b);
    return out;
  };
  for (
    const [type, data] of [["zlib", zlib.deflateRawSync(cluster)], [
      "zstd",
      zlib.zstdCompressSync(cluster),
    ]] as const
  ) {
    const out = new Uint8Array(65536);
    decompressCluster(type, pad(new Uint8Array(data)), out);
    assertBytes(out, cluster);
    assertThrows(
      () => decompressCluster(type, new Uint8Array(600).fill(0xff), out),
      Qcow2FormatError,
    );
    // The inflate state is reused: after a failure the next cluster still inflates whole.
    out.fill(0x11);
    decompressCluster(type, pad(new Uint8Array(data)), out);
    assertBytes(out, cluster);
    // A stream that inflates to less than a cluster.
    const short = type === "zlib"
      ? zlib.deflateRawSync(cluster.subarray(0, 100))
      : zlib.zstdCompressSync(cluster.subarray(0, 100));
    assertThrows(
      () => decompressCluster(type, new Uint8Array(short), out),
      Qcow2FormatError,
      /inflates to 100 bytes/,
    );
  }
  assertEquals(
    zstdFrameLength(new Uint8Array(zlib.zstdCompressSync(cluster))),
    zlib.zstdCompressSync(cluster).length,
  );
});

Deno.test("qcow2 image: metadata past the end or overlapping is EIO per request, not a crash", async () => {
  const bytes = createImage({ size: 1 << 20, clusterSize: 4096 });
  const store = new MemoryStore(bytes);
  const image = await Qcow2Image.open(store, { writable: true });
  await image.write(store, new Uint8Array(4096).fill(9), 0);
  await image.flush(store);
  // Point the L1 entry at the header cluster.
  const h = parseHeader(store.contents(), store.length);
  const view = new DataView(store.bytes.buffer);
  view.setUint32(h.l1TableOffset + 4, 0);
  view.setUint32(h.l1TableOffset, 0x80000000);
  // An L1 entry of 0 with the copied flag reads as unallocated: fine.
  const again = await Qcow2Image.open(store, { writable: false });
  const buf = new Uint8Array(4096);
  await again.read(store, buf, 0);
  assertEquals(buf[0], 0);
  // Now an L2 table past the end of the file.
  view.setUint32(h.l1TableOffset, 0x80000000);
  view.setUint32(h.l1TableOffset + 4, 0x10000000);
  await assertRejects(
    () => Qcow2Image.open(store, { writable: false }),
    Qcow2FormatError,
    /past the end/,
  );
});

Deno.test("qcow2 image: a failed piece of a read is settled with the rest, never left unhandled", async () => {
  // The first piece of the read, a data cluster past the end of the file, fails while the
  // lookup of the second, an L2 entry that is not cluster-aligned, fails too.
  const cs = 4096;
  const store = new MemoryStore(createImage({ size: 256 * cs, clusterSize: cs }));
  const image = await Qcow2Image.open(store, { writable: true });
  await image.write(store, new Uint8Array(128 * cs).fill(7), 0);
  await image.flush(store);
  const h = parseHeader(store.contents(), store.length);
  const view = new DataView(store.bytes.buffer);
  const l2 = Number(view.getBigUint64(h.l1TableOffset) & 0x00ff_ffff_ffff_fe00n);
  view.setBigUint64(l2 + 62 * 8, (1n << 63n) | BigInt(store.length + 1024 * cs));
  view.setBigUint64(l2 + 100 * 8, 0x200n);
  const reopened = await Qcow2Image.open(store, { writable: false });
  await assertRejects(
    () => reopened.read(store, new Uint8Array(40 * cs), 62 * cs),
    Qcow2IoError,
    /not cluster-aligned/,
  );
  // The rest of the image still reads.
  const buf = new Uint8Array(cs);
  await reopened.read(store, buf, 64 * cs);
  assertEquals(buf[0], 7);
  await reopened.read(store, buf, 101 * cs);
  assertEquals(buf[0], 7);
});

/** A store with a small front and sparse windows far out (read as zeroes elsewhere). */
class SparseStore implements ImageStore {
  readonly front: MemoryStore;
  readonly windows = new Map<number, Uint8Array>();
  readonly length: number;
  constructor(front: Uint8Array, length: number) {
    this.front = new MemoryStore(front);
    this.length = length;
  }
  size(): number {
    return this.length;
  }
  window(at: number, bytes: number): Uint8Array {
    const w = new Uint8Array(bytes);
    this.windows.set(at, w);
    return w;
  }
  #find(offset: number, length: number): Uint8Array | undefined {
    for (const [at, w] of this.windows) {
      if (offset >= at && offset + length <= at + w.length) return w.subarray(offset - at);
    }
    return undefined;
  }
  pread(buf: Uint8Array, offset: number): Promise<void> {
    if (offset < 0) return Promise.reject(new RangeError(`negative offset ${offset}`));
    const w = this.#find(offset, buf.length);
    if (w) buf.set(w.subarray(0, buf.length));
    else if (offset + buf.length <= this.front.length) return this.front.pread(buf, offset);
    else buf.fill(0);
    return Promise.resolve();
  }
  pwrite(buf: Uint8Array, offset: number): Promise<void> {
    if (offset < 0) return Promise.reject(new RangeError(`negative offset ${offset}`));
    const w = this.#find(offset, buf.length);
    if (!w) return Promise.reject(new RangeError(`write outside the windows at ${offset}`));
    w.set(buf);
    return Promise.resolve();
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
}

Deno.test("qcow2 image: L2 tables and data clusters at host offsets with bit 31 set (past 2 GiB)", async () => {
  const cs = 65536;
  const built = new MemoryStore(createImage({ size: 8 * cs, clusterSize: cs }));
  const image = await Qcow2Image.open(built, { writable: true });
  await image.write(built, new Uint8Array(cs).fill(1), 0);
  await image.flush(built);
  const h = parseHeader(built.contents(), built.length);
  const v = new DataView(built.bytes.buffer);
  const l2 = Number(v.getBigUint64(h.l1TableOffset) & 0x00ff_ffff_ffff_fe00n);
  // Move the L2 table to 2.5 GiB and guest clusters 0 and 1 to 3 GiB and 6.5 GiB.
  const l2At = 0xa000_0000;
  const dataAt = [0xc000_0000, 0x1_a000_0000];
  const sparse = new SparseStore(built.contents(), 0x1_a000_0000 + cs);
  const table = sparse.window(l2At, cs);
  table.set(built.bytes.subarray(l2, l2 + cs));
  const t = new DataView(table.buffer);
  dataAt.forEach((at, i) => {
    t.setBigUint64(i * 8, (1n << 63n) | BigInt(at));
    sparse.window(at, cs).fill(0x41 + i);
  });
  new DataView(sparse.front.bytes.buffer).setBigUint64(h.l1TableOffset, (1n << 63n) | BigInt(l2At));
  const reopened = await Qcow2Image.open(sparse, { writable: true });
  const got = new Uint8Array(2 * cs);
  await reopened.read(sparse, got, 0);
  assertEquals([got[0], got[cs - 1], got[cs], got[2 * cs - 1]], [0x41, 0x41, 0x42, 0x42]);
  const runs = await reopened.status(sparse, 0, 3 * cs);
  assertEquals(runs.map((r) => [r.length, r.data]), [[2 * cs, true], [cs, false]]);
  // In-place writes land in those clusters, not elsewhere.
  await reopened.write(sparse, new Uint8Array(512).fill(0x5a), cs + 512);
  assertEquals(sparse.windows.get(dataAt[1]!)![512], 0x5a);
  await reopened.read(sparse, got, 0);
  assertEquals([got[cs + 511], got[cs + 512], got[cs + 1024]], [0x42, 0x5a, 0x42]);
});

Deno.test("qcow2 image: an in-place write to a data cluster past the end of the file is EIO", async () => {
  const cs = 4096;
  const store = new MemoryStore(createImage({ size: 64 * cs, clusterSize: cs }));
  const image = await Qcow2Image.open(store, { writable: true });
  await image.write(store, new Uint8Array(2 * cs).fill(3), 0);
  await image.flush(store);
  const h = parseHeader(store.contents(), store.length);
  const v = new DataView(store.bytes.buffer);
  const l2 = Number(v.getBigUint64(h.l1TableOffset) & 0x00ff_ffff_ffff_fe00n);
  // A corrupt entry: "ours" (copied flag) but 8 PiB into the file.
  v.setBigUint64(l2, (1n << 63n) | (1n << 53n));
  const length = store.length;
  const reopened = await Qcow2Image.open(store, { writable: true });
  for (
    const op of [
      () => reopened.write(store, new Uint8Array(512).fill(9), 512),
      () => reopened.zero(store, 100, 1000, false),
    ]
  ) {
    await assertRejects(op, Qcow2IoError, /past the end of the file/);
  }
  assertEquals(store.length, length);
  // The next cluster is still written in place.
  await reopened.write(store, new Uint8Array(512).fill(9), cs);
  const back = new Uint8Array(cs);
  await reopened.read(store, back, cs);
  assertEquals([back[0], back[511], back[512]], [9, 9, 3]);
});

/** A store over a finished image that records the length of every read. */
class CountingStore extends MemoryStore {
  reads: number[] = [];
  override pread(buf: Uint8Array, offset: number): Promise<void> {
    this.reads.push(buf.length);
    return super.pread(buf, offset);
  }
}

/** Writes `clusters` (guest cluster number → contents) into a new image, in that order. */
async function writeImage(
  size: number,
  clusterSize: number,
  clusters: [number, Uint8Array, "compressed" | "plain"][],
): Promise<CountingStore> {
  const out = new MemoryStore(new Uint8Array(0));
  const writer = await Qcow2Writer.create(out, { size, clusterSize });
  for (const [cluster, data, how] of clusters) {
    if (how === "plain") await writer.writeData(cluster, data);
    else await writer.writeCompressed(cluster, compressCluster("zlib", data)!);
  }
  await writer.finish();
  return new CountingStore(out.contents());
}

Deno.test("qcow2 image: neighbouring compressed clusters are fetched in one read", async () => {
  await loadCompression();
  const cs = 4096;
  const next = rng(7);
  const contents = (i: number) =>
    new Uint8Array(cs).map((_, j) => j < 64 ? Math.floor(next() * 256) : (i + (j >> 6)) & 0xff);
  const model = new Uint8Array(256 * cs);
  const clusters: [number, Uint8Array, "compressed" | "plain"][] = [];
  const put = (i: number, how: "compressed" | "plain") => {
    const data = contents(i);
    model.set(data, i * cs);
    clusters.push([i, data, how]);
  };
  // 100 packed one after the other, a plain cluster (which starts on a host cluster
  // boundary, leaving a gap), 99 more, then 10 stored in the reverse of guest order.
  for (let i = 0; i < 100; i++) put(i, "compressed");
  put(100, "plain");
  for (let i = 101; i < 200; i++) put(i, "compressed");
  for (let i = 209; i >= 200; i--) put(i, "compressed");
  const store = await writeImage(model.length, cs, clusters);
  const image = await Qcow2Image.open(store, { writable: false });
  await image.read(store, new Uint8Array(cs), 250 * cs); // loads the L2 table
  store.reads = [];
  const first = new Uint8Array(100 * cs);
  await image.read(store, first, 0);
  assertBytes(first, model.subarray(0, 100 * cs));
  assertEquals(store.reads.length, 1);
  store.reads = [];
  const all = new Uint8Array(model.length);
  await image.read(store, all, 0);
  assertBytes(all, model);
  // 0-99, the plain cluster, 101-199, and one read for each cluster stored backwards.
  assertEquals(store.reads.length, 3 + 10);
  // A piece of a cluster still reads right (inflated whole and cached).
  const piece = new Uint8Array(1000);
  await image.read(store, piece, 150 * cs + 3000);
  assertBytes(piece, model.subarray(150 * cs + 3000, 150 * cs + 4000));
});

Deno.test("qcow2 image: one read of neighbouring compressed clusters stays within 4 MiB", async () => {
  await loadCompression();
  const cs = 65536;
  const count = 160;
  const next = rng(11);
  const model = new Uint8Array(count * cs);
  const clusters: [number, Uint8Array, "compressed" | "plain"][] = [];
  for (let i = 0; i < count; i++) {
    // Half random: each compresses to a little over half a cluster.
    const data = new Uint8Array(cs).map((_, j) => j < cs / 2 ? Math.floor(next() * 256) : 0);
    model.set(data, i * cs);
    clusters.push([i, data, "compressed"]);
  }
  const store = await writeImage(model.length, cs, clusters);
  const image = await Qcow2Image.open(store, { writable: false });
  await image.read(store, new Uint8Array(512), 0); // loads the L2 table
  store.reads = [];
  const all = new Uint8Array(model.length);
  await image.read(store, all, 0);
  assertBytes(all, model);
  assertEquals(store.reads.length, 2);
  assertOk(store.reads.every((n) => n <= 4 << 20), `reads of ${store.reads}`);
});

Deno.test("qcow2 image: a piece written into a new cluster is written with one sector, not the cluster", async () => {
  const cs = 65536;
  const size = 8 << 20;
  const writes: number[] = [];
  class RecordingStore extends MemoryStore {
    override pwrite(buf: Uint8Array, offset: number): Promise<void> {
      writes.push(buf.length);
      return super.pwrite(buf, offset);
    }
  }
  const store = new RecordingStore(createImage({ size, clusterSize: cs }));
  const image = await Qcow2Image.open(store, { writable: true });
  const model = new Uint8Array(size);
  // 4 KiB pieces 2 clusters + 4 KiB apart: at every offset within a cluster, each a new one.
  const pieces: [number, Uint8Array][] = [];
  for (let i = 0, at = 0; at + 4096 <= size; i++, at += 2 * cs + 4096) {
    pieces.push([at, new Uint8Array(4096).fill(1 + (i % 250))]);
  }
  // A piece that ends the cluster, and one that ends 100 bytes short of it.
  pieces.push([size - 4096, new Uint8Array(4096).fill(0xab)]);
  pieces.push([size - 2 * cs + 1000, new Uint8Array(cs - 1100).fill(0xcd)]);
  for (const [at, data] of pieces) {
    await image.write(store, data, at);
    model.set(data, at);
  }
  const written = writes.reduce((a, b) => a + b, 0);
  const data = pieces.reduce((a, [, d]) => a + d.length, 0);
  assertOk(written <= data + pieces.length * 512, `${written} bytes written for ${data}`);
  // The file covers every cluster allocated, whole.
  assertEquals(store.size() % cs, 0);
  await image.flush(store);
  const reopened = await Qcow2Image.open(store, { writable: false });
  const got = new Uint8Array(size);
  await reopened.read(store, got, 0);
  assertBytes(got, model);
  await qemuCheck(store, "pieces in new clusters");
});

/** A MemoryStore whose trim reads back as zeroes, as a punched hole does. */
class PunchingStore extends MemoryStore {
  trims = 0;
  trim(offset: number, length: number): Promise<void> {
    this.trims++;
    this.bytes.fill(0, offset, Math.min(offset + length, this.length));
    return Promise.resolve();
  }
}

Deno.test("qcow2 image: hostRange answers from cached tables only, for plain data runs alone", async () => {
  const cs = 65536;
  const store = new MemoryStore(createImage({ size: 4 << 20, clusterSize: cs }));
  let image = await Qcow2Image.open(store, { writable: true });
  const data = (n: number, seed: number) => new Uint8Array(n).map((_, i) => (i * seed + 3) % 251);
  // Clusters 4..7 then 0..3 allocated in that order: contiguous within each write only.
  await image.write(store, data(4 * cs, 7), 4 * cs);
  await image.write(store, data(4 * cs, 11), 0);
  await image.zero(store, 8 * cs, cs, false);
  await image.flush(store);
  image = await Qcow2Image.open(store, { writable: true });
  assertEquals(image.hostRange(0, cs), undefined, "no table cached yet: no I/O to answer");
  await image.read(store, new Uint8Array(512), 0);
  const host = image.hostRange(cs + 100, 2 * cs);
  assertOk(host !== undefined, "plain clusters in one host run");
  assertBytes(
    store.contents().subarray(host!, host! + 2 * cs),
    data(4 * cs, 11).subarray(cs + 100, 3 * cs + 100),
  );
  assertEquals(image.hostRange(3 * cs, 2 * cs), undefined, "across a discontiguity");
  assertEquals(image.hostRange(7 * cs, 2 * cs), undefined, "into a zero cluster");
  assertEquals(image.hostRange(20 * cs, cs), undefined, "unallocated");
  assertEquals(image.hostRange(4 * cs, 4 * cs) !== undefined, true);
  assertEquals(image.hostRange((4 << 20) - 512, 1024), undefined, "past the end");
});

Deno.test("qcow2 image: hostRange of extended L2 needs every subcluster of the range allocated", async () => {
  const cs = 65536;
  const sub = cs / 32;
  const store = new MemoryStore(createImage({ size: 1 << 20, clusterSize: cs, extendedL2: true }));
  const image = await Qcow2Image.open(store, { writable: true });
  await image.write(store, new Uint8Array(cs).fill(9), 0);
  await image.write(store, new Uint8Array(4 * sub).fill(8), cs + 4 * sub);
  await image.zero(store, 2 * sub, sub, false);
  assertOk(image.hostRange(0, 2 * sub) !== undefined);
  assertEquals(image.hostRange(0, 3 * sub), undefined, "a zero subcluster");
  assertOk(image.hostRange(cs + 4 * sub, 4 * sub) !== undefined);
  assertEquals(image.hostRange(cs + 3 * sub, 2 * sub), undefined, "an unallocated subcluster");
});

Deno.test("qcow2 image: bytes at a host range handed out stay the guest's, or zeroes after a change", async () => {
  // Writes, zeroes and discards (freeing clusters, punched, at each flush) around ranges whose
  // host bytes were handed out: those bytes must stay the guest's; once a zero or discard
  // overlaps the range, each byte is its old value, zero or the guest's current one, never
  // another range's (as it would be if freed space were reused).
  for (const extendedL2 of [false, true]) {
    const cs = 16384;
    const size = 2 << 20;
    const store = new PunchingStore(createImage({ size, clusterSize: cs, extendedL2 }));
    const image = await Qcow2Image.open(store, { writable: true });
    const model = new Uint8Array(size);
    const next = rng(extendedL2 ? 3 : 4);
    type Handed = { offset: number; length: number; host: number; old?: Uint8Array };
    const handed: Handed[] = [];
    let answers = 0;
    let stale = 0;
    for (let i = 0; i < 300; i++) {
      const offset = Math.floor(next() * (size - 70000));
      const length = 1 + Math.floor(next() * 70000);
      const kind = next();
      if (kind < 0.5) {
        const bytes = new Uint8Array(length).map(() => Math.floor(next() * 256));
        await image.write(store, bytes, offset);
        model.set(bytes, offset);
      } else {
        for (const h of handed) {
          if (!h.old && h.offset < offset + length && offset < h.offset + h.length) {
            h.old = model.slice(h.offset, h.offset + h.length);
            stale++;
          }
        }
        if (kind < 0.75) {
          await image.zero(store, offset, length, next() < 0.7);
          model.fill(0, offset, offset + length);
        } else {
          await image.discard(store, offset, length);
          const g = extendedL2 ? cs / 32 : cs;
          const from = Math.ceil(offset / g) * g;
          const to = Math.floor((offset + length) / g) * g;
          if (from < to) model.fill(0, from, to);
        }
      }
      if (i % 7 === 6) await image.flush(store);
      for (let tries = 0; tries < 4; tries++) {
        const at = Math.floor(next() * (size - 2 * cs));
        const n = 512 + Math.floor(next() * 2 * cs - 512);
        const host = image.hostRange(at, n);
        if (host === undefined) continue;
        handed.push({ offset: at, length: n, host });
        answers++;
      }
      const bytes = store.contents();
      for (const h of handed) {
        const got = bytes.subarray(h.host, h.host + h.length);
        const want = model.subarray(h.offset, h.offset + h.length);
        const what = `step ${i}: guest ${h.offset}+${h.length} at host ${h.host}`;
        if (!h.old) {
          assertBytes(got, want, what);
          continue;
        }
        for (let j = 0; j < got.length; j++) {
          if (got[j] !== 0 && got[j] !== h.old[j] && got[j] !== want[j]) {
            throw new Error(`${what}, changed at byte ${j}: ${got[j]}, not old, zero or current`);
          }
        }
      }
    }
    assertOk(store.trims > 0, "no cluster was freed");
    assertOk(answers > 50, `only ${answers} host ranges were handed out`);
    assertOk(stale > 10, `only ${stale} handed-out ranges were zeroed or discarded`);
  }
});
