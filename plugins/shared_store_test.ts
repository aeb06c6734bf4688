import { assertBytes, assertEquals } from "../tests/assert.ts";
import { randomBytes } from "../tests/helpers.ts";
import { SharedStore } from "./shared_store.ts";
import { PAGE_SIZE, SparseStore } from "./sparse_store.ts";
import type { ReadSegment } from "../core/backend.ts";

/** The bytes a list of read segments stands for. */
function flatten(segments: ReadSegment[], length: number): Uint8Array {
  const out = new Uint8Array(length);
  let at = 0;
  for (const segment of segments) {
    if (typeof segment === "number") at += segment;
    else {
      out.set(segment, at);
      at += segment.length;
    }
  }
  assertEquals(at, length);
  return out;
}

Deno.test("SharedStore reads, writes, zeroes and reports extents as SparseStore does", () => {
  const size = 40 * PAGE_SIZE + 1234;
  const shared = new SharedStore("test.oracle", size);
  const sparse = new SparseStore(size);
  let seed = 7;
  const next = (n: number) => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed % n;
  };
  for (let step = 0; step < 400; step++) {
    const offset = next(size);
    const length = 1 + next(Math.min(size - offset, 3 * PAGE_SIZE));
    if (step % 3 === 2) {
      shared.zero(offset, length);
      sparse.zero(offset, length);
    } else {
      const data = randomBytes(length, step);
      shared.write(data, offset);
      sparse.write(data, offset);
    }
    const at = next(size);
    const span = 1 + next(Math.min(size - at, 4 * PAGE_SIZE));
    const a = new Uint8Array(span);
    const b = new Uint8Array(span);
    shared.read(a, at);
    sparse.read(b, at);
    assertBytes(a, b, `read at step ${step}`);
    assertBytes(flatten(shared.segments(at, span), span), b, `segments at step ${step}`);
  }
  // Whole pages zeroed read back as holes, a page written to as data.
  shared.zero(0, size);
  assertEquals(shared.extents(0, size), [{ length: size, flags: 3 }]);
  shared.write(new Uint8Array([1]), 5 * PAGE_SIZE + 10);
  assertEquals(shared.extents(0, size), [
    { length: 5 * PAGE_SIZE, flags: 3 },
    { length: PAGE_SIZE, flags: 0 },
    { length: size - 6 * PAGE_SIZE, flags: 3 },
  ]);
});

Deno.test("SharedStore writeViews mark the pages as data and write through", () => {
  const store = new SharedStore("test.views", 4 * PAGE_SIZE);
  const views = store.writeViews(PAGE_SIZE - 2, 4);
  assertEquals(views.map((v) => v.length), [4]);
  views[0]!.set([1, 2, 3, 4]);
  const out = new Uint8Array(4);
  store.read(out, PAGE_SIZE - 2);
  assertBytes(out, Uint8Array.from([1, 2, 3, 4]));
  assertEquals(store.extents(0, 4 * PAGE_SIZE).map((e) => e.flags === 0), [true, false]);
  assertEquals(store.extents(0, 4 * PAGE_SIZE)[0]!.length, 2 * PAGE_SIZE);
});
