import { assertBytes, assertEquals, assertRejects } from "../tests/assert.ts";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import type { Backend } from "../core/backend.ts";
import { randomBytes } from "../tests/helpers.ts";
import { openPlugin, read, stack } from "./_test_utils.ts";
import { gzipFilter } from "./gzip.ts";

async function compress(data: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([data as Uint8Array<ArrayBuffer>]).stream().pipeThrough(
    new CompressionStream("gzip"),
  );
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function diskOf(bytes: Uint8Array): Promise<Backend> {
  const { backend } = await openPlugin(memoryPlugin, [`size=${bytes.length}`]);
  await backend.pwrite(bytes, 0, { fua: false });
  return backend;
}

Deno.test("gzip filter serves the decompressed bytes, read-only", async () => {
  const original = new Uint8Array(3 * 1024 * 1024 + 17);
  original.set(randomBytes(500000, 4), 1000000);
  const { backend, instance } = await stack(gzipFilter, [], await diskOf(await compress(original)));
  try {
    assertEquals(backend.size(), original.length);
    assertBytes(await read(backend, 0, original.length), original);
    assertBytes(await read(backend, 1200000, 1000), original.subarray(1200000, 1201000));
    assertEquals(backend.capabilities().writable, false);
    await assertRejects(() => backend.pwrite(new Uint8Array(1), 0, { fua: false }), NbdError);
  } finally {
    await instance.close?.();
  }
});

Deno.test("gzip filter decodes concatenated members and rejects garbage", async () => {
  const a = randomBytes(1000, 1);
  const b = randomBytes(2000, 2);
  const joined = new Uint8Array([...await compress(a), ...await compress(b)]);
  const { backend, instance } = await stack(gzipFilter, [], await diskOf(joined));
  assertBytes(await read(backend, 0, 3000), new Uint8Array([...a, ...b]));
  await instance.close?.();
  await assertRejects(() =>
    stack(gzipFilter, [], undefined as never).catch((e) => {
      throw e;
    })
  );
  const garbage = await diskOf(new Uint8Array(1000).fill(7));
  await assertRejects(() => stack(gzipFilter, [], garbage), NbdError);
});
