/**
 * Release builds: `deno compile` of `nbd` for every platform it runs on,
 * into build/release/nbd-<os>-<arch>[.exe].
 *
 *   deno task release                                  # all five targets
 *   deno task release --target x86_64-unknown-linux-gnu --out DIR
 *
 * `deno compile` embeds a runtime (denort) that it downloads from the Deno
 * release server for each target (or takes from DENORT_BIN for the host's
 * own); where that download is impossible the build stops with one line
 * saying so. Everything the program loads by a computed specifier or reads
 * at run time is listed in `INCLUDES` (tests/release_test.ts keeps the list
 * complete).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";

/** The targets of a release: the runtime's target triple and the binary's name. */
export const TARGETS: readonly { triple: string; name: string }[] = [
  { triple: "x86_64-unknown-linux-gnu", name: "nbd-linux-x86_64" },
  { triple: "aarch64-unknown-linux-gnu", name: "nbd-linux-aarch64" },
  { triple: "x86_64-apple-darwin", name: "nbd-macos-x86_64" },
  { triple: "aarch64-apple-darwin", name: "nbd-macos-aarch64" },
  { triple: "x86_64-pc-windows-msvc", name: "nbd-windows-x86_64.exe" },
];

/**
 * What `--include` must add to the module graph of main.ts: the command
 * modules (imported by a computed specifier, commands/mod.ts), the manual
 * pages (`nbd help`), the copy engine's workers and lazily imported
 * endpoints (util/lazy_import.ts), and the live view's page
 * script (imported by a computed specifier, view/page_script.ts).
 */
export const INCLUDES: readonly string[] = [
  "commands/",
  "docs/",
  "copy/",
  "core/inline_api.ts",
  "view/page/main.ts",
];

const ROOT = fileURLToPath(new URL("../", import.meta.url));

/** Whether a failure of `deno compile` is the runtime download (no network, no release server). */
function downloadFailed(stderr: string): boolean {
  return /denort|Setting up base binary|dl\.deno\.land|error sending request/i.test(stderr);
}

/** The first line of the innermost cause in `deno compile`'s error report. */
function reason(stderr: string): string {
  const causes = [...stderr.matchAll(/^\s*\d+: (.+)$/gm)].map((m) => m[1]!);
  const last = causes.filter((c) => !/^<unknown>$/.test(c)).at(-1);
  return (last ?? stderr.trim().split("\n").at(-1) ?? "").trim();
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      target: { type: "string", multiple: true },
      out: { type: "string", default: `${ROOT}build/release` },
      "skip-check": { type: "boolean", default: false },
    },
  });
  const wanted = values.target ?? TARGETS.map((t) => t.triple);
  const targets = wanted.map((triple) => {
    const target = TARGETS.find((t) => t.triple === triple);
    if (!target) {
      throw new Error(
        `unknown target ${triple} (one of ${TARGETS.map((t) => t.triple).join(", ")})`,
      );
    }
    return target;
  });
  if (!values["skip-check"]) {
    const check = await new Deno.Command(Deno.execPath(), { args: ["check", "main.ts"], cwd: ROOT })
      .output();
    if (!check.success) {
      console.error(new TextDecoder().decode(check.stderr));
      console.error("nbd release: the type check failed");
      return 1;
    }
  }
  await Deno.mkdir(values.out!, { recursive: true });
  for (const target of targets) {
    const output = `${values.out}/${target.name}`;
    const args = [
      "compile",
      "-A",
      "--no-check",
      "--quiet",
      ...INCLUDES.flatMap((path) => ["--include", path]),
      "--target",
      target.triple,
      "--output",
      output,
      "main.ts",
    ];
    const result = await new Deno.Command(Deno.execPath(), { args, cwd: ROOT, stderr: "piped" })
      .output();
    const stderr = new TextDecoder().decode(result.stderr);
    if (!result.success) {
      if (downloadFailed(stderr)) {
        console.error(
          `nbd release: cannot download the Deno runtime for ${target.triple} that deno compile embeds (${
            reason(stderr)
          }); build on a machine that reaches dl.deno.land, or set DENORT_BIN for the host's own target`,
        );
      } else {
        console.error(stderr.trim());
        console.error(`nbd release: deno compile for ${target.triple} failed`);
      }
      return 1;
    }
    console.log(output);
  }
  return 0;
}

if (import.meta.main) {
  try {
    Deno.exit(await main());
  } catch (error) {
    console.error(`nbd release: ${(error as Error).message}`);
    Deno.exit(2);
  }
}
