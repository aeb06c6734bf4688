import { assertEquals, assertMatch, assertNotMatch, assertOk } from "../tests/assert.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { openPlugin, read, stack, tempDirSync } from "./_test_utils.ts";
import { humanBytes, statsFilter } from "./stats.ts";

Deno.test("humanBytes uses binary units", () => {
  assertEquals(humanBytes(512), "512 bytes");
  assertEquals(humanBytes(3 * 1024 * 1024 + 512 * 1024), "3.50 MiB");
});

Deno.test("stats filter counts requests of all connections and writes them at close", async () => {
  const dir = tempDirSync();
  try {
    const statsfile = `${dir}/stats`;
    const { instance: plugin } = await openPlugin(memoryPlugin, ["1M"]);
    const { backend: a, instance } = await stack(
      statsFilter,
      [`statsfile=${statsfile}`],
      await plugin.open({ exportName: "", readonly: false, tls: false, connectionId: 1 }),
    );
    const b = await instance.wrap(
      await plugin.open({ exportName: "", readonly: false, tls: false, connectionId: 2 }),
      { exportName: "", readonly: false, tls: false, connectionId: 2 },
      () => Promise.reject(),
    );
    await a.pwrite(new Uint8Array(1024), 0, { fua: false });
    await b.pwrite(new Uint8Array(2048), 0, { fua: false });
    await read(a, 0, 4096);
    await b.flush();
    await instance.close!();
    const text = Deno.readTextFileSync(statsfile);
    assertMatch(text, /^write: 2 ops, 0 errors, [\d.]+ s, 3.00 KiB, /m);
    assertMatch(text, /^read: 1 ops, 0 errors, [\d.]+ s, 4.00 KiB, /m);
    assertMatch(text, /^flush: 1 ops, 0 errors, /m);
    assertMatch(text, /^total: 4 ops, [\d.]+ s, 7.00 KiB, /m);
    assertNotMatch(text, /^trim:/m);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("stats filter counts zero-copy reads too", async () => {
  const dir = tempDirSync();
  try {
    const statsfile = `${dir}/stats`;
    const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
    const { backend, instance } = await stack(statsFilter, [`statsfile=${statsfile}`], mem);
    assertOk(backend.readView, "the memory plugin's zero-copy read is kept");
    backend.readView!(0, 8192);
    await instance.close!();
    assertMatch(Deno.readTextFileSync(statsfile), /^read: 1 ops, 0 errors, [\d.]+ s, 8.00 KiB, /m);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
