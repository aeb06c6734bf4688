import { assertEquals, assertOk, assertThrows } from "../tests/assert.ts";
import { ServerStats } from "../server/stats.ts";
import { Replayer, ReplayLog } from "./replay.ts";
import { SAMPLE_LOG } from "./_test_fixtures.ts";

Deno.test("ReplayLog reads requests, opens and closes, and counts what it skipped", () => {
  const log = ReplayLog.fromLines(SAMPLE_LOG);
  assertEquals([log.length, log.requests, log.skipped], [9, 6, 2]);
  assertEquals(log.duration, 1000);
  assertEquals([...log.sizes], [["", 1048576]]);
  assertEquals(log.exportNames, [""]);
  assertEquals(log.event(1), {
    kind: 1,
    connection: 1,
    offset: 4096,
    count: 8192,
    elapsed: Math.fround(0.00005),
    ok: true,
  });
  assertEquals(log.event(3).ok, false);
});

Deno.test("ReplayLog sizes an export without an Open line by its furthest request", () => {
  const log = ReplayLog.fromLines([
    "2026-01-02T03:04:05.000000Z connection=1 Write id=1 offset=4096 count=4096 return=0",
    "2026-01-02T03:04:05.000000Z connection=1 Read id=2 offset=100000 count=5 return=0",
    "2026-01-02T03:04:05.000000Z connection=1 Read id=3 offset=0 count=5 return=0",
  ]);
  assertEquals([...log.sizes], [["", 100005]]);
});

Deno.test("Replayer plays the log into ServerStats in scaled time, pauses and restarts", () => {
  const stats = new ServerStats();
  const events: string[] = [];
  stats.listeners.add((e) => events.push(`${e.command} ${e.offset}+${e.length} ${e.ok}`));
  const replayer = new Replayer(ReplayLog.fromLines(SAMPLE_LOG), stats, {
    file: "x.log",
    speed: 2,
  });
  // Sizes are known before the first request.
  assertEquals(stats.exportSizes.get(""), 1048576);
  replayer.advance(0);
  assertEquals(events, []); // the Open at time 0 only
  assertEquals(stats.connections.get(1)?.exportName, "");
  replayer.advance(100); // 200 ms of log
  assertEquals(events, ["WRITE 4096+8192 true", "READ 0+512 true"]);
  const read = stats.exports.get("")!.commands.READ;
  // The latency is the logged one (2 ms: the 2048 µs bucket).
  assertEquals(read.histogram.findIndex((n) => n > 0), 8);
  replayer.change({ paused: true });
  replayer.advance(10_000);
  assertEquals(events.length, 2);
  assertEquals(replayer.state().paused, true);
  replayer.change({ paused: false, speed: 1000 });
  replayer.advance(10_000);
  assertEquals(events, [
    "WRITE 4096+8192 true",
    "READ 0+512 true",
    "READ 2000000+512 false",
    "FLUSH 0+0 true",
    "TRIM 65536+65536 true",
    "WRITE_ZEROES 0+4096 true",
  ]);
  const state = replayer.state();
  assertEquals(state, {
    file: "x.log",
    position: 1,
    duration: 1,
    speed: 1000,
    paused: false,
    done: true,
    replayed: 6,
    requests: 6,
    run: 0,
  });
  assertEquals([...stats.connections.keys()], [2]);
  assertEquals(stats.connections.get(2)!.tls, true);
  assertEquals(stats.connectionsTotal, 2);
  const counters = stats.exports.get("")!.commands;
  assertEquals([counters.READ.completed, counters.READ.failed, counters.TRIM.bytes], [1, 1, 65536]);

  replayer.change({ restart: true });
  assertEquals([replayer.state().run, replayer.state().replayed], [1, 0]);
  assertEquals([stats.exports.size, stats.connections.size, stats.connectionsTotal], [0, 0, 0]);
  assertEquals(stats.listeners.size, 1); // listeners survive the reset
  assertThrows(() => replayer.change({ speed: 0 }), RangeError);
  assertThrows(() => replayer.change({ speed: Infinity }), RangeError);
  assertOk(!replayer.done);
});
