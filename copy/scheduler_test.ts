import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { MemoryDestination, MemorySource, patterned } from "./_test_utils.ts";
import type { CopyExtent } from "./endpoint.ts";
import { NullDestination } from "./null.ts";
import { StreamDestination, StreamSource } from "./pipe.ts";
import { CopyError, copyImage, CopyInterrupted, type CopyOptions, planSizes } from "./scheduler.ts";

const MiB = 1 << 20;

function options(extra: Partial<CopyOptions> = {}): CopyOptions {
  return {
    requests: 16,
    requestSize: 64 * 1024,
    sparseSize: 4096,
    allocated: false,
    destinationIsZero: false,
    extents: true,
    ...extra,
  };
}

/** Bytes of `runs` that fall in [offset, offset + length). */
function overlap(runs: CopyExtent[], offset: number, length: number): number {
  let n = 0;
  for (const r of runs) {
    n += Math.max(0, Math.min(r.offset + r.length, offset + length) - Math.max(r.offset, offset));
  }
  return n;
}

Deno.test("copyImage() copies every byte with requests completing out of order", async () => {
  const data = patterned(3 * MiB + 12345);
  const source = new MemorySource(data, undefined, { jitterMs: 2 });
  const destination = new MemoryDestination(data.length, { fill: 0xff, jitterMs: 2 });
  const stats = await copyImage(source, destination, options());
  assertBytes(destination.data, data);
  assertEquals(stats.read, data.length);
  assertEquals(stats.written, data.length);
  assertOk(source.maxInFlight > 1 && source.maxInFlight <= 16, `in flight ${source.maxInFlight}`);
  for (const r of source.reads) assertOk(r.length <= 64 * 1024);
});

Deno.test("copyImage() never reads holes and skips them on a zero destination", async () => {
  const holes = [
    { offset: 0, length: 256 * 1024, zero: true },
    { offset: MiB, length: 2 * MiB + 4096, zero: true },
    { offset: 4 * MiB - 8192, length: 8192, zero: true },
  ];
  const data = patterned(4 * MiB, holes);
  const source = new MemorySource(data, holes, { jitterMs: 1 });
  const destination = new MemoryDestination(data.length, { isZero: true });
  const stats = await copyImage(source, destination, options());
  assertBytes(destination.data, data);
  for (const r of source.reads) assertEquals(overlap(holes, r.offset, r.length), 0);
  assertEquals(destination.zeroes.length, 0);
  assertEquals(stats.skipped, 256 * 1024 + 2 * MiB + 4096 + 8192);
  assertEquals(stats.read, 4 * MiB - stats.skipped);
  // Windows of block status are fetched one after another, contiguously.
  assertOk(source.queries.length >= 4, `${source.queries.length} queries`);
  let expected = 0;
  for (const q of source.queries) {
    assertEquals(q.offset, expected);
    expected += Math.min(q.length, MiB);
  }
});

Deno.test("copyImage() zeroes holes on a destination that is not known to be zero", async () => {
  const holes = [{ offset: 128 * 1024, length: 512 * 1024, zero: true }];
  const data = patterned(MiB, holes);
  const source = new MemorySource(data, holes);
  const destination = new MemoryDestination(data.length, { fill: 0xee });
  const stats = await copyImage(source, destination, options());
  assertBytes(destination.data, data);
  assertEquals(destination.zeroes, [{ offset: 128 * 1024, length: 512 * 1024, allocate: false }]);
  assertEquals(stats.zeroed, 512 * 1024);
});

Deno.test("copyImage() --allocated writes allocated zeroes even on a zero destination", async () => {
  const holes = [{ offset: 0, length: 64 * 1024, zero: true }];
  const data = patterned(256 * 1024, holes);
  const destination = new MemoryDestination(data.length, { isZero: true });
  await copyImage(new MemorySource(data, holes), destination, options({ allocated: true }));
  assertEquals(destination.zeroes, [{ offset: 0, length: 64 * 1024, allocate: true }]);
  assertBytes(destination.data, data);
});

Deno.test("copyImage() --destination-is-zero trusts the caller and skips zero runs", async () => {
  const holes = [{ offset: 64 * 1024, length: 64 * 1024, zero: true }];
  const data = patterned(256 * 1024, holes);
  const destination = new MemoryDestination(data.length, { fill: 0xee });
  await copyImage(new MemorySource(data, holes), destination, options({ destinationIsZero: true }));
  assertEquals(destination.zeroes.length, 0);
  // The skipped range still holds what was there: the option is a promise from the caller.
  assertEquals(destination.data[64 * 1024], 0xee);
  assertBytes(destination.data.subarray(0, 64 * 1024), data.subarray(0, 64 * 1024));
});

