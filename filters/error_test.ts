import { assertEquals, assertOk, assertRejects, assertThrows } from "../tests/assert.ts";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { UsageError } from "../util/usage_error.ts";
import { createFilter, openPlugin, read, stack, tempDirSync } from "./_test_utils.ts";
import { errorFilter, parseRate } from "./error.ts";

Deno.test("parseRate reads percentages and probabilities", () => {
  assertEquals(parseRate("10%", "r"), 0.1);
  assertEquals(parseRate("0.25", "r"), 0.25);
  assertEquals(parseRate("100%", "r"), 1);
  assertThrows(() => parseRate("150%", "r"), UsageError);
  assertThrows(() => parseRate("2", "r"), UsageError);
});

Deno.test("error filter fails every request of a kind at rate 100%", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const { backend } = await stack(errorFilter, ["error=ENOSPC", "error-pwrite-rate=100%"], mem);
  await assertRejects(
    () => backend.pwrite(new Uint8Array(8), 0, { fua: false }),
    (e) => e instanceof NbdError && e.errno === "ENOSPC",
  );
  await read(backend, 0, 8); // reads are not affected
});

Deno.test("error filter with error-file fails only while the file exists", async () => {
  const dir = tempDirSync();
  const trigger = `${dir}/inject`;
  try {
    const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
    const { backend } = await stack(errorFilter, ["error-rate=1", `error-file=${trigger}`], mem);
    await read(backend, 0, 8);
    Deno.writeTextFileSync(trigger, "");
    await assertRejects(
      () => read(backend, 0, 8),
      (e) => e instanceof NbdError && e.errno === "EIO",
    );
    Deno.removeSync(trigger);
    await read(backend, 0, 8);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("error filter at a partial rate fails some requests, not all", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const { backend } = await stack(errorFilter, ["error-rate=50%"], mem);
  let failed = 0;
  for (let i = 0; i < 400; i++) {
    try {
      await read(backend, 0, 1);
    } catch {
      failed++;
    }
  }
  // 400 draws at p=0.5: outside [100, 300] has a probability far below 1e-20.
  assertOk(failed > 100 && failed < 300, `failed ${failed} of 400`);
});

Deno.test("error filter rejects unknown errors", async () => {
  await assertRejects(() => createFilter(errorFilter, ["error=EFOO"]), UsageError);
});
