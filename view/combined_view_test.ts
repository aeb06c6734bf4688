import { assertEquals, assertOk } from "../tests/assert.ts";
import { sseEvents } from "../tests/sse.ts";
import { NBD_CMD_WRITE } from "../protocol/constants.ts";
import { ServerStats } from "../server/stats.ts";
import type { ActivityFrame } from "./activity.ts";
import { isLoopback, parseRemoteView, startCombinedView } from "./combined_view.ts";
import { Replayer, ReplayLog } from "./replay.ts";
import { SAMPLE_LOG } from "./_test_fixtures.ts";
import { startViewServer } from "./view_server.ts";

Deno.test("parseRemoteView() takes the token out of the URL", () => {
  const r = parseRemoteView("http://127.0.0.1:8080?token=s3cret");
  assertEquals([r.url.href, r.token], ["http://127.0.0.1:8080/", "s3cret"]);
  assertEquals(parseRemoteView("http://h:1/sub").url.href, "http://h:1/sub/");
  let threw = false;
  try {
    parseRemoteView("ftp://x/");
  } catch (error) {
    threw = error instanceof RangeError;
  }
  assertOk(threw);
  assertOk(isLoopback("127.0.0.1") && isLoopback("::1") && isLoopback("::ffff:127.0.0.1"));
  assertOk(!isLoopback("10.0.0.1") && !isLoopback(undefined) && !isLoopback("::"));
});

Deno.test("combined view: a log and a live server under /s/N, relayed and local", async () => {
  // The live server: one export of 2 MiB with a write on it.
  const stats = new ServerStats();
  const conn = stats.open(1, "test");
  conn.exportName = "";
  stats.noteExportSize("", 2 << 20);
  await using remote = await startViewServer({
    stats,
    listExports: () => Promise.resolve([""]),
  }, { port: 0 });
  const write = (offset: number, length: number) => {
    const counters = stats.exportCounters("");
    const t = stats.start(conn, counters, NBD_CMD_WRITE);
    stats.finish(conn, counters, NBD_CMD_WRITE, offset, length, true, t);
  };
  write(0, 4096);

  const logStats = new ServerStats();
  const log = ReplayLog.fromLines(SAMPLE_LOG);
  const replayer = new Replayer(log, logStats, { file: "a.log", paused: true });
  await using view = await startCombinedView([
    {
      label: "a.log",
      local: {
        stats: logStats,
        listExports: () => Promise.resolve(log.exportNames),
        replay: replayer,
      },
    },
    { label: "live", remote: parseRemoteView(remote.url) },
    { label: "gone", remote: parseRemoteView("http://127.0.0.1:1/") },
  ], { port: 0 });
  const get = (path: string, init?: RequestInit) => fetch(new URL(path, view.url), init);

  assertEquals(await (await get("/sources")).json(), [
    { label: "a.log", base: "/s/0", kind: "replay" },
    { label: "live", base: "/s/1", kind: "serve" },
    { label: "gone", base: "/s/2", kind: "serve" },
  ]);
  const live = await (await get("/s/1/stats")).json();
  assertEquals(live.exports[0].commands.WRITE.completed, 1);
  const replay = await (await get("/s/0/replay")).json();
  assertEquals([replay.paused, replay.requests], [true, 6]);
  assertEquals((await get("/s/1/replay")).status, 404, "the remote's own answer");
  const down = await get("/s/2/stats");
  assertEquals(down.status, 502);
  assertOk((await down.text()).startsWith("Cannot reach http://127.0.0.1:1"));
  assertEquals((await get("/s/3/stats")).status, 404);
  assertEquals((await get("/s/1/nope")).status, 404);
  assertEquals((await get("/stats")).status, 404);
  assertEquals((await (await get("/")).text()).includes("/view.js"), true);

  // The remote's event stream, relayed: every block written arrives.
  const response = await get("/s/1/events?block=4096");
  assertEquals(response.headers.get("content-type"), "text/event-stream; charset=utf-8");
  const events = sseEvents(response.body!);
  assertEquals((await events.next()).value, {
    event: "hello",
    data: { export: "", replay: false },
  });
  await new Promise((r) => setTimeout(r, 100));
  write(40 * 4096, 8192);
  const cells = new Set<number>();
  for await (const e of events) {
    if (e.event !== "frame") continue;
    for (const [kind, runs] of (e.data as ActivityFrame).kinds) {
      if (kind !== "WRITE") continue;
      for (let i = 0; i < runs.length; i += 2) {
        for (let c = runs[i]!; c < runs[i]! + runs[i + 1]!; c++) cells.add(c);
      }
    }
    if (cells.size >= 2) break;
  }
  assertEquals([...cells].sort((a, b) => a - b), [40, 41]);
  assertEquals(view.subscribers, 1);
  assertEquals(stats.listeners.size, 1);
  // Closing the combined view ends the relayed stream, and the remote lets go.
  await view.close();
  const deadline = Date.now() + 3000;
  while (stats.listeners.size > 0 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
  }
  assertEquals(stats.listeners.size, 0);
});
