import { assertEquals, assertIncludes, assertOk } from "./tests/assert.ts";
import { ROOT, run } from "./tests/helpers.ts";

function nbd(...args: string[]) {
  return run(Deno.execPath(), ["run", "-A", `${ROOT}/main.ts`, ...args]);
}

Deno.test("nbd --help lists the commands; --version prints the version", async () => {
  const help = await nbd("--help");
  assertEquals(help.code, 0);
  assertIncludes(help.stdout, "serve");
  const version = await nbd("--version");
  assertEquals(version.code, 0);
  assertOk(/^nbd \d+\.\d+\.\d+\n$/.test(version.stdout), version.stdout);
});

Deno.test("usage errors are one line on stderr with exit status 2", async () => {
  for (
    const [args, message] of [
      [["frobnicate"], 'unknown command "frobnicate"'],
      [["serve"], "missing PLUGIN"],
      [["serve", "nosuch"], 'unknown plugin "nosuch"'],
      [["serve", "memory"], "memory: missing required parameter size="],
      [["serve", "eval", "get_size=echo 1M"], "eval: missing required parameter pread="],
      [["serve", "--filter=log", "memory", "1M"], "log: missing required parameter logfile="],
      [["serve", "memory", "12Q"], 'cannot parse "12Q" as a size'],
      [["serve", "memory", "1M", "colour=red"], "unknown parameter: colour="],
      [["serve", "--bogus", "memory", "1M"], "Unknown option '--bogus'"],
      [["serve", "--filter=nosuch", "memory", "1M"], 'unknown filter "nosuch"'],
    ] as const
  ) {
    const result = await nbd(...args);
    assertEquals(result.code, 2, `${args.join(" ")}: ${result.stderr}`);
    assertEquals(result.stdout, "");
    const lines = result.stderr.trim().split("\n");
    assertEquals(lines.length, 1, result.stderr);
    assertOk(lines[0]!.startsWith("nbd: "), lines[0]);
    assertIncludes(lines[0]!, message);
  }
});

Deno.test("runtime errors exit 1 with a one-line message", async () => {
  const missing = await nbd("serve", "-U", "/nonexistent-dir/sock", "memory", "1M");
  assertEquals(missing.code, 1);
  assertOk(
    missing.stderr.startsWith("nbd: ") && missing.stderr.trim().split("\n").length === 1,
    missing.stderr,
  );
  const nofile = await nbd("serve", "file", "/nonexistent/disk.img");
  assertEquals(nofile.code, 1);
  assertIncludes(nofile.stderr, "/nonexistent/disk.img");
});

Deno.test("nbd serve PLUGIN --help shows the plugin's parameters", async () => {
  const result = await nbd("serve", "memory", "--help");
  assertEquals(result.code, 0);
  assertIncludes(result.stdout, "[size=]SIZE");
  const serveHelp = await nbd("serve", "--help");
  assertIncludes(serveHelp.stdout, "--run CMD");
  assertIncludes(serveHelp.stdout, "pattern");
});

Deno.test("the command registry's names and summaries match the commands it loads", async () => {
  const { COMMANDS } = await import("./commands/mod.ts");
  for (const [name, entry] of COMMANDS) {
    const command = await entry.load();
    assertEquals([command.name, command.summary], [name, entry.summary]);
  }
});
