// The load test in the suite (short), and proof that its verification
// catches a server that loses or misplaces writes.

import { assertEquals, assertOk } from "./assert.ts";
import { formatResult, runLoad } from "../bench/load.ts";
import { PipelinedClient } from "./pipelined_client.ts";
import { blockContents, checkBlock, VerifiedWorker } from "./verified_io.ts";
import { completeBackend, type Plugin } from "../core/backend.ts";
import { Exports } from "../server/exports.ts";
import { listenUnix } from "../server/listener.ts";
import { Params } from "../core/params.ts";
import { NbdServer } from "../server/server.ts";
import { tempDir } from "./helpers.ts";

Deno.test("load: 16 connections x 32 in flight on memory and file exports, 0 errors, 0 mismatches", async () => {
  const results = await runLoad({ connections: 16, inFlight: 32, seconds: 2, regionBlocks: 256 });
  assertEquals(results.map((r) => r.export), ["memory", "file"]);
  for (const r of results) {
    console.log(formatResult(r));
    assertEquals(r.stats.problems, []);
    assertEquals([r.stats.errors, r.stats.mismatches, r.cleanExit], [0, 0, true]);
    assertOk(r.stats.reads > 16 * 32 && r.stats.writes > 16 * 32, `${r.export}: too little I/O`);
    assertOk(r.p50 <= r.p90 && r.p90 <= r.p99 && r.p99 <= r.max);
  }
});

Deno.test("verified I/O: block contents depend on worker, block and version", () => {
  const a = new Uint8Array(4096);
  blockContents(a, 1, 2, 3);
  assertOk(checkBlock(a, 1, 2, 3));
  assertOk(!checkBlock(a, 1, 2, 4) && !checkBlock(a, 1, 3, 3) && !checkBlock(a, 2, 2, 3));
  assertOk(!checkBlock(a, 1, 2, 0));
  a[4095] ^= 1;
  assertOk(!checkBlock(a, 1, 2, 3));
  assertOk(checkBlock(new Uint8Array(4096), 9, 9, 0));
});

/** A RAM disk that silently drops every 29th write: what the verifier must catch. */
function lossyPlugin(): Plugin {
  const store = new Uint8Array(4 << 20);
  let writes = 0;
  return {
    name: "lossy",
    summary: "test",
    params: [],
    create: () =>
      Promise.resolve({
        open: () =>
          Promise.resolve(completeBackend({
            size: () => store.length,
            pread: (buf, offset) => {
              buf.set(store.subarray(offset, offset + buf.length));
              return Promise.resolve();
            },
            pwrite: (buf, offset) => {
              if (++writes % 29 !== 0) store.set(buf, offset);
              return Promise.resolve();
            },
            flush: () => Promise.resolve(),
          })),
      }),
  };
}

Deno.test("verified I/O: a server that loses writes is caught", async () => {
  await using dir = await tempDir("nbd-lossy");
  const path = `${dir.path}/sock`;
  const plugin = lossyPlugin();
  const server = new NbdServer({
    exports: new Exports({ plugin: await plugin.create(Params.parse([], undefined)) }),
    log: () => {},
  });
  const listener = await listenUnix(server, path);
  try {
    const client = await PipelinedClient.connect(path);
    const worker = new VerifiedWorker(client, {
      id: 1,
      regionStart: 0,
      regionBlocks: 64,
      blockSize: 4096,
      inFlight: 8,
    });
    let n = 0;
    await worker.run(() => ++n > 2000);
    await worker.sweep();
    assertEquals(worker.stats.errors, 0);
    assertOk(worker.stats.mismatches > 0, "lost writes went unnoticed");
    await client.disconnect();
  } finally {
    listener.close();
    await server.shutdown();
  }
});
