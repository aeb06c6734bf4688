import { assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { UsageError } from "../util/usage_error.ts";
import { createFilter, openPlugin, read, stack } from "./_test_utils.ts";
import { delayFilter } from "./delay.ts";

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const start = performance.now();
  await fn();
  return performance.now() - start;
}

/** Runs the operations at once and returns their names in completion order. */
async function finishingOrder(ops: Record<string, () => Promise<unknown>>): Promise<string[]> {
  const order: string[] = [];
  await Promise.all(
    Object.entries(ops).map(([name, op]) =>
      op().then(() => order.push(name), () => order.push(name))
    ),
  );
  return order;
}

Deno.test("delay filter delays each kind of request by its own amount", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const { backend } = await stack(delayFilter, ["rdelay=200ms", "delay-zero=0.1"], mem);
  assertOk(await timed(() => read(backend, 0, 512)) >= 195);
  assertOk(
    await timed(() => backend.zero(0, 512, { fua: false, fast: false, mayTrim: true })) >= 95,
  );
  // Writes have no delay: they finish before a zero started at the same time, which
  // finishes before the read.
  assertEquals(
    await finishingOrder({
      read: () => read(backend, 0, 512),
      zero: () => backend.zero(0, 512, { fua: false, fast: false, mayTrim: true }),
      write: () => backend.pwrite(new Uint8Array(8), 0, { fua: false }),
    }),
    ["write", "zero", "read"],
  );
});

Deno.test("delay filter: wdelay covers writes, trims and zeroes; fast zero can fail at once", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const { backend } = await stack(delayFilter, ["wdelay=100ms", "delay-fast-zero=false"], mem);
  assertOk(await timed(() => backend.pwrite(new Uint8Array(8), 0, { fua: false })) >= 95);
  assertOk(await timed(() => backend.trim(0, 8, { fua: false })) >= 95);
  assertEquals(backend.capabilities().fastZero, false);
  await assertRejects(
    () => backend.zero(0, 8, { fua: false, fast: true, mayTrim: false }),
    (e) => e instanceof NbdError && e.errno === "ENOTSUP",
  );
  assertEquals(
    await finishingOrder({
      zero: () => backend.zero(0, 8, { fua: false, fast: false, mayTrim: false }),
      fastZero: () => backend.zero(0, 8, { fua: false, fast: true, mayTrim: false }),
    }),
    ["fastZero", "zero"],
  );
});

Deno.test("delay filter rejects bad durations and duplicate names", async () => {
  await assertRejects(() => createFilter(delayFilter, ["rdelay=fast"]), UsageError);
  await assertRejects(() => createFilter(delayFilter, ["rdelay=1", "delay-read=2"]), UsageError);
});
