import { assertEquals, assertOk } from "../tests/assert.ts";
import { sseEvents } from "../tests/sse.ts";
import { parsePrometheus, sampleValue } from "../tests/prometheus.ts";
import {
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
} from "../protocol/constants.ts";
import { type ConnectionInfo, ServerStats } from "../server/stats.ts";
import type { ActivityFrame } from "./activity.ts";
import { PAGE_HTML } from "./page_html.ts";
import { PAGE_SCRIPT } from "./page_script.ts";
import { PAGE_STYLE } from "./page_style.ts";
import { Replayer, ReplayLog } from "./replay.ts";
import { SAMPLE_LOG } from "./_test_fixtures.ts";
import {
  EVENT_QUEUE_CHUNKS,
  eventStream,
  looksLikeViewAddress,
  parseViewAddress,
  startViewServer,
  type ViewSource,
} from "./view_server.ts";

const COMMAND_OF: Record<string, number> = {
  READ: NBD_CMD_READ,
  WRITE: NBD_CMD_WRITE,
  TRIM: NBD_CMD_TRIM,
  WRITE_ZEROES: NBD_CMD_WRITE_ZEROES,
};

/** A live-looking source: one connection on export "" of `size` bytes. */
function liveSource(size: number): ViewSource & { conn: ConnectionInfo } {
  const stats = new ServerStats();
  const conn = stats.open(1, "test");
  conn.exportName = "";
  stats.noteExportSize("", size);
  return { stats, conn, listExports: () => Promise.resolve(["", "other"]) };
}

function request(
  source: ReturnType<typeof liveSource>,
  kind: string,
  offset: number,
  length: number,
) {
  const counters = source.stats.exportCounters("");
  const t = source.stats.start(source.conn, counters, COMMAND_OF[kind]!);
  source.stats.finish(source.conn, counters, COMMAND_OF[kind]!, offset, length, true, t);
}

