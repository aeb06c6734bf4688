import { assertEquals, assertOk, assertThrows } from "../tests/assert.ts";
import { NBD_CMD_WRITE } from "../protocol/constants.ts";
import { UsageError } from "../util/usage_error.ts";
import { ServerStats } from "../server/stats.ts";
import { statsSnapshot } from "../view/stats_snapshot.ts";
import { formatStats, statsUrl } from "./stats.ts";

Deno.test("statsUrl() accepts a view URL, HOST:PORT or a port", () => {
  assertEquals(statsUrl("http://127.0.0.1:8080").href, "http://127.0.0.1:8080/stats");
  assertEquals(statsUrl("http://127.0.0.1:8080/").href, "http://127.0.0.1:8080/stats");
  assertEquals(statsUrl("http://h:1/stats").href, "http://h:1/stats");
  assertEquals(statsUrl("http://h:1/?export=x").href, "http://h:1/stats");
  assertEquals(statsUrl("localhost:9000").href, "http://localhost:9000/stats");
  assertEquals(statsUrl("9000").href, "http://127.0.0.1:9000/stats");
  assertThrows(() => statsUrl("nbd://x"), UsageError);
  assertThrows(() => statsUrl("http://"), UsageError);
});

Deno.test("formatStats() shows exports, commands and connections", () => {
  const stats = new ServerStats();
  const conn = stats.open(4, "127.0.0.1:4000");
  conn.exportName = "";
  conn.features = ["structured replies"];
  stats.noteExportSize("", 1 << 30);
  const counters = stats.exportCounters("");
  const t = stats.start(conn, counters, NBD_CMD_WRITE);
  stats.finish(conn, counters, NBD_CMD_WRITE, 0, 65536, true, t);
  const text = formatStats(statsSnapshot(stats, [""]));
  const lines = text.split("\n");
  assertOk(/^nbd \S+: up \d+\.\ds, 1 connection open, 1 accepted$/.test(lines[0]!), lines[0]);
  assertOk(
    lines.some((l) =>
      /^export "" \(default\) \(1\.00 GiB\): 1 connection, 1 requests \(0 in flight, 0 failed\); last request \d/
        .test(l)
    ),
    text,
  );
  assertOk(lines.some((l) => /^ {2}write +1 +0 +1 +0 +64\.0 KiB /.test(l)), text);
  assertOk(lines.some((l) => /^ {2}read +0 +0 +0 +0 +0 B /.test(l)), text);
  assertOk(!lines.some((l) => /^ {2}trim /.test(l)), "unused commands are left out");
  assertOk(lines.includes("connections:"), text);
  assertOk(
    lines.some((l) =>
      l.startsWith('  #4 127.0.0.1:4000  export "" (default)  TLS no  structured replies  up ')
    ),
    text,
  );
});
