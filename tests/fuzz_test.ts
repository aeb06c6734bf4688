// The protocol fuzzer as part of the test suite: a bounded run against real
// `nbd serve` processes. Set NBD_FUZZ_SEED to replay or vary the run.

import { assertEquals, assertOk } from "./assert.ts";
import { formatFuzzReport, runFuzz } from "./fuzz.ts";
import {
  expectInfo,
  expectMeta,
  judgeRequest,
  optionBytes,
  preTlsOptionCase,
  Rng,
  type TransmissionState,
} from "./fuzz_cases.ts";
import * as C from "../protocol/constants.ts";

Deno.test("fuzz: at least 20,000 hostile cases, every one answered as the spec says, no integrity error", async () => {
  const seed = Number(Deno.env.get("NBD_FUZZ_SEED") ?? 20261121);
  const report = await runFuzz({ cases: 50_000, seconds: 90, seed, workers: 4 });
  console.log(formatFuzzReport(report, true));
  assertOk(report.cases >= 20_000, `only ${report.cases} cases ran`);
  assertEquals(report.violationSamples, []);
  assertEquals(report.violations, 0);
  assertEquals(report.checker.problems, []);
  assertEquals(report.integrityErrors, 0);
  assertOk(report.checker.reads > 0 && report.checker.writes > 0, "the checker did no I/O");
  for (const server of report.servers) {
    assertEquals(
      [server.kind, server.survived, server.exitCode, server.internalErrors],
      [server.kind, true, 0, []],
    );
    // Bounded memory: runs stay near 100-250 MiB; a leak or an unbounded buffer shows far above.
    assertOk(
      server.peakRssKiB !== undefined && server.peakRssKiB < 768 * 1024,
      `${server.kind}: peak RSS ${server.peakRssKiB} KiB`,
    );
  }
  // The run reached every kind of outcome and a broad spread of input classes.
  const kinds = new Set([...report.outcomes.keys()].map((k) => k.replace(/ \(.*\)$/, "")));
  for (
    const kind of ["ok", "error reply", "ACK", "option error", "close", "abrupt", "export reply"]
  ) {
    assertOk(kinds.has(kind), `no case ended in "${kind}"`);
  }
  assertOk(report.classes.size >= 80, `only ${report.classes.size} input classes`);
});

Deno.test("fuzz oracle: INFO/GO data is judged by the spec's decoding rules", () => {
  const info = (name: Uint8Array, infos: number[], count = infos.length) => {
    const out = new Uint8Array(6 + name.length + 2 * infos.length);
    const v = new DataView(out.buffer);
    v.setUint32(0, name.length);
    out.set(name, 4);
    v.setUint16(4 + name.length, count);
    infos.forEach((t, i) => v.setUint16(6 + name.length + 2 * i, t));
    return out;
  };
  const text = (s: string) => new TextEncoder().encode(s);
  assertEquals(expectInfo(info(text(""), [3])).accept, [C.NBD_REP_ACK]);
  assertEquals(expectInfo(info(text("other"), [])).accept, [C.NBD_REP_ERR_UNKNOWN]);
  assertEquals(expectInfo(info(text(""), [1, 2], 3)).accept, [C.NBD_REP_ERR_INVALID]);
  assertEquals(expectInfo(info(Uint8Array.of(0xff), [])).accept, [C.NBD_REP_ERR_INVALID]);
  assertEquals(expectInfo(new Uint8Array(5)).accept, [C.NBD_REP_ERR_INVALID]);
  assertEquals(
    expectInfo(info(text("x".repeat(4097)), [])).accept,
    [C.NBD_REP_ERR_INVALID, C.NBD_REP_ERR_TOO_BIG],
  );
  const meta = new Uint8Array(8 + 4 + 15);
  const v = new DataView(meta.buffer);
  v.setUint32(4, 1);
  v.setUint32(8, 15);
  meta.set(text(C.BASE_ALLOCATION), 12);
  assertEquals(expectMeta(meta), { ok: true, exportKnown: true, queries: [C.BASE_ALLOCATION] });
  assertEquals(expectMeta(meta.subarray(0, 20)), { ok: false, accept: [C.NBD_REP_ERR_INVALID] });
  const option = optionBytes(C.NBD_OPT_GO, new Uint8Array(3), 0x7fffffff);
  assertEquals(new DataView(option.buffer).getUint32(12), 0x7fffffff);
});

