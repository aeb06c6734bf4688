// The qcow2 fuzzer as part of the test suite: mutated images in process, served through
// --filter=qcow2, given to nbd info and nbd copy, and chained badly. Set NBD_FUZZ_SEED to vary.

import { assertEquals, assertOk } from "./assert.ts";
import { formatQcow2FuzzReport, runQcow2Fuzz } from "./fuzz_qcow2.ts";
import { peers } from "./helpers.ts";

Deno.test({
  name: "fuzz qcow2: mutated images give one-line errors or EIO, never a crash or a hang",
  ...peers("qemu-img", "qemu-io"),
  async fn() {
    const seed = Number(Deno.env.get("NBD_FUZZ_SEED") ?? 20261204);
    const report = await runQcow2Fuzz({ cases: 20_000, seconds: 15, served: 30, cli: 2, seed });
    console.log(formatQcow2FuzzReport(report));
    assertEquals(report.crashes, []);
    assertEquals(report.hangs, []);
    assertEquals(report.served.problems, []);
    assertEquals(report.cliProblems, []);
    assertEquals(
      [report.served.survived, report.served.exitCode, report.served.internalErrors],
      [true, 0, []],
    );
    // Enough cases, and every kind of ending: refused at open, served cleanly, served with EIO.
    assertOk(report.cases >= 1000, `only ${report.cases} in-process cases`);
    for (const kind of ["open error", "served", "served with EIO"]) {
      assertOk((report.outcomes.get(kind) ?? 0) > 0, `no case ended in "${kind}"`);
    }
    assertOk(report.classes.size >= 40, `only ${report.classes.size} mutation classes`);
    assertEquals(report.served.cases, 30);
    assertOk(report.served.openErrors > 0 && report.served.requests > 0, "served cases idle");
    assertOk(report.served.probes >= 2, "the good image was not checked between batches");
    assertEquals([report.cliCases, report.chainCases], [4, 4]);
  },
});
