import { assertEquals, assertRejects } from "../tests/assert.ts";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { filled, openPlugin, read, stack } from "./_test_utils.ts";
import { readonlyFilter } from "./readonly.ts";

Deno.test("readonly filter refuses writes and hides write capabilities", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const { backend } = await stack(readonlyFilter, [], mem);
  const caps = backend.capabilities();
  assertEquals(caps.writable, false);
  assertEquals(caps.trim, false);
  assertEquals(caps.zero, false);
  await assertRejects(
    () => backend.pwrite(filled(10, 1), 0, { fua: false }),
    (e) => e instanceof NbdError && e.errno === "EPERM",
  );
  await assertRejects(
    () => backend.zero(0, 10, { fua: false, fast: false, mayTrim: true }),
    NbdError,
  );
  assertEquals(await read(backend, 0, 4), new Uint8Array(4));
});