Deno.test("copyImage() turns all-zero blocks of data that was read into zero requests", async () => {
  const zeroes = [
    { offset: 8192, length: 8192, zero: true },
    { offset: 100 * 1024, length: 3000, zero: true }, // not a whole block: stays data
  ];
  const data = patterned(256 * 1024, zeroes);
  const destination = new MemoryDestination(data.length, { fill: 0xee });
  const stats = await copyImage(new MemorySource(data), destination, options());
  assertBytes(destination.data, data);
  assertEquals(destination.zeroes, [{ offset: 8192, length: 8192, allocate: false }]);
  assertEquals(stats.written, 256 * 1024 - 8192);

  const plain = new MemoryDestination(data.length, { fill: 0xee });
  await copyImage(new MemorySource(data), plain, options({ sparseSize: 0 }));
  assertEquals(plain.zeroes.length, 0);
  assertBytes(plain.data, data);
});

Deno.test("copyImage() keeps every request aligned to the larger minimum block size", async () => {
  const holes = [{ offset: 1000, length: 20000, zero: true }];
  const data = patterned(200 * 1024 + 100, holes);
  const source = new MemorySource(data, holes);
  const destination = new MemoryDestination(data.length, {
    fill: 0xee,
    blockSize: { minimum: 4096, preferred: 4096, maximum: 64 * 1024 },
  });
  await copyImage(source, destination, options({ requestSize: 1 << 20 }));
  assertBytes(destination.data, data);
  // The hole shrinks to the whole blocks inside it; its edges are copied as data.
  assertEquals(destination.zeroes, [{ offset: 4096, length: 16384, allocate: false }]);
  for (const w of [...destination.writes, ...destination.zeroes]) {
    assertEquals(w.offset % 4096, 0, `offset ${w.offset}`);
    const atEnd = w.offset + w.length === data.length;
    assertOk(atEnd || w.length % 4096 === 0, `length ${w.length} at ${w.offset}`);
    assertOk(w.length <= 64 * 1024, `length ${w.length} above the maximum`);
  }
});

Deno.test("planSizes() respects maxima, raises to the preferred size and aligns", () => {
  const source = new MemorySource(new Uint8Array(1), undefined, {
    blockSize: { minimum: 512, preferred: 65536, maximum: 1 << 20 },
  });
  const destination = new MemoryDestination(1, {
    blockSize: { minimum: 4096, preferred: 4096, maximum: 512 * 1024 },
  });
  assertEquals(planSizes(source, destination, 4096, 512), {
    requestSize: 65536,
    align: 4096,
    sparseSize: 4096,
  });
  assertEquals(planSizes(source, destination, 32 << 20, 0).requestSize, 512 * 1024);
});

/** A reader that hands out data in small, uneven pieces, like a pipe. */
function chunkedReader(data: Uint8Array) {
  let position = 0;
  return {
    read(buf: Uint8Array): Promise<number | null> {
      if (position >= data.length) return Promise.resolve(null);
      const n = Math.min(buf.length, 1 + ((position * 31) % 70000), data.length - position);
      buf.set(data.subarray(position, position + n));
      position += n;
      return Promise.resolve(n);
    },
  };
}

Deno.test("copyImage() copies a stream source of unknown size and sizes the destination", async () => {
  for (const size of [0, 1, 64 * 1024, 5 * 64 * 1024, 777777]) {
    const data = patterned(size, [{ offset: 0, length: Math.min(size, 70000), zero: true }]);
    const destination = new MemoryDestination(undefined, { isZero: true, jitterMs: 1 });
    const stats = await copyImage(
      new StreamSource("stdin", chunkedReader(data)),
      destination,
      options(),
    );
    assertEquals(stats.size, size);
    assertEquals(destination.finished, size);
    const copied = new Uint8Array(size);
    copied.set(destination.data.subarray(0, size));
    assertBytes(copied, data, `size ${size}`);
  }
});

Deno.test("copyImage() copies a stream of announced size; one that ends early fails", async () => {
  const data = patterned(777777, [{ offset: 100000, length: 200000, zero: true }]);
  const destination = new MemoryDestination(data.length, { isZero: true, jitterMs: 1 });
  const sized = new StreamSource("http://h/disk", chunkedReader(data), { size: data.length });
  const stats = await copyImage(sized, destination, options());
  assertEquals(stats.size, data.length);
  assertBytes(destination.data.subarray(0, data.length), data);
  const short = new StreamSource("http://h/disk", chunkedReader(data.subarray(0, 500000)), {
    size: data.length,
  });
  await assertRejects(
    () => copyImage(short, new MemoryDestination(data.length), options()),
    CopyError,
    "the stream ended after 500000 of the 777777 bytes announced",
  );
});

