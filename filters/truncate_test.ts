import { assertEquals, assertRejects } from "../tests/assert.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { fillPattern, patternPlugin } from "../plugins/pattern.ts";
import { UsageError } from "../util/usage_error.ts";
import { createFilter, filled, openPlugin, read, stack } from "./_test_utils.ts";
import { truncateFilter } from "./truncate.ts";

function pattern(offset: number, length: number): Uint8Array {
  const buf = new Uint8Array(length);
  fillPattern(buf, offset);
  return buf;
}

Deno.test("truncate filter extends with zeroes and only accepts zero writes past the end", async () => {
  const { backend: pat } = await openPlugin(patternPlugin, ["1000"]);
  const { backend } = await stack(truncateFilter, ["round-up=512"], pat);
  assertEquals(backend.size(), 1024);
  const data = await read(backend, 992, 32);
  assertEquals(data.subarray(0, 8), pattern(992, 8));
  assertEquals(data.subarray(8), new Uint8Array(24));
  const extents = await backend.extents(0, 1024, { reqOne: false });
  assertEquals(extents, [{ length: 1000, flags: 0 }, {
    length: 24,
    flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
  }]);
  const { backend: mem } = await openPlugin(memoryPlugin, ["1000"]);
  const { backend: grown } = await stack(truncateFilter, ["truncate=2000"], mem);
  await grown.pwrite(new Uint8Array(100), 1500, { fua: false });
  await assertRejects(() => grown.pwrite(filled(100, 1), 950, { fua: false }), NbdError);
  await grown.pwrite(new Uint8Array([...filled(50, 3), ...filled(50, 0)]), 950, { fua: false });
  assertEquals(await read(mem, 950, 50), filled(50, 3));
});

Deno.test("truncate filter cuts and rounds down", async () => {
  const { backend: pat } = await openPlugin(patternPlugin, ["1M"]);
  assertEquals((await stack(truncateFilter, ["truncate=1000"], pat)).backend.size(), 1000);
  assertEquals((await stack(truncateFilter, ["round-down=300"], pat)).backend.size(), 1048500);
  await assertRejects(() => createFilter(truncateFilter, ["round-up=0"]), UsageError);
});
