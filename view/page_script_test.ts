import { assertEquals, assertOk } from "../tests/assert.ts";
import type { ActivityFrame } from "./activity.ts";
import type { PageFrame, PageReplay, PageStats } from "./page/events.ts";
import { PAGE_SCRIPT } from "./page_script.ts";
import type { StatsSnapshot } from "./stats_snapshot.ts";
import type { ReplayState } from "./view_server.ts";

Deno.test("page script: what the server sends fits the page's event types", () => {
  // Checked when this file is type-checked: each line fails to compile
  // if the server's type no longer gives the page what it reads.
  const fits = {
    frame: (frame: ActivityFrame): PageFrame => frame,
    stats: (stats: StatsSnapshot): PageStats => stats,
    replay: (state: ReplayState): PageReplay => state,
  };
  assertEquals(Object.keys(fits), ["frame", "stats", "replay"]);
});

Deno.test("page script: main.ts declares no value but main, so main's text is the script", async () => {
  const source = await Deno.readTextFile(new URL("./page/main.ts", import.meta.url));
  const values = source.split("\n").filter((line) =>
    /^(export\s+)?(const|let|var|function|class|enum|async|import(?!\s+type\b))\b/.test(line)
  );
  assertEquals(values, ["export function main(): void {"]);
});

Deno.test("page script: served as plain JavaScript that runs main once", () => {
  assertOk(PAGE_SCRIPT.startsWith('"use strict";\n(function main() {'), PAGE_SCRIPT.slice(0, 40));
  assertOk(PAGE_SCRIPT.endsWith("})();\n"));
  // No TypeScript left: it parses as JavaScript.
  new Function(PAGE_SCRIPT);
  assertOk(!PAGE_SCRIPT.includes("HTMLSelectElement"), "type annotations are stripped");
});
