import { assertEquals } from "../tests/assert.ts";
import {
  type Backend,
  completeBackend,
  type Extent,
  type ExtentsFlags,
  PassthroughBackend,
} from "../core/backend.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { CTX, openPlugin, stack } from "./_test_utils.ts";
import { cacheextentsFilter } from "./cacheextents.ts";

const KiB = 1024;
const HOLE_ZERO = 3;

/** Counts the block-status requests that reach the backend below. */
class CountingBackend extends PassthroughBackend {
  readonly asked: Array<{ offset: number; length: number; reqOne: boolean }> = [];
  override extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    this.asked.push({ offset, length, reqOne: flags.reqOne });
    return super.extents(offset, length, flags);
  }
}

/** A 1 MiB memory disk with data at [64K, 128K) and [512K, 576K) (its blocks are 64 KiB), counted below the filter. */
async function cachedMemory(): Promise<{ backend: Backend; below: CountingBackend }> {
  const { backend: memory } = await openPlugin(memoryPlugin, ["size=1M"]);
  await memory.pwrite(new Uint8Array(64 * KiB).fill(1), 64 * KiB, { fua: false });
  await memory.pwrite(new Uint8Array(64 * KiB).fill(2), 512 * KiB, { fua: false });
  const below = new CountingBackend(memory);
  const { backend } = await stack(cacheextentsFilter, [], below);
  return { backend, below };
}

const ALL = { reqOne: false };
const ONE = { reqOne: true };

Deno.test("cacheextents: a second block-status query does not reach the plugin", async () => {
  const { backend, below } = await cachedMemory();
  const first = await backend.extents(0, 1024 * KiB, ALL);
  assertEquals(below.asked.length, 1);
  assertEquals(first.reduce((n, e) => n + e.length, 0), 1024 * KiB);
  assertEquals(first[0], { length: 64 * KiB, flags: HOLE_ZERO });
  assertEquals(first[1], { length: 64 * KiB, flags: 0 });
  // The same question, and questions inside the answer, come from the cache.
  assertEquals(await backend.extents(0, 1024 * KiB, ALL), first);
  assertEquals(await backend.extents(96 * KiB, 8 * KiB, ALL), [{ length: 8 * KiB, flags: 0 }]);
  assertEquals(await backend.extents(100 * KiB, 900 * KiB, ONE), [{ length: 28 * KiB, flags: 0 }]);
  assertEquals(await backend.extents(200 * KiB, 400 * KiB, ALL), [
    { length: 312 * KiB, flags: HOLE_ZERO },
    { length: 64 * KiB, flags: 0 },
    { length: 24 * KiB, flags: HOLE_ZERO },
  ]);
  assertEquals(below.asked.length, 1);
});

Deno.test("cacheextents: a one-extent request asks below for all, so the next is cached", async () => {
  const { backend, below } = await cachedMemory();
  assertEquals(await backend.extents(0, 1024 * KiB, ONE), [{ length: 64 * KiB, flags: HOLE_ZERO }]);
  assertEquals(below.asked, [{ offset: 0, length: 1024 * KiB, reqOne: false }]);
  assertEquals(await backend.extents(64 * KiB, 960 * KiB, ONE), [{ length: 64 * KiB, flags: 0 }]);
  assertEquals(below.asked.length, 1);
});

Deno.test("cacheextents: writes, zeroes and trims forget the answer", async () => {
  const { backend, below } = await cachedMemory();
  await backend.extents(0, 1024 * KiB, ALL);
  await backend.pwrite(new Uint8Array(4096).fill(3), 0, { fua: false });
  assertEquals(await backend.extents(0, 8 * KiB, ONE), [{ length: 8 * KiB, flags: 0 }]);
  assertEquals(below.asked.length, 2);
  await backend.trim(0, 4096, { fua: false });
  assertEquals((await backend.extents(0, 8 * KiB, ONE))[0]!.flags, HOLE_ZERO);
  assertEquals(below.asked.length, 3);
  await backend.extents(0, 8 * KiB, ONE);
  assertEquals(below.asked.length, 3);
  await backend.zero(64 * KiB, 64 * KiB, { fua: false, mayTrim: true, fast: false });
  assertEquals(await backend.extents(0, 1024 * KiB, ONE), [
    { length: 512 * KiB, flags: HOLE_ZERO },
  ]);
  assertEquals(below.asked.length, 4);
});

Deno.test("cacheextents: connections to one export share the answer; a write on one forgets it", async () => {
  let asked = 0;
  const plugin = () =>
    completeBackend({
      size: () => 1 << 20,
      pread: (buf) => Promise.resolve(void buf.fill(0)),
      pwrite: () => Promise.resolve(),
      extents: (_offset, length) => {
        asked++;
        return Promise.resolve([{ length, flags: 0 }]);
      },
    });
  const { backend: a, instance } = await stack(cacheextentsFilter, [], plugin());
  const b = await instance.wrap(plugin(), { ...CTX, connectionId: 2 }, () => Promise.reject());
  const other = await instance.wrap(
    plugin(),
    { ...CTX, connectionId: 3, exportName: "other" },
    () => Promise.reject(),
  );
  await a.extents(0, 1 << 20, ALL);
  await b.extents(4096, 4096, ALL);
  assertEquals(asked, 1);
  await other.extents(4096, 4096, ALL);
  assertEquals(asked, 2);
  await b.pwrite(new Uint8Array(1), 0, { fua: false });
  await a.extents(4096, 4096, ALL);
  assertEquals(asked, 3);
});
