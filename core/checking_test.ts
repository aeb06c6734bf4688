/**
 * The checking layer: each broken promise is caught on the right side and
 * reported naming the layer at fault; correct calls pass untouched.
 */

import { assertEquals, assertMatch, assertRejects, assertThrows } from "../tests/assert.ts";
import { type Backend, completeBackend, type PluginBackend } from "./backend.ts";
import { CheckingBackend } from "./checking.ts";

function layer(overrides: Partial<PluginBackend> = {}): Backend {
  return completeBackend({
    size: () => 65536,
    pread: (buf) => Promise.resolve(void buf.fill(1)),
    ...overrides,
  });
}

function checked(below: Backend) {
  const reports: string[] = [];
  const backend = new CheckingBackend(
    below,
    "filter upper",
    "plugin lower",
    (m) => reports.push(m),
  );
  return { backend, reports };
}

Deno.test("checking layer: calls outside the rules are the caller's fault", async () => {
  const { backend, reports } = checked(layer());
  await assertRejects(() => backend.pread(new Uint8Array(4096), 65536 - 2048));
  await assertRejects(() => backend.pread(new Uint8Array(0), 0));
  // Read-only below: no write, no zero; no flush, trim or extents advertised.
  await assertRejects(() => backend.pwrite(new Uint8Array(1), 0, { fua: false }));
  await assertRejects(() => backend.flush());
  await assertRejects(() => backend.extents(0, 4096, { reqOne: false }));
  assertEquals(reports.length, 5);
  for (const report of reports) {
    assertMatch(report, /^layer check: filter upper broke the contract of plugin lower: /);
  }
  assertMatch(reports[0]!, /pread\(offset=63488, length=4096\) beyond the size 65536/);
  assertMatch(reports[2]!, /pwrite on a read-only layer/);
  assertMatch(reports[4]!, /extents on a layer without extents/);
});

Deno.test("checking layer: reads past the size of an extendable layer are allowed", async () => {
  // Another connection may have grown the store (a qcow2 image shared by all connections).
  const extendable = layer({
    pwrite: () => Promise.resolve(),
    capabilities: () => ({ extendable: true }),
  });
  const { backend, reports } = checked(extendable);
  await backend.pread(new Uint8Array(4096), 65536 + 8192);
  assertEquals(reports, []);
  const { backend: fixed } = checked(layer());
  await assertRejects(() => fixed.pread(new Uint8Array(4096), 65536 + 8192));
});

Deno.test("checking layer: flags that were not advertised are the caller's fault", async () => {
  const writable = layer({ pwrite: () => Promise.resolve() }); // no flush: fua none, no fast zero
  const { backend, reports } = checked(writable);
  await backend.pwrite(new Uint8Array(8), 0, { fua: false });
  await assertRejects(() => backend.pwrite(new Uint8Array(8), 0, { fua: true }));
  await assertRejects(() => backend.zero(0, 8, { fua: false, mayTrim: false, fast: true }));
  await backend.close();
  await assertRejects(() => backend.pread(new Uint8Array(8), 0));
  assertMatch(reports[0]!, /pwrite with fua, which was not advertised/);
  assertMatch(reports[1]!, /a fast zero, which was not advertised/);
  assertMatch(reports[2]!, /pread after close/);
});

Deno.test("checking layer: wrong answers are the lower layer's fault", async () => {
  const { backend, reports } = checked(layer({
    pread: (buf, offset) => Promise.resolve(void buf.fill(1, 0, offset === 0 ? buf.length : 16)),
    extents: (_offset, length) =>
      Promise.resolve(length === 4096 ? [] : [{ length: 1 << 20, flags: 0 }]),
  }));
  await backend.pread(new Uint8Array(4096), 0);
  await assertRejects(() => backend.pread(new Uint8Array(4096), 4096));
  await assertRejects(() => backend.extents(0, 4096, { reqOne: false }));
  await assertRejects(() => backend.extents(0, 8192, { reqOne: false }));
  assertEquals(reports.length, 3);
  for (const report of reports) {
    assertMatch(
      report,
      /^layer check: plugin lower broke its contract \(called by filter upper\): /,
    );
  }
  assertMatch(reports[0]!, /left bytes from 16 unfilled/);
  assertMatch(reports[1]!, /returned no extent/);
  assertMatch(reports[2]!, /past the end of the export/);
});

Deno.test("checking layer: bad capabilities fail the open", () => {
  const below = layer();
  const broken = { ...below, capabilities: () => ({ ...below.capabilities(), fua: "yes" }) };
  assertThrows(() => new CheckingBackend(broken as Backend, "the client", "plugin x", () => {}));
});

Deno.test("checking layer: in-place write views are checked; emulated FUA has none", () => {
  const writable = (views: Uint8Array[]) =>
    layer({
      capabilities: () => ({ fua: "native" }),
      writeView: () => views,
      pwrite: () => Promise.resolve(),
    });
  const good = checked(writable([new Uint8Array(10), new Uint8Array(6)]));
  assertEquals(good.backend.writeView!(0, 16)!.length, 2);
  const short = checked(writable([new Uint8Array(10)]));
  assertThrows(() => short.backend.writeView!(0, 16));
  assertMatch(short.reports[0]!, /plugin lower broke its contract.*writeView covered 10 bytes, 16/);
  assertThrows(() => good.backend.writeView!(65536 - 8, 16));
  assertMatch(good.reports[0]!, /filter upper broke the contract.*writeView\(offset=65528/);
  // Read-only layers and those whose FUA needs a flush offer no views.
  assertEquals(layer({ writeView: () => [] }).writeView, undefined);
  const emulated = layer({
    writeView: () => [],
    pwrite: () => Promise.resolve(),
    flush: () => Promise.resolve(),
  });
  assertEquals(emulated.writeView, undefined);
});
