// The TLS fuzzer as part of the test suite: a bounded run against real
// `nbd serve --tls=require` processes. Set NBD_FUZZ_SEED to replay or vary the run.

import { assertEquals, assertOk } from "./assert.ts";
import { formatTlsFuzzReport, runTlsFuzz } from "./fuzz_tls.ts";
import { peers } from "./helpers.ts";

Deno.test({
  name:
    "fuzz over TLS: at least 20,000 cases in TLS sessions and at the STARTTLS edge, no crash, no integrity error",
  ...peers("openssl"),
  async fn() {
    const seed = Number(Deno.env.get("NBD_FUZZ_SEED") ?? 20261204);
    // Stops at 20,000 cases; the time cap leaves room for slow or busy hosts.
    const report = await runTlsFuzz({ cases: 20_000, seconds: 100, seed });
    console.log(formatTlsFuzzReport(report, true));
    assertOk(report.cases >= 20_000, `only ${report.cases} cases ran in ${report.seconds} s`);
    assertEquals(report.violationSamples, []);
    assertEquals(report.violations, 0);
    assertEquals(report.probeFailures, []);
    assertOk(report.probes >= 2, `only ${report.probes} fresh clients checked the servers`);
    assertEquals(report.checker.problems, []);
    assertEquals(report.integrityErrors, 0);
    assertOk(report.checker.reads > 0 && report.checker.writes > 0, "the checker did no I/O");
    for (const server of report.servers) {
      assertEquals(
        [server.kind, server.survived, server.exitCode, server.internalErrors],
        [server.kind, true, 0, []],
      );
    }
    // Every STARTTLS-edge kind ran and ended as prescribed, and sessions carried many cases each.
    const classes = [...report.classes.keys()];
    for (
      const kind of [
        "plaintext option right behind STARTTLS → close",
        "plaintext option instead of the ClientHello → close",
        "second STARTTLS inside TLS → ERR_INVALID",
        "ClientHello instead of client flags → close",
        "ClientHello instead of an option → close",
        "garbage TLS record → close",
        "TLS record with a bad MAC → close",
        "oversized TLS record → close",
        "close_notify in the middle of a WRITE → close",
        "close_notify with requests in flight → close",
        "stall after STARTTLS ACK (no ClientHello) → close after the handshake limit",
        "stall in the middle of the ClientHello → close after the handshake limit",
        "renegotiation attempt (TLS 1.2) → answered|close",
        "key update (TLS 1.3) → answered|close",
      ]
    ) {
      assertOk(classes.includes(kind), `no case "${kind}"`);
    }
    assertOk(
      classes.some((k) => k.endsWith("before STARTTLS → ERR_TLS_REQD")),
      "no pre-TLS refusal",
    );
    // A TLS 1.3 key update is legitimate: the session goes on and answers.
    const outcomes = [...report.outcomes.keys()];
    assertOk(outcomes.some((k) => k.startsWith("answered after key update")), "key update lost");
    assertOk(!outcomes.some((k) => k.startsWith("close after key update")), "key update closed");
    assertOk(report.sessions > 0 && report.cases / report.sessions > 20, "sessions too short");
  },
});
