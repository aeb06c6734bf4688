/**
 * The `nbd` command line: global flags, then dispatch to a subcommand.
 * Only this module calls Deno.exit, so every command is testable in-process.
 *
 * @module
 */

import { COMMANDS } from "./commands/mod.ts";
import { printError } from "./commands/command.ts";
import { VERSION } from "./util/version.ts";
import { UsageError } from "./util/usage_error.ts";
import { installSignalHandlers, receivedSignal, signalExitCode } from "./util/signals.ts";

function usage(): string {
  const width = Math.max(...[...COMMANDS.keys()].map((n) => n.length));
  return `Usage: nbd COMMAND [OPTIONS] [ARGS]

A Network Block Device toolkit: server with plugins and filters, client tools.

Commands:
${[...COMMANDS.values()].map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`).join("\n")}

Global options:
  -h, --help     show this help (or "nbd COMMAND --help", "nbd help TOPIC")
  -V, --version  print the version

Examples:
  nbd serve memory 1G
  nbd serve -U - pattern 1G --run 'nbdinfo "$uri"'
`;
}

/** Runs the CLI with `args`; resolves to the exit status. */
export async function main(args: string[]): Promise<number> {
  const [first, ...rest] = args;
  if (first === undefined || first === "-h" || first === "--help") {
    console.log(usage());
    return first === undefined ? 2 : 0;
  }
  if (first === "-V" || first === "--version") {
    console.log(`nbd ${VERSION}`);
    return 0;
  }
  const entry = COMMANDS.get(first);
  if (!entry) {
    printError(`unknown command "${first}"; run "nbd --help" for the list`);
    return 2;
  }
  try {
    const command = await entry.load();
    const status = await command.run(rest);
    // A failure caused by a stop signal exits with the signal's status; a
    // command's own status (0 after serving, a captive command's) stands.
    const signal = receivedSignal();
    return signal !== undefined && status === 1 ? signalExitCode(signal) : status;
  } catch (error) {
    if (error instanceof UsageError) {
      printError(error.message);
      return 2;
    }
    printError(error instanceof Error ? error.message : String(error));
    if (Deno.env.get("NBD_DEBUG")) console.error(error);
    const signal = receivedSignal();
    return signal !== undefined ? signalExitCode(signal) : 1;
  }
}

if (import.meta.main) {
  // First thing: from here on a stop signal ends every command promptly, in any state.
  installSignalHandlers({ exit: (code) => Deno.exit(code), report: printError });
  Deno.exit(await main(Deno.args));
}
