import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { UsageError } from "../util/usage_error.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { nullPlugin } from "../plugins/null.ts";
import { type Backend, PassthroughBackend, type WriteFlags } from "../core/backend.ts";
import { randomBytes } from "../tests/helpers.ts";
import {
  concurrentWrites,
  createFilter,
  CTX,
  filled,
  openPlugin,
  read,
  stack,
} from "./_test_utils.ts";
import { cacheFilter } from "./cache.ts";

/** Counts what reaches the layer below. */
class Counting extends PassthroughBackend {
  reads = 0;
  writes = 0;
  flushes = 0;
  override pread(buf: Uint8Array, offset: number): Promise<void> {
    this.reads++;
    return this.next.pread(buf, offset);
  }
  override pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    this.writes++;
    return this.next.pwrite(buf, offset, flags);
  }
  override flush(): Promise<void> {
    this.flushes++;
    return this.next.flush();
  }
}

Deno.test("cache filter in writeback mode holds writes until flush", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const below = new Counting(mem);
  const { backend } = await stack(cacheFilter, [], below);
  await backend.pwrite(filled(100, 7), 65500, { fua: false }); // two partial blocks: read below
  assertEquals(below.writes, 0);
  assertEquals(await read(backend, 65500, 100), filled(100, 7));
  assertEquals(await read(mem, 65500, 100), new Uint8Array(100));
  await backend.flush();
  assertEquals(below.writes, 2);
  assertEquals(below.flushes, 1);
  assertEquals(await read(mem, 65500, 100), filled(100, 7));
});

Deno.test("cache filter in writethrough mode writes at once; cache-on-read serves repeats", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const below = new Counting(mem);
  const { backend } = await stack(cacheFilter, ["cache=writethrough", "cache-on-read=true"], below);
  await backend.pwrite(filled(10, 3), 0, { fua: false });
  assertEquals(await read(mem, 0, 10), filled(10, 3));
  await read(backend, 0, 4096);
  const reads = below.reads;
  assertEquals(await read(backend, 0, 10), filled(10, 3));
  assertEquals(below.reads, reads); // served from the cache
  await backend.pwrite(filled(10, 4), 5, { fua: false });
  assertEquals(await read(backend, 0, 15), new Uint8Array([...filled(5, 3), ...filled(10, 4)]));
});

Deno.test("cache filter in unsafe mode ignores flush; eviction writes dirty blocks back", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["4M"]);
  const { backend } = await stack(cacheFilter, [
    "cache=unsafe",
    "cache-max-size=256K",
    "cache-min-block-size=64K",
  ], mem);
  const data = randomBytes(1 << 20, 11);
  await backend.pwrite(data, 0, { fua: false });
  await backend.flush();
  // At most 256K stays in the cache; the rest had to be written back.
  const inBelow = await read(mem, 0, 1 << 20);
  const same = inBelow.filter((b, i) => b === data[i]).length;
  assertOk(same >= (1 << 20) - 256 * 1024, `${same}`);
  assertBytes(await read(backend, 0, 1 << 20), data);
});

Deno.test("cache filter zeroes pass below and clear cached copies", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const { backend } = await stack(cacheFilter, [], mem);
  await backend.pwrite(filled(200000, 9), 0, { fua: false });
  await backend.zero(1000, 150000, { fua: false, fast: false, mayTrim: true });
  const expected = filled(200000, 9).fill(0, 1000, 151000);
  assertEquals(await read(backend, 0, 200000), expected);
  await backend.flush();
  assertEquals(await read(mem, 0, 200000), expected);
});

Deno.test("cache filter keeps concurrent writers on several connections coherent", async () => {
  for (const mode of ["writeback", "writethrough", "unsafe"]) {
    const { instance: plugin } = await openPlugin(memoryPlugin, ["512K"]);
    // A small cache forces evictions while the writers run.
    const instance = await createFilter(cacheFilter, [
      `cache=${mode}`,
      "cache-max-size=128K",
      "cache-min-block-size=4K",
      "cache-on-read=true",
    ]);
    const conns: Backend[] = [];
    for (let id = 1; id <= 4; id++) {
      conns.push(
        await instance.wrap(
          await plugin.open({ ...CTX, connectionId: id }),
          CTX,
          () => Promise.reject(),
        ),
      );
    }
    const expected = await concurrentWrites(conns, 512 * 1024, { seed: 77 });
    for (const conn of conns) assertBytes(await read(conn, 0, 512 * 1024), expected, mode);
    if (mode !== "unsafe") {
      await conns[1]!.flush();
      const raw = await plugin.open(CTX);
      assertBytes(await read(raw, 0, 512 * 1024), expected, `${mode} after flush`);
    }
  }
});

Deno.test("cache filter rejects bad modes and thresholds", async () => {
  await assertRejects(() => createFilter(cacheFilter, ["cache=sometimes"]), UsageError);
  await assertRejects(
    () => createFilter(cacheFilter, ["cache-high-threshold=50", "cache-low-threshold=60"]),
    UsageError,
  );
});

Deno.test("cache filter: zeroing a huge disk only visits the cached blocks", async () => {
  const { backend: nothing } = await openPlugin(nullPlugin, ["1P"]);
  const { backend } = await stack(cacheFilter, [], nothing);
  await backend.pwrite(filled(100, 5), 2 ** 40, { fua: false });
  await backend.zero(0, 2 ** 50, { fua: false, fast: false, mayTrim: true });
  await backend.trim(0, 2 ** 50, { fua: false });
  assertEquals(await read(backend, 2 ** 40, 100), new Uint8Array(100));
});