Deno.test("fuzz oracle: requests are judged by flags, ranges and limits", () => {
  const s: TransmissionState = {
    target: { kind: "test", size: 1 << 20, maxRequest: 1 << 16, fuzzLo: 0 },
    flags: C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_SEND_FLUSH | C.NBD_FLAG_SEND_FUA |
      C.NBD_FLAG_SEND_TRIM | C.NBD_FLAG_SEND_WRITE_ZEROES,
    structured: true,
    extended: false,
    meta: "none",
  };
  const judge = (type: number, flags: number, offset: bigint, length: bigint, payload = 0n) =>
    judgeRequest(s, type, flags, offset, length, payload);
  assertEquals(judge(C.NBD_CMD_READ, 0, 0n, 512n), { kind: "reply", accept: [0] });
  assertEquals(judge(C.NBD_CMD_READ, 0, (1n << 64n) - 1n, 2n), {
    kind: "reply",
    accept: [C.NBD_EINVAL],
  });
  assertEquals(judge(C.NBD_CMD_WRITE, 0, 1n << 20n, 1n, 1n), {
    kind: "reply",
    accept: [C.NBD_ENOSPC],
  });
  assertEquals(judge(C.NBD_CMD_READ, C.NBD_CMD_FLAG_DF, 0n, 512n), {
    kind: "reply",
    accept: [C.NBD_EINVAL],
  });
  assertEquals(judge(C.NBD_CMD_FLUSH, C.NBD_CMD_FLAG_FUA, 0n, 0n), { kind: "reply", accept: [0] });
  assertEquals(judge(C.NBD_CMD_FLUSH, 0, 4n, 0n), { kind: "reply", accept: [C.NBD_EINVAL] });
  assertEquals(judge(C.NBD_CMD_BLOCK_STATUS, 0, 0n, 512n), {
    kind: "reply",
    accept: [C.NBD_EINVAL],
  });
  assertEquals(judge(99, 0, 0n, 0n), { kind: "reply", accept: [C.NBD_EINVAL] });
  assertEquals(judge(C.NBD_CMD_READ, 0, 0n, 0n), { kind: "reply", accept: [0, C.NBD_EINVAL] });
  assertEquals(judge(C.NBD_CMD_READ, 0, 0n, (1n << 16n) + 1n), {
    kind: "reply",
    accept: [C.NBD_EINVAL, C.NBD_EOVERFLOW],
  });
  assertEquals(judge(C.NBD_CMD_WRITE, 0, 0n, 1n << 18n, 1n << 18n), { kind: "close" });
  // Equal seeds give equal streams.
  const a = new Rng(5), b = new Rng(5);
  assertEquals([a.next(), a.next(), a.u64()], [b.next(), b.next(), b.u64()]);
});

Deno.test("fuzz oracle: before STARTTLS a TLS-only server refuses with ERR_TLS_REQD", () => {
  const rng = new Rng(11);
  const state = { fixed: true, noZeroes: true, structured: false, extended: false, meta: "none" };
  const seen = new Set<string>();
  for (let i = 0; i < 2000; i++) {
    const c = preTlsOptionCase(rng, { ...state, meta: "none" });
    const accept = c.expect.kind === "final" ? c.expect.accept : [];
    if (c.option === C.NBD_OPT_STARTTLS) {
      // Only the malformed STARTTLS (with data) comes from here, refused as invalid.
      assertEquals(accept, [C.NBD_REP_ERR_INVALID]);
    } else if (c.option === C.NBD_OPT_EXPORT_NAME) {
      assertEquals(c.expect.kind, "close");
    } else {
      assertEquals(accept, [C.NBD_REP_ERR_TLS_REQD], c.name);
      assertOk(c.name.endsWith("before STARTTLS"), c.name);
    }
    seen.add(c.name);
  }
  assertOk(seen.size >= 8, `only ${seen.size} classes`);
  // Without fixed newstyle the fixed-newstyle check comes first.
  const old = preTlsOptionCase(new Rng(3), { ...state, fixed: false, meta: "none" });
  if (old.option !== C.NBD_OPT_EXPORT_NAME) {
    assertEquals(old.expect.kind === "final" && old.expect.accept, [C.NBD_REP_ERR_INVALID]);
  }
});
