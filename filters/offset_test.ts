import { assertEquals, assertRejects } from "../tests/assert.ts";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { fillPattern, patternPlugin } from "../plugins/pattern.ts";
import { createFilter, filled, openPlugin, read, stack } from "./_test_utils.ts";
import { offsetFilter } from "./offset.ts";

function pattern(offset: number, length: number): Uint8Array {
  const buf = new Uint8Array(length);
  fillPattern(buf, offset);
  return buf;
}

Deno.test("offset filter shifts every request into the window", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const { backend } = await stack(offsetFilter, ["offset=64K", "range=128K"], mem);
  assertEquals(backend.size(), 128 * 1024);
  await backend.pwrite(filled(100, 7), 10, { fua: false });
  assertEquals(await read(mem, 65536 + 10, 100), filled(100, 7));
  assertEquals(await read(mem, 10, 100), new Uint8Array(100));
  // Zero-copy reads are forwarded with the shift applied.
  const view = backend.readView!(10, 100)!;
  assertEquals(view[0], filled(100, 7));
  await backend.zero(10, 50, { fua: false, fast: false, mayTrim: true });
  assertEquals(
    await read(mem, 65536 + 10, 100),
    new Uint8Array([...filled(50, 0), ...filled(50, 7)]),
  );
  const extents = await backend.extents(0, 128 * 1024, { reqOne: false });
  assertEquals(extents[0]!.flags, 0); // the page holding our bytes is data
});

Deno.test("offset filter defaults range to the rest and rejects windows past the end", async () => {
  const { backend: pat } = await openPlugin(patternPlugin, ["1M"]);
  const { backend } = await stack(offsetFilter, ["offset=1000"], pat);
  assertEquals(backend.size(), 1024 * 1024 - 1000);
  assertEquals(await read(backend, 0, 64), pattern(1000, 64));
  const instance = await createFilter(offsetFilter, ["offset=1M", "range=1"]);
  await assertRejects(() => instance.wrap(pat, {} as never, () => Promise.reject()), NbdError);
});
