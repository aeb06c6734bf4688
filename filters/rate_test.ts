import { assertEquals, assertOk } from "../tests/assert.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { openPlugin, read, stack } from "./_test_utils.ts";
import { rateFilter, TokenBucket } from "./rate.ts";

Deno.test("TokenBucket lets a burst through, then makes callers wait for the deficit", () => {
  const bucket = new TokenBucket(8000, 1); // 1000 bytes/s, 1 s burst
  assertEquals(bucket.take(8000), 0);
  const wait = bucket.take(4000); // half a second of debt
  assertOk(wait > 300 && wait <= 500, `${wait}`);
});

Deno.test("rate filter limits reads to the configured bits per second", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  // 80 Kbit/s = 10 KiB/s; the 0.1 s burst covers the first KiB.
  const { backend } = await stack(rateFilter, ["rate=80K", "burstiness=0.1"], mem);
  const start = performance.now();
  for (let i = 0; i < 4; i++) await read(backend, 0, 1024);
  const took = performance.now() - start;
  // 4 KiB with 1 KiB of burst: about 0.3 s at 10 KiB/s.
  assertOk(took >= 250 && took < 1500, `took ${took} ms`);
});
