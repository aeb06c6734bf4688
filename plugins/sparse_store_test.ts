import { assertBytes, assertEquals } from "../tests/assert.ts";
import { PAGE_SIZE, SparseStore } from "./sparse_store.ts";

function readAll(store: SparseStore, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  store.read(out, offset);
  return out;
}

Deno.test("SparseStore reads back what was written across page boundaries", () => {
  const store = new SparseStore(4 * PAGE_SIZE);
  const data = Uint8Array.from({ length: PAGE_SIZE + 100 }, (_, i) => (i * 7 + 1) & 0xff);
  store.write(data, PAGE_SIZE - 50);
  assertBytes(readAll(store, PAGE_SIZE - 50, data.length), data);
  assertEquals(readAll(store, 0, 10), new Uint8Array(10));
  assertEquals(store.allocatedBytes, 3 * PAGE_SIZE);
});

Deno.test("SparseStore segments are views of stored pages and zero runs", () => {
  const store = new SparseStore(8 * PAGE_SIZE);
  store.write(new Uint8Array([9, 9]), 2 * PAGE_SIZE + 1);
  const segments = store.segments(PAGE_SIZE, 3 * PAGE_SIZE);
  assertEquals(segments.length, 3);
  assertEquals(segments[0], PAGE_SIZE);
  assertEquals((segments[1] as Uint8Array).length, PAGE_SIZE);
  assertEquals((segments[1] as Uint8Array)[1], 9);
  assertEquals(segments[2], PAGE_SIZE);
});

Deno.test("SparseStore zero frees whole pages and reports holes", () => {
  const store = new SparseStore(1024 * PAGE_SIZE);
  store.write(new Uint8Array(3 * PAGE_SIZE).fill(1), 0);
  store.zero(10, 2 * PAGE_SIZE);
  assertEquals(store.allocatedBytes, 2 * PAGE_SIZE);
  assertEquals(readAll(store, 0, 12), Uint8Array.from([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]));
  assertEquals(store.extents(0, 4 * PAGE_SIZE), [
    { length: PAGE_SIZE, flags: 0 },
    { length: PAGE_SIZE, flags: 3 },
    { length: PAGE_SIZE, flags: 0 },
    { length: PAGE_SIZE, flags: 3 },
  ]);
  // A partly zeroed page that ends up all zero is freed too.
  store.zero(0, 10);
  assertEquals(store.allocatedBytes, PAGE_SIZE);
});

Deno.test("SparseStore handles a 1 TiB virtual size: whole-disk zero and extents are quick", () => {
  const tib = 2 ** 40;
  const store = new SparseStore(tib);
  store.write(new Uint8Array([1]), tib - 1);
  store.write(new Uint8Array([2]), 0);
  const started = performance.now();
  const extents = store.extents(0, tib);
  assertEquals(extents.length, 3);
  assertEquals(extents[1], { length: tib - 2 * PAGE_SIZE, flags: 3 });
  store.zero(0, tib);
  assertEquals(store.allocatedBytes, 0);
  assertEquals(performance.now() - started < 5000, true);
});

Deno.test("SparseStore writing zeroes into a hole allocates nothing", () => {
  const store = new SparseStore(4 * PAGE_SIZE);
  store.write(new Uint8Array(2 * PAGE_SIZE), 0);
  assertEquals(store.allocatedBytes, 0);
});

Deno.test("SparseStore writeViews are the stored pages themselves, or undefined over a hole", () => {
  const store = new SparseStore(4 * PAGE_SIZE);
  // Two writes: two pages allocated apart.
  store.write(new Uint8Array(PAGE_SIZE).fill(1), 0);
  store.write(new Uint8Array(PAGE_SIZE).fill(1), PAGE_SIZE);
  assertEquals(store.writeViews(PAGE_SIZE - 10, PAGE_SIZE + 20), undefined, "page 2 is a hole");
  const views = store.writeViews(PAGE_SIZE - 10, 20)!;
  assertEquals(views.map((v) => v.length), [10, 10]);
  views[0]!.fill(7);
  views[1]!.fill(8);
  const expected = new Uint8Array(2 * PAGE_SIZE).fill(1);
  expected.fill(7, PAGE_SIZE - 10, PAGE_SIZE);
  expected.fill(8, PAGE_SIZE, PAGE_SIZE + 10);
  assertBytes(readAll(store, 0, 2 * PAGE_SIZE), expected);
  assertEquals(store.allocatedBytes, 2 * PAGE_SIZE);
});

Deno.test("SparseStore pages allocated by one write are one run: one view, zero pages still holes", () => {
  const store = new SparseStore(8 * PAGE_SIZE);
  const data = new Uint8Array(5 * PAGE_SIZE).fill(3);
  data.fill(0, 2 * PAGE_SIZE, 3 * PAGE_SIZE);
  store.write(data, PAGE_SIZE);
  assertEquals(store.allocatedBytes, 4 * PAGE_SIZE, "the all-zero page stays a hole");
  assertEquals(store.writeViews(PAGE_SIZE, 5 * PAGE_SIZE), undefined);
  assertEquals(store.writeViews(PAGE_SIZE + 5, 2 * PAGE_SIZE - 5)!.map((v) => v.length), [
    2 * PAGE_SIZE - 5,
  ]);
  assertEquals(store.writeViews(4 * PAGE_SIZE, 2 * PAGE_SIZE)!.length, 1);
  assertBytes(readAll(store, PAGE_SIZE, 5 * PAGE_SIZE), data);
  // Freeing one page of a run leaves the others readable and writable.
  store.zero(4 * PAGE_SIZE, PAGE_SIZE);
  assertEquals(store.allocatedBytes, 3 * PAGE_SIZE);
  const views = store.writeViews(5 * PAGE_SIZE, PAGE_SIZE)!;
  views[0]!.fill(9);
  assertBytes(readAll(store, 5 * PAGE_SIZE, PAGE_SIZE), new Uint8Array(PAGE_SIZE).fill(9));
  assertBytes(readAll(store, 4 * PAGE_SIZE, PAGE_SIZE), new Uint8Array(PAGE_SIZE));
});
