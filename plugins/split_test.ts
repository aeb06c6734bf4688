import { assertBytes, assertEquals, assertRejects } from "../tests/assert.ts";
import { UsageError } from "../util/usage_error.ts";
import { randomBytes } from "../tests/helpers.ts";
import { openPlugin, read } from "../filters/_test_utils.ts";
import { splitPlugin } from "./split.ts";

Deno.test("split plugin joins files and writes across their boundaries", async () => {
  const dir = await Deno.makeTempDir({ prefix: "nbd-split-test" });
  try {
    const parts = [randomBytes(1000, 1), randomBytes(1, 2), randomBytes(4096, 3)];
    const paths = parts.map((_, i) => `${dir}/part${i}`);
    parts.forEach((p, i) => Deno.writeFileSync(paths[i]!, p));
    const joined = new Uint8Array([...parts[0]!, ...parts[1]!, ...parts[2]!]);
    const { backend, instance } = await openPlugin(splitPlugin, paths.map((p) => `file=${p}`));
    assertEquals(backend.size(), 5097);
    assertBytes(await read(backend, 0, 5097), joined);
    assertBytes(await read(backend, 990, 20), joined.subarray(990, 1010));
    const patch = randomBytes(30, 9);
    await backend.pwrite(patch, 985, { fua: true });
    joined.set(patch, 985);
    assertBytes(Deno.readFileSync(paths[0]!), joined.subarray(0, 1000));
    assertBytes(Deno.readFileSync(paths[1]!), joined.subarray(1000, 1001));
    assertBytes(Deno.readFileSync(paths[2]!).subarray(0, 14), joined.subarray(1001, 1015));
    await instance.close?.();
    // A bare word is the file (magic parameter).
    const single = await openPlugin(splitPlugin, [paths[2]!]);
    assertEquals(single.backend.size(), 4096);
    await single.instance.close?.();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("split plugin reports missing files as usage errors", async () => {
  await assertRejects(() => openPlugin(splitPlugin, ["file=/nonexistent/disk.img"]), UsageError);
  await assertRejects(() => openPlugin(splitPlugin, []), UsageError);
});
