/**
 * Which words name modules, how they become URLs, and what a compiled
 * binary refuses to load.
 */

import { assertEquals, assertMatch, assertOk } from "../tests/assert.ts";
import { isCompiled, isModuleSpecifier, loadRefusal, moduleUrl } from "./module_loader.ts";

Deno.test("module specifiers: paths by extension, URLs by scheme; built-in names are not", () => {
  for (
    const word of ["./disk.ts", "disk.js", "/abs/x.mjs", "y.mts", "file:///a/b", "https://x/p.ts"]
  ) {
    assertOk(isModuleSpecifier(word), word);
  }
  for (const word of ["memory", "file", "ts", "disk.img", "nbd"]) {
    assertOk(!isModuleSpecifier(word), word);
  }
  assertEquals(moduleUrl("./a b.ts", "/tmp/x"), "file:///tmp/x/./a%20b.ts".replace("/./", "/"));
  assertEquals(moduleUrl("/abs/p.ts", "/tmp"), "file:///abs/p.ts");
  assertEquals(moduleUrl("https://e.org/p.ts"), "https://e.org/p.ts");
});

Deno.test("compiled binary: remote modules are refused with how to run them; files and inline code are not", () => {
  assertEquals(isCompiled(), false); // tests run under deno run
  assertEquals(loadRefusal("https://e.org/p.ts", false), undefined);
  const refusal = loadRefusal("https://e.org/p.ts", true)!;
  assertMatch(refusal, /a compiled nbd cannot load remote modules/);
  assertMatch(refusal, /deno run -A main\.ts serve https:\/\/e\.org\/p\.ts/);
  assertOk(!refusal.includes("\n"));
  assertEquals(loadRefusal("file:///tmp/p.ts", true), undefined);
  assertEquals(loadRefusal("data:application/typescript,export%20default%201", true), undefined);
});
