import { assertEquals, assertIncludes, assertOk } from "../tests/assert.ts";
import { nbdExecutable, run, tempDir } from "../tests/helpers.ts";
import { expandViewOption } from "./serve.ts";

Deno.test("expandViewOption() gives --view its optional address", () => {
  const cases: Array<[string[], string[]]> = [
    [["--view", "memory", "1G"], ["--view=127.0.0.1:8080", "memory", "1G"]],
    [["--view", "9000", "memory", "1G"], ["--view=9000", "memory", "1G"]],
    [["--view", "0.0.0.0:9000", "memory"], ["--view=0.0.0.0:9000", "memory"]],
    [["--view", ":9000", "memory"], ["--view=:9000", "memory"]],
    [["--view=[::1]:9", "memory"], ["--view=[::1]:9", "memory"]],
    [["memory", "1G", "--view"], ["memory", "1G", "--view=127.0.0.1:8080"]],
    [["--view", "--readonly", "memory"], ["--view=127.0.0.1:8080", "--readonly", "memory"]],
    // Values of other options are not options.
    [["--run", "--view", "memory"], ["--run", "--view", "memory"]],
    [["-e", "--view", "memory"], ["-e", "--view", "memory"]],
    [["-rU", "--view", "memory"], ["-rU", "--view", "memory"]],
    [["-p", "10809", "--view", "10810", "memory"], ["-p", "10809", "--view=10810", "memory"]],
    // Plugin parameters that happen to follow --view stay parameters.
    [["--view", "size=1G", "memory"], ["--view=127.0.0.1:8080", "size=1G", "memory"]],
    // Everything after -- is left alone.
    [["memory", "--", "--view"], ["memory", "--", "--view"]],
  ];
  for (const [argv, expected] of cases) {
    assertEquals(expandViewOption(argv), expected, argv.join(" "));
  }
});

/** Runs `nbd serve ARGS` and returns its exit status and stderr lines. */
async function serveFails(args: string[]): Promise<{ code: number; lines: string[] }> {
  const result = await run(await nbdExecutable(), ["serve", ...args]);
  assertEquals(result.stdout, "");
  return { code: result.code, lines: result.stderr.split("\n").filter((l) => l !== "") };
}

Deno.test("nbd serve closes the filters started before a failing filter", async () => {
  await using dir = await tempDir();
  const stats = `${dir.path}/stats.txt`;
  // The stats filter writes its summary only when it is closed.
  const { code, lines } = await serveFails([
    "--filter=stats",
    "--filter=cache",
    "memory",
    "1M",
    `statsfile=${stats}`,
    "cache=bogus",
  ]);
  assertEquals(code, 2);
  assertEquals(lines, ['nbd: cache: expected writeback, writethrough or unsafe, got "bogus"']);
  assertIncludes(await Deno.readTextFile(stats), "total: 0 ops");
});

Deno.test("nbd serve closes every filter when the plugin fails to start", async () => {
  await using dir = await tempDir();
  const stats = `${dir.path}/stats.txt`;
  const { code, lines } = await serveFails([
    "--filter=stats",
    "--filter=cache",
    "file",
    `${dir.path}/missing.img`,
    `statsfile=${stats}`,
  ]);
  assertEquals(code, 1);
  assertEquals(lines.length, 1, lines.join("\n"));
  assertOk(lines[0]!.startsWith(`nbd: Cannot serve ${dir.path}/missing.img: `), lines[0]);
  assertIncludes(await Deno.readTextFile(stats), "total: 0 ops");
});

Deno.test("nbd serve exits 1 with one line when a filter fails to start", async () => {
  await using dir = await tempDir();
  const closes = `${dir.path}/closes.txt`;
  // The program with two extra filters: "record" notes its close, "broken" cannot start.
  const script = `${dir.path}/serve.ts`;
  await Deno.writeTextFile(
    script,
    `import { FILTERS } from ${JSON.stringify(new URL("../filters/mod.ts", import.meta.url).href)};
import { main } from ${JSON.stringify(new URL("../main.ts", import.meta.url).href)};
const filters = FILTERS as Map<string, unknown>;
for (const name of ["record1", "record2"]) {
  filters.set(name, {
    name,
    summary: "",
    params: [],
    create: () => Promise.resolve({
      wrap: (next: unknown) => Promise.resolve(next),
      close: () => Deno.writeTextFile(${JSON.stringify(closes)}, name + "\\n", { append: true }),
    }),
  });
}
filters.set("broken", {
  name: "broken",
  summary: "",
  params: [],
  create: () => Promise.reject(new Error("broken: the device is not ready")),
});
Deno.exit(await main(Deno.args));
`,
  );
  const stats = `${dir.path}/stats.txt`;
  const result = await run(Deno.execPath(), [
    "run",
    "-A",
    "--quiet",
    script,
    "serve",
    "--filter=record1",
    "--filter=stats",
    "--filter=record2",
    "--filter=broken",
    "--filter=cache",
    "memory",
    "1M",
    `statsfile=${stats}`,
  ], { env: { DENO_NO_UPDATE_CHECK: "1" } });
  assertEquals(result.code, 1);
  assertEquals(result.stderr, "nbd: broken: the device is not ready\n");
  assertEquals(result.stdout, "");
  // Closed last started first; the layers after the broken one never started.
  assertEquals(await Deno.readTextFile(closes), "record2\nrecord1\n");
  assertIncludes(await Deno.readTextFile(stats), "total: 0 ops");
});
