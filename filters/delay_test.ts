import assert from "node:assert/strict";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { UsageError } from "../server/params.ts";
import { createFilter, openPlugin, read, stack } from "./_test_utils.ts";
import { delayFilter } from "./delay.ts";

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const start = performance.now();
  await fn();
  return performance.now() - start;
}

Deno.test("delay filter delays each kind of request by its own amount", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const { backend } = await stack(delayFilter, ["rdelay=60ms", "delay-zero=0.03"], mem);
  assert.ok(await timed(() => read(backend, 0, 512)) >= 55);
  assert.ok(
    await timed(() => backend.zero(0, 512, { fua: false, fast: false, mayTrim: true })) >= 25,
  );
  // Writes have no delay configured.
  assert.ok(await timed(() => backend.pwrite(new Uint8Array(8), 0, { fua: false })) < 25);
});

Deno.test("delay filter: wdelay covers writes, trims and zeroes; fast zero can fail at once", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const { backend } = await stack(delayFilter, ["wdelay=40ms", "delay-fast-zero=false"], mem);
  assert.ok(await timed(() => backend.pwrite(new Uint8Array(8), 0, { fua: false })) >= 35);
  assert.ok(await timed(() => backend.trim(0, 8, { fua: false })) >= 35);
  assert.equal(backend.capabilities().fastZero, false);
  const took = await timed(() =>
    assert.rejects(
      () => backend.zero(0, 8, { fua: false, fast: true, mayTrim: false }),
      (e) => e instanceof NbdError && e.errno === "ENOTSUP",
    )
  );
  assert.ok(took < 30);
});

Deno.test("delay filter rejects bad durations and duplicate names", async () => {
  await assert.rejects(() => createFilter(delayFilter, ["rdelay=fast"]), UsageError);
  await assert.rejects(() => createFilter(delayFilter, ["rdelay=1", "delay-read=2"]), UsageError);
});
