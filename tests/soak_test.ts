// The soak in CI size: 60 s of mixed multi-connection load on a memory and
// a file export at once, no request failing and RSS flat after the warm-up.

import { assertEquals, assertOk } from "./assert.ts";
import { formatSoak, runSoak } from "./soak.ts";

Deno.test("soak: memory and file exports, 60 s of mixed load, no failure and no RSS growth", async () => {
  const results = await runSoak({ duration: 60 });
  assertEquals(results.map((r) => r.export), ["memory", "file"]);
  for (const r of results) {
    console.log(formatSoak(r));
    assertEquals(r.failures, []);
    assertEquals([r.stats.foreign, r.stats.lostAckedBytes, r.stats.hangs], [0, 0, 0]);
    assertOk(r.stats.zeroes > 0 && r.stats.flushes > 0 && r.stats.bytesVerified > 0);
    assertOk(r.rssFinal <= r.rssBaseline * 1.1, `${r.export}: RSS grew`);
  }
});
