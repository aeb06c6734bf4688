import { assertEquals, assertRejects } from "../tests/assert.ts";
import { NbdError } from "../protocol/errors.ts";
import { UsageError } from "../util/usage_error.ts";
import { openPlugin, read } from "../filters/_test_utils.ts";
import { evalPlugin } from "./eval.ts";

Deno.test("eval plugin runs snippets and infers can_* from the methods given", async () => {
  const { backend, instance } = await openPlugin(evalPlugin, [
    "get_size=echo 4096",
    "pread=head -c $3 /dev/zero | tr '\\0' A",
    "pwrite=cat > /dev/null",
    "zero=echo ENOTSUP >&2; exit 1",
  ]);
  assertEquals(backend.capabilities().writable, true);
  assertEquals(await read(backend, 10, 3), new TextEncoder().encode("AAA"));
  await backend.pwrite(new Uint8Array(10), 0, { fua: false });
  // The zero snippet says ENOTSUP: a normal zero falls back to writes, a fast one fails.
  await backend.zero(0, 10, { fua: false, fast: false, mayTrim: false });
  await assertRejects(
    () => backend.zero(0, 10, { fua: false, fast: true, mayTrim: false }),
    (e) => e instanceof NbdError && e.errno === "ENOTSUP",
  );
  await instance.close?.();
  await assertRejects(() => openPlugin(evalPlugin, ["get_size=echo 1"]), UsageError);
});
