import { assertEquals, assertIncludes, assertOk } from "../tests/assert.ts";
import { formatBytes, formatDuration, Progress, type ProgressOutput } from "./progress.ts";

function collector(): ProgressOutput & { text: string } {
  return {
    text: "",
    write(text) {
      this.text += text;
    },
  };
}

/** A clock the test moves by hand. */
function clock() {
  let now = 1000;
  return { now: () => now, advance: (ms: number) => now += ms };
}

Deno.test("formatBytes() and formatDuration() read like people write them", () => {
  assertEquals(formatBytes(0), "0 B");
  assertEquals(formatBytes(1536), "1.50 KiB");
  assertEquals(formatBytes(300 * 1024 * 1024), "300 MiB");
  assertEquals(formatBytes(4 * 2 ** 30), "4.00 GiB");
  assertEquals(formatDuration(75), "1:15");
  assertEquals(formatDuration(3700), "1:01:40");
});

Deno.test("Progress writes N/100 lines when the percentage changes, 100 only on success", () => {
  const out = collector();
  const time = clock();
  const progress = new Progress(1000, { percent: out, now: time.now });
  for (const done of [5, 9, 10, 10, 500, 999, 1000]) progress.update(done);
  progress.finish(true);
  assertEquals(out.text, "0/100\n1/100\n50/100\n99/100\n100/100\n");

  const failed = collector();
  const stopped = new Progress(1000, { percent: failed, now: time.now });
  stopped.update(1000);
  stopped.finish(false);
  assertEquals(failed.text, "0/100\n99/100\n");
});

Deno.test("Progress writes JSON records with absolute figures, at most twice a second", () => {
  const out = collector();
  const time = clock();
  const progress = new Progress(4000, { json: out, now: time.now });
  time.advance(100);
  progress.update(100); // too soon after the first record
  time.advance(900);
  progress.update(1000);
  time.advance(1000);
  progress.finish(true, 4000);
  const records = out.text.trim().split("\n").map((line) => JSON.parse(line));
  assertEquals(records.length, 3);
  assertEquals(records[0], {
    bytes: 0,
    total: 4000,
    percent: 0,
    rate: 0,
    elapsed: 0,
    eta: null,
    state: "running",
  });
  assertEquals(records[1], {
    bytes: 1000,
    total: 4000,
    percent: 25,
    rate: 1000,
    elapsed: 1,
    eta: 3,
    state: "running",
  });
  assertEquals(records[2].state, "done");
  assertEquals(records[2].bytes, 4000);
  assertEquals(records[2].rate, 2000);
});

Deno.test("Progress without a known total reports bytes only", () => {
  const json = collector();
  const percent = collector();
  const time = clock();
  const progress = new Progress(undefined, { json, percent, now: time.now });
  time.advance(1000);
  progress.update(512);
  progress.finish(true, 1024);
  const last = JSON.parse(json.text.trim().split("\n").pop()!);
  assertEquals([last.bytes, last.total, last.percent, last.eta], [1024, null, null, null]);
  assertEquals(percent.text, "100/100\n");
});

Deno.test("Progress draws a bar in place on a terminal and plain lines otherwise", () => {
  const tty = collector();
  const time = clock();
  const bar = new Progress(2 ** 30, { human: { output: tty, terminal: true }, now: time.now });
  time.advance(1000);
  bar.update(2 ** 29);
  bar.finish(true, 2 ** 30);
  const frames = tty.text.split("\r").filter((f) => f.length > 0);
  assertIncludes(
    frames[1]!,
    "[###############---------------]  50%  512 MiB / 1.00 GiB  512 MiB/s",
  );
  assertIncludes(frames[1]!, "ETA 0:01");
  assertOk(frames[2]!.endsWith("\n") && frames[2]!.includes("100%"));

  const log = collector();
  const lines = new Progress(2 ** 30, { human: { output: log, terminal: false }, now: time.now });
  time.advance(500);
  lines.update(1); // within the interval: nothing
  time.advance(2000);
  lines.update(2 ** 28);
  lines.finish(false);
  assertEquals(log.text.split("\n").filter((l) => l).length, 2);
  assertIncludes(log.text, "copied 256 MiB of 1.00 GiB (25%)");
  assertIncludes(log.text, "stopped after 256 MiB in 2.5 s");
});