function rng(seed: number): () => number {
  let x = seed;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

/** Adds the cells of a frame to `seen` (kind → cells). */
function collect(frame: ActivityFrame, seen: Map<string, Set<number>>): void {
  for (const [kind, runs] of frame.kinds) {
    const set = seen.get(kind) ?? new Set<number>();
    for (let i = 0; i < runs.length; i += 2) {
      for (let c = runs[i]!; c < runs[i]! + runs[i + 1]!; c++) set.add(c);
    }
    seen.set(kind, set);
  }
}

async function waitFor(check: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

Deno.test("parseViewAddress() and looksLikeViewAddress()", () => {
  assertEquals(parseViewAddress("0.0.0.0:9000"), { hostname: "0.0.0.0", port: 9000 });
  assertEquals(parseViewAddress("8081"), { hostname: "127.0.0.1", port: 8081 });
  assertEquals(parseViewAddress(":0"), { hostname: "127.0.0.1", port: 0 });
  assertEquals(parseViewAddress("[::1]:80"), { hostname: "::1", port: 80 });
  assertEquals(parseViewAddress("localhost"), { hostname: "localhost", port: 8080 });
  for (const bad of ["a:b", "1.2.3.4:99999", "x:1:2", ""]) {
    let threw = false;
    try {
      parseViewAddress(bad);
    } catch (error) {
      threw = error instanceof RangeError;
    }
    assertOk(threw, bad);
  }
  for (const word of ["8080", ":8080", "localhost:1", "[::1]:8080", "0.0.0.0:0"]) {
    assertOk(looksLikeViewAddress(word), word);
  }
  for (const word of ["memory", "1G", "size=1G", "file", "/tmp/x:1", "disk.img"]) {
    assertOk(!looksLikeViewAddress(word), word);
  }
});

Deno.test("the page needs nothing but its own server", () => {
  for (const text of [PAGE_HTML, PAGE_SCRIPT, PAGE_STYLE]) {
    assertOk(!/https?:\/\/|\/\/[a-z0-9.-]+\.[a-z]{2,}\//i.test(text), "no external URL");
  }
  assertOk(PAGE_HTML.includes('<script src="/view.js">'));
  assertOk(PAGE_HTML.includes('href="/view.css"'));
  // The script parses as JavaScript.
  new Function(PAGE_SCRIPT);
});

Deno.test("view server routes: page, assets, /stats, /metrics, errors", async () => {
  const source = liveSource(1 << 20);
  request(source, "WRITE", 0, 4096);
  await using view = await startViewServer(source, { port: 0 });
  const get = async (path: string, init?: RequestInit) => {
    const r = await fetch(new URL(path, view.url), init);
    return { status: r.status, type: r.headers.get("content-type"), body: await r.text() };
  };
  const page = await get("/");
  assertEquals([page.status, page.type], [200, "text/html; charset=utf-8"]);
  assertEquals(page.body, PAGE_HTML);
  assertEquals((await get("/view.js")).type, "text/javascript; charset=utf-8");
  assertEquals((await get("/view.css")).body, PAGE_STYLE);
  const stats = await get("/stats");
  assertEquals(stats.type, "application/json; charset=utf-8");
  const doc = JSON.parse(stats.body);
  assertEquals(doc.exports.map((e: { name: string }) => e.name), ["", "other"]);
  assertEquals(doc.exports[0].commands.WRITE.completed, 1);
  const metrics = await get("/metrics");
  assertEquals(metrics.type, "text/plain; version=0.0.4; charset=utf-8");
  const m = parsePrometheus(metrics.body);
  assertEquals(sampleValue(m, "nbd_bytes_total", { export: "", command: "write" }), 4096);
  assertEquals((await get("/nope")).status, 404);
  assertEquals((await get("/stats", { method: "POST" })).status, 405);
  assertEquals((await get("/replay")).status, 404);
  assertEquals((await get("/events?block=100")).status, 400);
  assertEquals((await get("/events?cells=0")).status, 400);
  assertEquals(source.stats.listeners.size, 0);
});

Deno.test("event stream: every block of every request arrives, at least 10 frames a second", async () => {
  const size = 64 << 20;
  const source = liveSource(size);
  await using view = await startViewServer(source, { port: 0 });
  // No page: nothing listens on the data path.
  assertEquals(source.stats.listeners.size, 0);
  const abort = new AbortController();
  const response = await fetch(new URL("/events?export=&block=4096", view.url), {
    signal: abort.signal,
  });
  assertEquals(response.headers.get("content-type"), "text/event-stream; charset=utf-8");
  const events = sseEvents(response.body!);
  const first = await events.next();
  assertEquals(first.value, { event: "hello", data: { export: "", replay: false } });
  assertEquals(source.stats.listeners.size, 1);
  assertEquals(view.subscribers, 1);

  const model = new Map<string, Set<number>>();
  const seen = new Map<string, Set<number>>();
  let frames = 0;
  let stats = 0;
  let layout: unknown;
  let stop = false;
  const reading = (async () => {
    for await (const e of events) {
      if (stop) break;
      if (e.event === "stats") stats++;
      if (e.event !== "frame") continue;
      const frame = e.data as ActivityFrame;
      layout ??= [frame.size, frame.block, frame.cells];
      frames++;
      collect(frame, seen);
    }
  })();
  const random = rng(5);
  const kinds = Object.keys(COMMAND_OF);
  const started = Date.now();
  // Each kind in its own quarter of the disk: a block is only ever one kind.
  const quarter = size / 4;
  while (Date.now() - started < 1000) {
    for (let i = 0; i < 50; i++) {
      const k = Math.floor(random() * kinds.length);
      const kind = kinds[k]!;
      const offset = k * quarter + Math.floor(random() * (quarter - 65536));
      const length = 1 + Math.floor(random() * 65536);
      request(source, kind, offset, length);
      const set = model.get(kind) ?? new Set<number>();
      for (let c = Math.floor(offset / 4096); c <= Math.floor((offset + length - 1) / 4096); c++) {
        set.add(c);
      }
      model.set(kind, set);
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  const framesInASecond = frames;
  await waitFor(() => kinds.every((k) => seen.get(k)?.size === model.get(k)?.size), "all blocks");
  assertEquals(layout, [size, 4096, 16384]);
  for (const kind of kinds) assertEquals(seen.get(kind), model.get(kind), kind);
  assertOk(framesInASecond >= 10, `${framesInASecond} frames in a second`);
  assertOk(stats >= 1, "counter snapshots arrive too");
  // Leave at the next event (stats come twice a second), and drop the connection.
  stop = true;
  abort.abort();
  await reading.catch(() => {});
  await waitFor(() => source.stats.listeners.size === 0, "the hook to go");
  assertEquals(view.subscribers, 0);
});

Deno.test("event stream: a page that stops reading holds back frames, then gets every block", async () => {
  const size = 1 << 30;
  const source = liveSource(size);
  const stream = eventStream(source, { exportName: "", block: 512, interval: 10 });
  const model = new Set<number>();
  const random = rng(11);
  // 50 frame intervals while nobody reads.
  for (let round = 0; round < 50; round++) {
    for (let i = 0; i < 200; i++) {
      const cell = Math.floor(random() * (size / 512));
      request(source, "WRITE", cell * 512, 512);
      model.add(cell);
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  const seen = new Map<string, Set<number>>();
  let frames = 0;
  const reader = stream.getReader();
  const rest = new ReadableStream<Uint8Array>({
    async pull(controller) {
      const { value, done } = await reader.read();
      if (done) controller.close();
      else controller.enqueue(value);
    },
  });
  for await (const e of sseEvents(rest)) {
    if (e.event !== "frame") continue;
    frames++;
    collect(e.data as ActivityFrame, seen);
    if (seen.get("WRITE")?.size === model.size) break;
  }
  assertEquals(seen.get("WRITE"), model);
  // Frames queued while nobody read stop at the queue's bound; the rest were merged.
  assertOk(frames <= EVENT_QUEUE_CHUNKS + 3, `${frames} frames for 50 intervals`);
  await reader.cancel();
  assertEquals(source.stats.listeners.size, 0);
});

Deno.test("replay through the view server: /replay, controls, reset events", async () => {
  const stats = new ServerStats();
  const log = ReplayLog.fromLines(SAMPLE_LOG);
  const replayer = new Replayer(log, stats, { file: "sample.log", paused: true });
  await using view = await startViewServer({
    stats,
    listExports: () => Promise.resolve(log.exportNames),
    replay: replayer,
  }, { port: 0 });
  const state = await (await fetch(new URL("/replay", view.url))).json();
  assertEquals([state.paused, state.requests, state.run], [true, 6, 0]);
  const post = (body: string) =>
    fetch(new URL("/replay", view.url), { method: "POST", body }).then(async (r) => ({
      status: r.status,
      body: await r.text(),
    }));
  assertEquals((await post('{"speed": -1}')).status, 400);
  assertEquals((await post("nonsense")).status, 400);
  assertEquals((await post('{"paused": "yes"}')).status, 400);
  const abort = new AbortController();
  const response = await fetch(new URL("/events?export=&block=4096", view.url), {
    signal: abort.signal,
  });
  const events = sseEvents(response.body!);
  const names: string[] = [];
  const final = new Map<number, string>(); // cell → kind, frames applied in order
  let done = false;
  let stop = false;
  const reading = (async () => {
    for await (const e of events) {
      if (stop) break;
      names.push(e.event);
      if (e.event === "replay" && (e.data as { done: boolean }).done) done = true;
      if (e.event !== "frame") continue;
      for (const [kind, runs] of (e.data as ActivityFrame).kinds) {
        for (let i = 0; i < runs.length; i += 2) {
          for (let c = runs[i]!; c < runs[i]! + runs[i + 1]!; c++) final.set(c, kind);
        }
      }
    }
  })();
  const changed = JSON.parse((await post('{"speed": 1000, "paused": false}')).body);
  assertEquals([changed.speed, changed.paused], [1000, false]);
  replayer.start();
  await waitFor(() => done, "the replay to finish");
  // WRITE 4096+8192 = cells 1..2, READ 0+512 = cell 0, TRIM 65536+65536 = cells 16..31,
  // then ZERO 0+4096 = cell 0; the failed read past the end paints nothing.
  const expected = new Map<number, string>([[0, "WRITE_ZEROES"], [1, "WRITE"], [2, "WRITE"]]);
  for (let c = 16; c < 32; c++) expected.set(c, "TRIM");
  assertEquals(new Map([...final].sort((a, b) => a[0] - b[0])), expected);
  const doc = await (await fetch(new URL("/stats", view.url))).json();
  assertEquals([doc.mode, doc.exports[0].requests.received], ["replay", 6]);
  await post('{"restart": true, "paused": true}');
  await waitFor(() => names.includes("reset"), "a reset event");
  replayer.stop();
  stop = true;
  abort.abort();
  await reading.catch(() => {});
});
