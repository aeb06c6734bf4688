import { assertEquals, assertIncludes, assertOk, assertRejects } from "../tests/assert.ts";
import { ROOT, run, tempDir } from "../tests/helpers.ts";
import { UsageError } from "../util/usage_error.ts";
import type { Command } from "./command.ts";
import { type HelpEntry, listTopics, resolveTopic } from "./help.ts";

function nbd(args: string[], env: Record<string, string> = {}) {
  return run(Deno.execPath(), ["run", "-A", `${ROOT}/main.ts`, ...args], { env });
}

const FAKE_COMMANDS: ReadonlyMap<string, HelpEntry> = new Map([
  ["serve", { summary: "serve things", load: () => Promise.reject(new Error("not loaded")) }],
  [
    "frob",
    {
      summary: "frobnicate",
      load: () => Promise.resolve({ usage: "Usage: nbd frob\n" } as Command),
    },
  ],
]);

async function fakeDocs(path: string): Promise<URL> {
  const files: Record<string, string> = {
    "nbd.md": "# nbd(1)\n",
    "nbd-serve.md": "# nbd-serve(1)\n",
    "nbd-plugin-memory.md": "# nbd-plugin-memory(1)\n<!-- params:plugin:memory -->\n",
    "nbd-plugin-data.md":
      "# nbd-plugin-data(1)\n<!-- params:plugin:data -->\n<!-- params:plugin:null -->\n",
    "nbd-filter-stats.md": "# nbd-filter-stats(1)\n<!-- params:filter:stats -->\n",
    "nbd-filter-limits.md": "# nbd-filter-limits(1)\n<!-- params:filter:rate -->\n",
    "architecture.md": "# Architecture\n",
    "notes.txt": "not a page",
  };
  for (const [name, text] of Object.entries(files)) {
    await Deno.writeTextFile(`${path}/${name}`, text);
  }
  return new URL(`file://${path}/`);
}

Deno.test("help: topics resolve to command, plugin, filter, family and topic pages", async () => {
  await using dir = await tempDir();
  const docs = await fakeDocs(dir.path);
  const page = (...args: string[]) => resolveTopic(args, docs, FAKE_COMMANDS);
  assertEquals(await page(), { page: "nbd.md" });
  assertEquals(await page("nbd"), { page: "nbd.md" });
  assertEquals(await page("serve"), { page: "nbd-serve.md" });
  assertEquals(await page("nbd-serve"), { page: "nbd-serve.md" });
  assertEquals(await page("memory"), { page: "nbd-plugin-memory.md" });
  assertEquals(await page("plugin-memory"), { page: "nbd-plugin-memory.md" });
  assertEquals(await page("nbd-plugin-memory"), { page: "nbd-plugin-memory.md" });
  // Names found through the parameter blocks of family pages.
  assertEquals(await page("null"), { page: "nbd-plugin-data.md" });
  assertEquals(await page("rate"), { page: "nbd-filter-limits.md" });
  assertEquals(await page("filter", "rate"), { page: "nbd-filter-limits.md" });
  assertEquals(await page("stats"), { page: "nbd-filter-stats.md" });
  assertEquals(await page("architecture"), { page: "architecture.md" });
  // A command without a page shows its usage.
  assertEquals(await page("frob"), { usage: "Usage: nbd frob\n" });
  for (const args of [["nosuch"], ["plugin", "rate"], ["thing", "memory"], ["../nbd"], ["notes"]]) {
    await assertRejects(() => page(...args), UsageError, '"nbd help --list"');
  }
});

Deno.test("help: --list names commands, plugins, filters and topics", async () => {
  await using dir = await tempDir();
  const text = await listTopics(await fakeDocs(dir.path), FAKE_COMMANDS);
  assertEquals(
    text,
    `Commands:
  serve  serve things
  frob   frobnicate

Plugins:
  data    (nbd-plugin-data)
  memory  (nbd-plugin-memory)
  null    (nbd-plugin-data)

Filters:
  rate   (nbd-filter-limits)
  stats  (nbd-filter-stats)

Topics:
  architecture  Architecture
`,
  );
});

Deno.test("nbd help prints pages as plain text wrapped to the width", async () => {
  const overview = await nbd(["help"]);
  assertEquals(overview.code, 0, overview.stderr);
  assertOk(overview.stdout.startsWith("nbd(1)\n"), overview.stdout.slice(0, 80));
  assertIncludes(overview.stdout, "\nNAME\n");
  const serve = await nbd(["help", "serve"], { COLUMNS: "50" });
  assertEquals(serve.code, 0, serve.stderr);
  assertOk(serve.stdout.startsWith("nbd-serve(1)\n"), serve.stdout.slice(0, 80));
  assertIncludes(serve.stdout, "--port");
  assertOk(!serve.stdout.includes("\x1b"), "no ANSI styling into a pipe");
  assertOk(!serve.stdout.includes("<!--"), "marker comments are dropped");
  for (const line of serve.stdout.split("\n")) {
    // Code blocks (indented eight columns) keep their lines whole.
    if (!line.startsWith(" ".repeat(8))) assertOk(line.length <= 50, `too wide: "${line}"`);
  }
  const memory = await nbd(["help", "memory"]);
  assertEquals(memory.code, 0, memory.stderr);
  assertIncludes(memory.stdout, "[size=]SIZE");
});

Deno.test("nbd help with an unknown topic: one line, exit 2", async () => {
  const result = await nbd(["help", "no-such-topic"]);
  assertEquals(result.code, 2);
  assertEquals(result.stdout, "");
  assertEquals(
    result.stderr,
    'nbd: no help for "no-such-topic"; "nbd help --list" lists the topics\n',
  );
});