Deno.test("copyImage() refuses a stream source longer than a sized destination", async () => {
  const data = patterned(100000);
  const destination = new MemoryDestination(65536);
  await assertRejects(
    () => copyImage(new StreamSource("stdin", chunkedReader(data)), destination, options()),
    CopyError,
    "destination memory-destination: write at offset 65536 failed: " +
      "the source is larger than the destination (65536 bytes)",
  );
});

Deno.test("copyImage() writes a sequential destination in order, holes as zero bytes", async () => {
  const holes = [{ offset: 200 * 1024, length: 300 * 1024, zero: true }];
  const data = patterned(MiB + 99, holes);
  const chunks: Uint8Array[] = [];
  const destination = new StreamDestination("stdout", {
    write(buf) {
      chunks.push(buf.slice());
      return new Promise((resolve) => setTimeout(() => resolve(buf.length), Math.random() * 2));
    },
  });
  await copyImage(new MemorySource(data, holes, { jitterMs: 2 }), destination, options());
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  assertBytes(out, data);
});

Deno.test("copyImage() stops at a read error and names the source and the offset", async () => {
  const data = patterned(4 * MiB);
  const source = new MemorySource(data, undefined, { failAt: MiB + 5, jitterMs: 1 });
  const destination = new MemoryDestination(data.length);
  const error = await assertRejects(
    () => copyImage(source, destination, options()),
    CopyError,
    `source memory-source: read at offset ${MiB} failed: injected read error`,
  ) as CopyError;
  assertEquals([error.role, error.operation, error.offset], ["source", "read", MiB]);
  assertOk(destination.aborted);
  // Lanes stop taking work: at most the requests already in flight follow the failure.
  assertOk(source.reads.length < 16 + MiB / (64 * 1024) + 16, `${source.reads.length} reads`);
});

Deno.test("copyImage() stops at a write error with the errno of the cause", async () => {
  const data = patterned(MiB);
  const failure = Object.assign(new Error("no space left on device"), { code: "ENOSPC" });
  const destination = new MemoryDestination(data.length, { failAt: 300000, error: failure });
  const error = await assertRejects(
    () => copyImage(new MemorySource(data), destination, options()),
    CopyError,
    "destination memory-destination: write at offset 262144 failed: ENOSPC (no space left on device)",
  ) as CopyError;
  assertEquals(error.role, "destination");
});

Deno.test("copyImage() stops when its signal is aborted", async () => {
  const data = patterned(8 * MiB);
  const controller = new AbortController();
  const source = new MemorySource(data, undefined, { jitterMs: 5 });
  const destination = new MemoryDestination(data.length);
  setTimeout(() => controller.abort(new CopyInterrupted("SIGINT")), 20);
  await assertRejects(
    () => copyImage(source, destination, options({ signal: controller.signal, requests: 2 })),
    CopyInterrupted,
    "interrupted by SIGINT",
  );
  assertOk(source.reads.length < data.length / (64 * 1024), `${source.reads.length} reads`);
});

Deno.test("copyImage() reports progress up to the size of the image", async () => {
  const holes = [{ offset: 0, length: MiB, zero: true }];
  const data = patterned(2 * MiB, holes);
  const seen: number[] = [];
  await copyImage(
    new MemorySource(data, holes),
    new MemoryDestination(data.length, { isZero: true }),
    options({ onProgress: (done) => seen.push(done) }),
  );
  for (let i = 1; i < seen.length; i++) assertOk(seen[i]! > seen[i - 1]!);
  assertEquals(seen[seen.length - 1], 2 * MiB);
});

Deno.test("copyImage() to null: hands on zero data without scanning it, and skips holes", async () => {
  const { NullDestination } = await import("./null.ts");
  const holes = [{ offset: MiB, length: MiB, zero: true }];
  // Zeroes in the data itself (not reported as holes) would be found by a scan.
  const data = patterned(4 * MiB, holes);
  data.fill(0, 2 * MiB, 3 * MiB);
  const source = new MemorySource(data, holes);
  const stats = await copyImage(source, new NullDestination(), options());
  assertEquals(stats.skipped, MiB);
  assertEquals(stats.read, 3 * MiB);
  assertEquals(stats.written, 3 * MiB);
});

Deno.test("copyImage() runs one lane between endpoints that complete synchronously", async () => {
  class SyncSource extends MemorySource {
    override readonly synchronous = true;
  }
  class SyncDestination extends MemoryDestination {
    override readonly synchronous = true;
  }
  const data = patterned(2 * MiB + 777);
  const both = new SyncSource(data);
  const into = new SyncDestination(data.length);
  const one = await copyImage(both, into, options());
  assertBytes(into.data, data);
  assertEquals(one.lanes, 1);
  assertEquals(both.maxInFlight, 1);
  // One side that completes asynchronously is enough for every lane to be used.
  const source = new SyncSource(data);
  const destination = new MemoryDestination(data.length, { jitterMs: 1 });
  const many = await copyImage(source, destination, options());
  assertBytes(destination.data, data);
  assertEquals(many.lanes, 16);
});

