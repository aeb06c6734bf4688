import { assertEquals, assertRejects, assertThrows } from "../tests/assert.ts";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { CTX, openPlugin, read } from "./_test_utils.ts";
import { describeFaults, FaultSwitch } from "./fault_switch.ts";

const isErr = (errno: string) => (e: unknown) => e instanceof NbdError && e.errno === errno;

Deno.test("fault switch: requests fail only while on, only of the chosen kinds", async () => {
  const faults = new FaultSwitch();
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const backend = await faults.layer().wrap(mem, CTX, () => Promise.reject(new Error("no")));
  const other = await faults.layer().wrap(
    mem,
    { ...CTX, exportName: "other" },
    () => Promise.reject(new Error("no")),
  );
  const write = () => backend.pwrite(new Uint8Array(8).fill(7), 0, { fua: false });
  await write();
  assertEquals(faults.settings(""), undefined, "nothing to check while off");

  assertEquals(faults.change({ enabled: true, kinds: "read" }).state, {
    enabled: true,
    kinds: "read",
    errno: "EIO",
    rate: 1,
  });
  await assertRejects(() => read(backend, 0, 8), isErr("EIO"));
  await assertRejects(() => backend.cache(0, 8), isErr("EIO"));
  await write(); // writes pass
  await read(other, 0, 8); // another export is not affected

  faults.change({ kinds: "write", errno: "enospc" });
  await assertRejects(write, isErr("ENOSPC"));
  await assertRejects(
    () => backend.zero(0, 8, { fua: false, mayTrim: false, fast: false }),
    isErr("ENOSPC"),
  );
  await assertRejects(() => backend.flush(), isErr("ENOSPC"));
  await read(backend, 0, 8);

  faults.change({ kinds: "all", rate: 0.5 });
  let failed = 0;
  for (let i = 0; i < 400; i++) {
    try {
      await read(backend, 0, 8);
    } catch {
      failed++;
    }
  }
  // Binomial(400, 0.5): outside 140..260 about once in 10^9 runs.
  if (failed < 140 || failed > 260) throw new Error(`${failed} of 400 failed at 50%`);

  faults.change({ enabled: false });
  assertEquals(faults.settings(""), undefined);
  assertEquals((await read(backend, 0, 8))[0], 7);
  assertEquals(describeFaults(faults.state("")), "off");
  assertEquals(
    describeFaults({ enabled: true, kinds: "read", errno: "EIO", rate: 0.1 }),
    "on: read requests fail with EIO at 10%",
  );
});

Deno.test("fault switch: a bad change is refused whole", () => {
  const faults = new FaultSwitch();
  for (
    const bad of [
      { enabled: "yes" },
      { kinds: "everything" },
      { errno: "EBADF" },
      { rate: 2 },
      { rate: "1" },
      { export: 3 },
      { enabled: true, rate: -1 },
    ]
  ) {
    // deno-lint-ignore no-explicit-any
    assertThrows(() => faults.change(bad as any), RangeError);
  }
  assertEquals(faults.states().size, 0);
  assertEquals(faults.state("x").enabled, false);
});
