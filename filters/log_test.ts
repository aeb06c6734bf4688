import { assertEquals, assertMatch, assertOk, assertRejects } from "../tests/assert.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { CTX, openPlugin, read, stack, tempDirSync } from "./_test_utils.ts";
import { errorFilter } from "./error.ts";
import { formatTimestamp, logFilter } from "./log.ts";

Deno.test("formatTimestamp prints UTC with microseconds", () => {
  assertEquals(
    formatTimestamp(Date.UTC(2026, 0, 2, 3, 4, 5, 123) + 0.456),
    "2026-01-02T03:04:05.123456Z",
  );
});

Deno.test("log filter writes open, one line per request with its result, and close", async () => {
  const dir = tempDirSync();
  try {
    const logfile = `${dir}/log`;
    const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
    const { backend: failing } = await stack(errorFilter, ["error-flush-rate=1"], mem);
    const { backend, instance } = await stack(logFilter, [`logfile=${logfile}`], failing, {
      context: { ...CTX, connectionId: 7, exportName: "disk" },
    });
    await backend.pwrite(new Uint8Array(512), 4096, { fua: true });
    await read(backend, 4096, 512);
    await assertRejects(() => backend.flush());
    await backend.zero(0, 8192, { fua: false, fast: false, mayTrim: true });
    const extents = await backend.extents(0, 1 << 20, { reqOne: false });
    await backend.close();
    await instance.close?.();
    const lines = Deno.readTextFileSync(logfile).trimEnd().split("\n");
    const stamp = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z /;
    assertOk(lines.every((l) => stamp.test(l)), lines.join("\n"));
    const body = lines.map((l) => l.replace(stamp, "").replace(/ elapsed=\d+\.\d{6}/, ""));
    assertMatch(
      body[0]!,
      /^connection=7 Open export="disk" tls=0 readonly=0 size=1048576 write=1 /,
    );
    assertEquals(body.slice(1), [
      "connection=7 Write id=1 offset=4096 count=512 fua=1 return=0",
      "connection=7 Read id=2 offset=4096 count=512 return=0",
      'connection=7 Flush id=3 return=EIO error="EIO: injected EIO error into flush"',
      "connection=7 Zero id=4 offset=0 count=8192 trim=1 fua=0 fast=0 return=0",
      `connection=7 Extents id=5 offset=0 count=1048576 req_one=0 extents=${extents.length} return=0`,
      "connection=7 Close transactions=5",
    ]);
    // Timestamps never go backwards.
    const times = lines.map((l) => Date.parse(l.slice(0, 23) + "Z"));
    assertEquals(times, [...times].sort((a, b) => a - b));
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("log filter with logappend keeps earlier lines", async () => {
  const dir = tempDirSync();
  try {
    const logfile = `${dir}/log`;
    Deno.writeTextFileSync(logfile, "earlier\n");
    const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
    const { backend, instance } = await stack(
      logFilter,
      [`logfile=${logfile}`, "logappend=true"],
      mem,
    );
    await backend.close();
    await instance.close?.();
    const lines = Deno.readTextFileSync(logfile).trimEnd().split("\n");
    assertEquals(lines[0], "earlier");
    assertEquals(lines.length, 3);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
