/**
 * The completion scripts: the bash one is loaded in a real bash and asked
 * what it offers for partial command lines (COMP_WORDS/COMP_CWORD in,
 * COMPREPLY out); the zsh and fish ones must at least parse.
 */

import { assertEquals, assertIncludes, assertOk } from "./assert.ts";
import { bashScript, completionData, fishScript, zshScript } from "../commands/completions.ts";
import { ROOT, run } from "./helpers.ts";

const data = await completionData();
const script = bashScript(data);

async function which(program: string): Promise<boolean> {
  const result = await run("/bin/sh", ["-c", `command -v ${program}`]);
  return result.code === 0;
}

/**
 * What the bash completion offers for `words` (as readline splits them:
 * "--filter=co" is "--filter" "=" "co"), the last word being completed,
 * run in `cwd`. Sorted.
 */
async function complete(words: string[], cwd: string): Promise<string[]> {
  const quoted = words.map((w) => `'${w.replaceAll("'", "'\\''")}'`).join(" ");
  const program = `${script}
COMP_WORDS=(${quoted})
COMP_CWORD=${words.length - 1}
_nbd
printf '%s\\n' "\${COMPREPLY[@]}"
`;
  const command = new Deno.Command("bash", {
    args: ["--norc", "--noprofile", "-c", program],
    cwd,
    stdout: "piped",
    stderr: "piped",
  });
  const output = await command.output();
  const stderr = new TextDecoder().decode(output.stderr);
  assertEquals(stderr, "", `${words.join(" ")}: ${stderr}`);
  assertEquals(output.code, 0);
  return new TextDecoder().decode(output.stdout).split("\n").filter((l) => l !== "").sort();
}

Deno.test("bash completion offers commands, options, plugins, filters, params and files", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/disk.img`, new Uint8Array(1));
    await Deno.writeFile(`${dir}/disk.qcow2`, new Uint8Array(1));
    await Deno.writeFile(`${dir}/notes.txt`, new Uint8Array(1));
    const cases: [string[], string[]][] = [
      [["nbd", "s"], ["serve", "stats"]],
      [["nbd", "co"], ["completions", "copy"]],
      [["nbd", "completions", ""], ["bash", "fish", "zsh"]],
      [["nbd", "serve", "--ex"], ["--export-name"]],
      [["nbd", "copy", "--des"], ["--destination-format", "--destination-is-zero"]],
      [["nbd", "info", "--no-"], ["--no-content", "--no-tls-verify-peer"]],
      // Plugin names after serve's options, even after an option's value.
      [["nbd", "serve", "-p", "10810", "me"], ["memory"]],
      [["nbd", "serve", "-r", "sp"], ["sparse-random", "split"]],
      // A value option's value is not a plugin name.
      [["nbd", "serve", "-e", ""], []],
      // Filter names, as "--filter NAME" and as "--filter=NAME".
      [["nbd", "serve", "--filter", "c"], ["cache", "cacheextents", "cow"]],
      [["nbd", "serve", "--filter", "=", "re"], ["readahead", "readonly", "retry"]],
      [["nbd", "serve", "--filter=re"], ["readahead", "readonly", "retry"]],
      // Parameters of the chosen plugin and filters.
      [["nbd", "serve", "memory", "1G", "al"], ["allocator="]],
      [["nbd", "serve", "--filter=cow", "memory", "cow-on-"], ["cow-on-cache=", "cow-on-read="]],
      [["nbd", "serve", "--filter", "retry", "pattern", "1G", "retry-d"], ["retry-delay="]],
      [["nbd", "serve", "--filter", "=", "log", "null", "log"], ["logappend=", "logfile="]],
      [["nbd", "proxy", "nbd://host/", "dyn"], ["dynamic-export="]],
      // File names: a path option's value, a path parameter, a path argument.
      [["nbd", "serve", "--pidfile", "n"], ["notes.txt"]],
      [["nbd", "serve", "-U", "d"], ["disk.img", "disk.qcow2"]],
      [["nbd", "serve", "file", "d"], ["dir=", "disk.img", "disk.qcow2"]],
      [["nbd", "serve", "memory", "1G", "--filter=log", "logfile", "=", "n"], ["notes.txt"]],
      [["nbd", "serve", "--filter=log", "memory", "1G", "logfile=n"], ["notes.txt"]],
      [["nbd", "copy", "disk.q"], ["disk.qcow2"]],
      [["nbd", "info", "d"], []],
      // Parameters that are not paths complete nothing.
      [["nbd", "serve", "memory", "size", "=", "1"], []],
      [["nbd", "help", "memo"], ["memory"]],
    ];
    for (const [words, expected] of cases) {
      assertEquals(await complete(words, dir), expected, words.join(" "));
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("nbd completions prints the scripts, and refuses other shells", async () => {
  const nbd = (...args: string[]) =>
    run(Deno.execPath(), ["run", "-A", `${ROOT}/main.ts`, ...args]);
  const bash = await nbd("completions", "bash");
  assertEquals(bash.code, 0, bash.stderr);
  assertEquals(bash.stdout, script);
  const bad = await nbd("completions", "tcsh");
  assertEquals(bad.code, 2);
  assertIncludes(bad.stderr, "expected one of bash, zsh, fish");
});

Deno.test("the zsh and fish scripts parse", async () => {
  for (
    const [shell, text, args] of [
      ["zsh", zshScript(data), ["-n"]],
      ["fish", fishScript(data), ["--no-execute"]],
    ] as const
  ) {
    if (!(await which(shell))) {
      console.log(`SKIPPED: ${shell} is not installed; its completion script was not checked`);
      continue;
    }
    const file = await Deno.makeTempFile({ suffix: `.${shell}` });
    try {
      await Deno.writeTextFile(file, text);
      const result = await run(shell, [...args, file]);
      assertEquals(result.code, 0, `${shell}: ${result.stderr}`);
      assertOk(result.stderr === "", `${shell}: ${result.stderr}`);
    } finally {
      await Deno.remove(file);
    }
  }
});
