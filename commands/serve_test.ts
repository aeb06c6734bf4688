import { assertEquals } from "../tests/assert.ts";
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