Deno.test("copyImage() reuses a buffer as soon as the destination has sent its data", async () => {
  class SyncSource extends MemorySource {
    override readonly synchronous = true;
    /** The distinct buffers read into. */
    readonly buffers = new Set<ArrayBufferLike>();
    override read(buf: Uint8Array, offset: number): Promise<number> {
      this.buffers.add(buf.buffer);
      return super.read(buf, offset);
    }
  }
  /** Takes the data at once (as a socket would), says so, and answers later. */
  class SendingDestination extends MemoryDestination {
    override async write(
      buf: Uint8Array,
      offset: number,
      _headroom?: boolean,
      sent?: () => void,
    ): Promise<void> {
      this.data.set(buf, offset);
      sent?.();
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
  }
  const data = patterned(4 * MiB + 100, [{ offset: MiB, length: 64 * 1024, zero: true }]);
  const source = new SyncSource(data);
  const destination = new SendingDestination(data.length, { fill: 0xff });
  const stats = await copyImage(source, destination, options());
  assertBytes(destination.data, data);
  assertEquals(stats.lanes, 16);
  // 16 writes in flight at a time, but each buffer was free again once its data was sent.
  assertOk(source.buffers.size <= 2, `${source.buffers.size} buffers`);
});

Deno.test("copyImage() reads into one buffer for a destination that keeps nothing", async () => {
  class RecordingSource extends MemorySource {
    /** The distinct buffers read into. */
    readonly buffers = new Set<ArrayBufferLike>();
    override read(buf: Uint8Array, offset: number): Promise<number> {
      this.buffers.add(buf.buffer);
      return super.read(buf, offset);
    }
  }
  const data = patterned(4 * MiB + 100);
  const source = new RecordingSource(data, undefined, { jitterMs: 1 });
  const stats = await copyImage(source, new NullDestination(), options());
  assertEquals(stats.read, data.length);
  assertEquals(stats.lanes, 16);
  assertOk(source.maxInFlight > 1, `${source.maxInFlight} reads in flight`);
  assertEquals(source.buffers.size, 1);
});

Deno.test("copyImage() keeps no more reads in flight than the source's maxReads", async () => {
  class FewReadsSource extends MemorySource {
    readonly maxReads = 3;
  }
  const data = patterned(2 * MiB + 99);
  const source = new FewReadsSource(data, undefined, { jitterMs: 2 });
  const destination = new MemoryDestination(data.length, { jitterMs: 1 });
  const stats = await copyImage(source, destination, options());
  assertBytes(destination.data, data);
  assertEquals(stats.lanes, 3);
  assertEquals(source.maxInFlight, 3);
});

Deno.test("copyImage() keeps a source's bytes in flight within its maxBytesInFlight", async () => {
  class BudgetSource extends MemorySource {
    override readonly maxBytesInFlight = 256 * 1024 + 1;
  }
  const data = patterned(2 * MiB + 99);
  const source = new BudgetSource(data, undefined, { jitterMs: 2 });
  const destination = new MemoryDestination(data.length, { jitterMs: 1 });
  const stats = await copyImage(source, destination, options());
  assertBytes(destination.data, data);
  // 64 KiB requests: four fit in 256 KiB + 1 byte, five do not.
  assertEquals(stats.lanes, 4);
  assertEquals(source.maxInFlight, 4);
});

Deno.test("copyImage() keeps a destination's bytes in flight within its budget", async () => {
  class BudgetDestination extends MemoryDestination {
    override readonly maxBytesInFlight = 128 * 1024;
  }
  const data = patterned(MiB + 7);
  const source = new MemorySource(data, undefined, { jitterMs: 2 });
  const destination = new BudgetDestination(data.length, { jitterMs: 1 });
  const stats = await copyImage(source, destination, options());
  assertBytes(destination.data, data);
  assertEquals(stats.lanes, 2);
  assertOk(source.maxInFlight <= 2, `${source.maxInFlight} reads in flight`);
});

Deno.test("copyImage() keeps one lane when a request is larger than the budget", async () => {
  class TinyBudgetSource extends MemorySource {
    override readonly maxBytesInFlight = 1000;
  }
  const data = patterned(MiB);
  const source = new TinyBudgetSource(data, undefined, { jitterMs: 1 });
  const destination = new MemoryDestination(data.length);
  const stats = await copyImage(source, destination, options());
  assertBytes(destination.data, data);
  assertEquals(stats.lanes, 1);
  assertEquals(source.maxInFlight, 1);
});
