/**
 * Running this same program again, as a child process.
 *
 * @module
 */

import { basename } from "node:path";
import { fileURLToPath } from "node:url";

/**
 * The command that runs this program with `args`: the executable itself
 * when compiled, or `deno run -A main.ts` when running from source.
 */
export function selfCommand(args: string[]): [string, string[]] {
  const exec = Deno.execPath();
  if (/^deno(\.exe)?$/.test(basename(exec))) {
    const main = fileURLToPath(new URL("../main.ts", import.meta.url));
    return [exec, ["run", "-A", "--quiet", main, ...args]];
  }
  return [exec, args];
}
