import { assertEquals, assertOk } from "../tests/assert.ts";
import { NBD_CMD_READ, NBD_CMD_WRITE } from "../protocol/constants.ts";
import { ServerStats } from "../server/stats.ts";
import { statsSnapshot } from "./stats_snapshot.ts";

const COUNTER_KEYS = [
  "bytes",
  "commands",
  "lastReplyAt",
  "lastRequestAt",
  "latencyMicros",
  "requests",
  "secondsSinceLastReply",
  "secondsSinceLastRequest",
];
const COMMANDS = [
  "BLOCK_STATUS",
  "CACHE",
  "FLUSH",
  "OTHER",
  "READ",
  "TRIM",
  "WRITE",
  "WRITE_ZEROES",
];

Deno.test("statsSnapshot() has the documented shape and exact counts", () => {
  const stats = new ServerStats();
  const conn = stats.open(3, "unix");
  conn.exportName = "disk";
  conn.features = ["structured replies"];
  stats.noteExportSize("disk", 4096 * 10);
  const counters = stats.exportCounters("disk");
  for (
    const [type, length, ok] of [[NBD_CMD_WRITE, 4096, true], [NBD_CMD_READ, 512, false]] as const
  ) {
    const t = stats.start(conn, counters, type);
    stats.finish(conn, counters, type, 0, length, ok, t - 0.3); // 300 µs: the 512 µs bucket
  }
  stats.start(conn, counters, NBD_CMD_READ); // still in flight
  const before = Date.now();
  const s = statsSnapshot(stats, ["", "disk"]);
  assertEquals(Object.keys(s).sort(), [
    "connections",
    "connectionsOpen",
    "connectionsTotal",
    "exports",
    "generatedAt",
    "mode",
    "program",
    "startedAt",
    "uptimeSeconds",
    "version",
  ]);
  assertEquals([s.program, s.mode, s.connectionsOpen, s.connectionsTotal], ["nbd", "serve", 1, 1]);
  assertOk(Math.abs(Date.parse(s.generatedAt) - before) < 1000);
  assertEquals(s.exports.map((e) => [e.name, e.size, e.connections]), [["", null, 0], [
    "disk",
    40960,
    1,
  ]]);
  const [unused, disk] = s.exports as [typeof s.exports[0], typeof s.exports[0]];
  assertEquals(Object.keys(disk).sort(), ["connections", "name", "size", ...COUNTER_KEYS].sort());
  assertEquals(Object.keys(disk.commands).sort(), COMMANDS);
  assertEquals(disk.requests, { received: 3, inFlight: 1, completed: 1, failed: 1 });
  assertEquals(disk.bytes, { read: 0, written: 4096, trimmed: 0, zeroed: 0, cached: 0 });
  assertEquals(disk.commands.READ, {
    received: 2,
    inFlight: 1,
    completed: 0,
    failed: 1,
    bytes: 0,
    latencyMicros: { p50: 512, p90: 512, p99: 512 },
  });
  assertOk(disk.secondsSinceLastRequest! >= 0 && disk.secondsSinceLastRequest! < 1);
  assertOk(Math.abs(Date.parse(disk.lastReplyAt!) - before) < 1000);
  assertEquals(unused.requests, { received: 0, inFlight: 0, completed: 0, failed: 0 });
  assertEquals([unused.lastRequestAt, unused.secondsSinceLastReply], [null, null]);
  assertEquals(unused.latencyMicros, { p50: null, p90: null, p99: null });

  const [c] = s.connections;
  assertEquals(
    Object.keys(c!).sort(),
    ["connectedAt", "export", "features", "id", "peer", "secondsConnected", "tls", ...COUNTER_KEYS]
      .sort(),
  );
  assertEquals([c!.id, c!.peer, c!.export, c!.tls, c!.features], [3, "unix", "disk", false, [
    "structured replies",
  ]]);
  assertEquals(c!.requests, disk.requests);
  // It survives JSON unchanged (no undefined, no NaN).
  assertEquals(JSON.parse(JSON.stringify(s)), s);
});
