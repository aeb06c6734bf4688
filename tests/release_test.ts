/**
 * Release builds keep everything the program loads at run time: every
 * worker (`new Worker(new URL(...))`), every module imported by a computed
 * specifier, and every directory read through `new URL(..., import.meta.url)`
 * is in tools/release.ts's INCLUDES and in the compile task. Then the
 * compile itself, for this machine's target, where the runtime that
 * `deno compile` embeds can be downloaded; otherwise a loud skip after
 * checking that the failure is one line saying so.
 */

import { assertEquals, assertMatch, assertOk } from "./assert.ts";
import { ROOT, run, tempDir } from "./helpers.ts";
import { INCLUDES, TARGETS } from "../tools/release.ts";

/**
 * `new URL("...", import.meta.url)` targets that are not run-time assets:
 * main.ts is what a source checkout runs (a compiled binary runs itself).
 */
const NOT_ASSETS = new Set(["main.ts"]);

/** The program's sources (not tests, benchmarks or tools), relative to ROOT. */
async function sources(dir = ""): Promise<string[]> {
  const out: string[] = [];
  for await (const entry of Deno.readDir(`${ROOT}/${dir || "."}`)) {
    const path = dir ? `${dir}/${entry.name}` : entry.name;
    if (entry.isDirectory) {
      if (/^(\.|node_modules$|tests$|bench$|tools$|build$|testdata$)/.test(entry.name)) continue;
      out.push(...await sources(path));
    } else if (entry.name.endsWith(".ts") && !/_test(_utils)?\.ts$|^_test/.test(entry.name)) {
      out.push(path);
    }
  }
  return out.sort();
}

/** `relative` resolved against the directory of `file`, relative to ROOT ("a/b/", "a/c.ts"). */
function resolve(file: string, relative: string): string {
  const url = new URL(relative, `file:///root/${file}`);
  return url.pathname.slice("/root/".length);
}

/** Modules that import what the user names (`nbd serve ./disk.ts`), never the tree's own files. */
const USER_MODULE_LOADERS = new Set(["core/module_loader.ts", "plugins/ts.ts"]);
/** Imports URLs its callers build, where this test checks them. */
const URL_IMPORTERS = new Set(["util/lazy_import.ts"]);

/** Whether `path` is covered by an include: the file itself, or a directory holding it. */
function included(path: string): boolean {
  return INCLUDES.some((entry) =>
    entry === path || (entry.endsWith("/") && path.startsWith(entry))
  );
}

/** What the compiled binary must carry besides main.ts's static module graph. */
async function required(): Promise<Map<string, string>> {
  const needs = new Map<string, string>();
  for (const file of await sources()) {
    const text = await Deno.readTextFile(`${ROOT}/${file}`);
    for (const m of text.matchAll(/new Worker\(\s*new URL\("([^"]+)", import\.meta\.url\)/g)) {
      needs.set(resolve(file, m[1]!), `a worker started in ${file}`);
    }
    // Every URL of this module's neighbourhood: an asset read at run time, or a module
    // imported by a computed specifier below.
    const urls = [...text.matchAll(/new URL\("([^"]+)", import\.meta\.url\)/g)]
      .map((m) => resolve(file, m[1]!))
      .filter((path) => !NOT_ASSETS.has(path));
    for (const path of urls) needs.set(path, `read or imported at run time by ${file}`);
    for (const m of text.matchAll(/\bimport\(\s*([^)"'\s][^)]*)\)/g)) {
      // Plugins and filters from the user's own modules are not part of the binary.
      if (USER_MODULE_LOADERS.has(file) || URL_IMPORTERS.has(file)) continue;
      const argument = m[1]!.trim();
      if (argument.startsWith("`")) {
        // A template: its directory must be included whole.
        const prefix = /^`([^$`]*)/.exec(argument)![1]!;
        needs.set(resolve(file, prefix.replace(/[^/]*$/, "") || "./"), `imported by ${file}`);
        continue;
      }
      // A variable: it must hold one of this file's import.meta.url URLs, or a template.
      const template = new RegExp(`${argument} = \`([^$\`]*)`).exec(text);
      if (template) {
        needs.set(resolve(file, template[1]!.replace(/[^/]*$/, "") || "./"), `imported by ${file}`);
      } else {
        assertOk(urls.length > 0, `${file}: cannot tell what import(${argument}) loads`);
      }
    }
  }
  return needs;
}

Deno.test("--include lists every worker, computed import and run-time asset", async () => {
  const needs = await required();
  // The known ones are found (so the scan itself works).
  for (
    const path of [
      "copy/share_worker.ts",
      "copy/write_worker.ts",
      "view/page/main.ts",
      "docs/",
      "commands/",
    ]
  ) {
    assertOk(needs.has(path), `${path} is found by the scan: ${[...needs.keys()].join(", ")}`);
  }
  for (const [path, why] of needs) {
    assertOk(included(path), `${path} (${why}) is missing from INCLUDES in tools/release.ts`);
  }
  // The compile task of deno.json carries the same list.
  const tasks = JSON.parse(await Deno.readTextFile(`${ROOT}/deno.json`)).tasks;
  const compileIncludes = [...(tasks.compile as string).matchAll(/--include (\S+)/g)].map((m) =>
    m[1]
  );
  assertEquals(compileIncludes.sort(), [...INCLUDES].sort(), "deno task compile includes the same");
  assertEquals(tasks.release, "deno run -A tools/release.ts");
  assertEquals(
    TARGETS.map((t) => t.name),
    [
      "nbd-linux-x86_64",
      "nbd-linux-aarch64",
      "nbd-macos-x86_64",
      "nbd-macos-aarch64",
      "nbd-windows-x86_64.exe",
    ],
  );
});

Deno.test("deno task release compiles where the runtime can be fetched, else says so in one line", async (t) => {
  const triple = { "x86_64": "x86_64", "aarch64": "aarch64" }[Deno.build.arch];
  const target = TARGETS.find((t) =>
    t.triple.startsWith(`${triple}-`) &&
    t.triple.includes(Deno.build.os === "darwin" ? "apple" : Deno.build.os)
  );
  assertOk(target, `a release target for ${Deno.build.target}`);
  await using dir = await tempDir();
  const result = await run(Deno.execPath(), [
    "run",
    "-A",
    `${ROOT}/tools/release.ts`,
    "--skip-check",
    "--target",
    target.triple,
    "--out",
    dir.path,
  ]);
  if (result.code !== 0) {
    const lines = result.stderr.trim().split("\n");
    assertEquals(lines.length, 1, result.stderr);
    assertMatch(lines[0]!, /^nbd release: cannot download the Deno runtime for /);
    console.error(`\n*** SKIPPING the compiled binary: ${lines[0]} ***\n`);
    await t.step({ name: "the runtime cannot be downloaded here", ignore: true, fn() {} });
    return;
  }
  const binary = `${dir.path}/${target.name}`;
  assertEquals(result.stdout.trim(), binary);
  const version = await run(binary, ["--version"]);
  assertMatch(version.stdout, /^nbd \d+\.\d+\.\d+/);
  // The lazily loaded pieces are in it: a command module, a manual page, the page script.
  const help = await run(binary, ["help", "copy"]);
  assertEquals(help.code, 0, help.stderr);
  assertMatch(help.stdout, /nbd-copy/);
});
